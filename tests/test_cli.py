"""The command line as people type it: --help on every command (read from its text, without importing torch), the
forms a setting may take, the errors for what could be read two ways, and one torchrun run with the new forms."""

import dataclasses
import glob
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
from conftest import ROOT, read_log, run_gpt2

import cli
import gpt2

# every script that ends in run_cli(main, SomeConfig(), ...): found, not listed, so that a new command is covered
COMMANDS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/bench/*.py")
                  if p != f"{ROOT}/cli.py" and re.search(r"^\s+run_cli\(\w+, \w+\(\)", pathlib.Path(p).read_text(), re.M))


def load(script):
    """The command's module, imported here (bench scripts by path, with bench/ on sys.path as when they run)."""
    if "/" not in script:
        return importlib.import_module(script.removesuffix(".py"))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location(f"help_{os.path.basename(script)[:-3]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_help(script, flag="--help"):
    """`python -X importtime SCRIPT --help`: (exit status, stdout, the modules it imported)."""
    env = dict(os.environ, COLUMNS="100")
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), flag], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.returncode, proc.stdout, imported


def help_entries(text):
    """The help's settings part as [heading or (name, its entry with the continuation lines joined)]."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("settings ("))
    entries = []
    for line in lines[start + 1:]:
        if line.startswith("  --"):
            entries.append([line.split()[0][2:], " ".join(line.split()[1:])])
        elif line.startswith("   "):
            entries[-1][1] += " " + line.strip()
        elif line:
            entries.append(line)
    return [e if isinstance(e, str) else tuple(e) for e in entries]


def shown_default(entry, kind):
    """(the default an entry shows, parsed as the command line reads a field of type `kind`; what it says the rule
    accepts, "" if nothing)."""
    tail = entry[entry.rindex("(default: ") + len("(default: "):-1]
    if tail.startswith('"'):
        text, end = json.JSONDecoder().raw_decode(tail)
        accepts = tail[end:].removeprefix("; ")
    else:
        text, _, accepts = tail.partition("; ")
    parse = {bool: lambda t: {"true": True, "false": False}[t], int: int, float: float, str: str}[kind]
    return parse(text), accepts


def test_every_command_is_found():
    expected = {"gpt2.py", "fineweb.py", "evaluate.py", "hellaswag.py", "demo.py", "bench/bench_gpu.py", "bench/run.py",
                "bench/gpu_check.py", "bench/bench_train.py", "bench/bench_memory.py"}
    assert expected <= set(COMMANDS), COMMANDS


@pytest.mark.parametrize("script", COMMANDS)
def test_help_shows_every_setting_without_importing_torch(script):
    code, out, imported = run_help(script)
    assert code == 0, out
    assert "torch" not in imported and imported, sorted(imported)  # imported: -X importtime did report
    module = load(script)
    source = pathlib.Path(ROOT, script).read_text()
    config = getattr(module, re.search(r"^\s+run_cli\(\w+, (\w+)\(\)", source, re.M).group(1))
    assert out.startswith(f"usage: python {script} ")
    assert module.__doc__.strip().split("\n\n")[0] in out  # the purpose: the docstring's opening paragraph

    # the class's own lines, in order: its comment lines are the headings, each field an entry
    class_text = source[source.index(f"class {config.__name__}:"):].split("\n\n\n")[0]
    expected = [m.group(1) or m.group(2) for m in re.finditer(r"^    (?:# (.*)|(\w+): )", class_text, re.M)]
    entries = help_entries(out)
    assert [e if isinstance(e, str) else e[0] for e in entries] == expected
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert [e[0] for e in entries if isinstance(e, tuple)] == list(fields)
    for name, entry in (e for e in entries if isinstance(e, tuple)):
        kind = type(fields[name].default)
        declared = fields[name].type if isinstance(fields[name].type, types.UnionType) else kind  # int | str
        assert entry.startswith(f"{getattr(declared, '__name__', str(declared)).upper()} "), entry
        accepts = cli.rule_brief(module.RULES[name]) if hasattr(module, "RULES") else ""  # the real rule's words
        assert shown_default(entry, kind) == (fields[name].default, accepts), entry
        comment = re.search(rf"^    {name}: .*?  # (.*)$", class_text, re.M)
        if comment:
            assert " ".join(comment.group(1).split()) in entry, entry


def test_help_answers_h_and_help_alike_and_before_any_setting_error():
    outputs = [run_help("gpt2.py", flag)[:2] for flag in ("-h", "--help")]
    assert outputs[0] == outputs[1] and outputs[0][0] == 0
    # the usual path too: run_cli answers it for a script that has no early answer_help, whatever else argv holds
    env = dict(os.environ, COLUMNS="100")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--no_such=1", "-h"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout == run_help("fineweb.py")[1]
    assert all(len(line) <= 100 for line in proc.stdout.splitlines() if line.startswith(" "))


# --- the forms of a setting ---


def settings(argv):
    cfg = gpt2.Config()
    overridden = cli.apply_overrides(cfg, argv)
    return dataclasses.asdict(cfg), overridden


def test_settings_as_people_type_them():
    typed = ["--max-steps", "5", "--log_dir", "out dir", "--compile", "--no-shuffle", "--fsdp=0", "--seed", "-0",
             "--prompt", "-1", "--wandb_log=true", "--export-dir=", "--min_lr", "1e-5", "--skip-nonfinite"]
    canonical = ["--max_steps=5", "--log_dir=out dir", "--compile=1", "--shuffle=0", "--fsdp=0", "--seed=0",
                 "--prompt=-1", "--wandb_log=1", "--export_dir=", "--min_lr=1e-5", "--skip_nonfinite=1"]
    assert settings(typed) == settings(canonical)
    cfg, names = settings(typed)
    assert (cfg["max_steps"], cfg["log_dir"], cfg["prompt"], cfg["min_lr"]) == (5, "out dir", "-1", 1e-5)
    assert (cfg["compile"], cfg["shuffle"], cfg["fsdp"], cfg["wandb_log"], cfg["skip_nonfinite"]) == (
        True, False, False, True, True)
    assert names == {"max_steps", "log_dir", "compile", "shuffle", "fsdp", "seed", "prompt", "wandb_log", "export_dir",
                     "min_lr", "skip_nonfinite"}
    # defaults flipped by the bare forms: --compile is on by default, --fsdp off
    assert settings(["--no-compile", "--fsdp"]) == settings(["--compile=false", "--fsdp=true"])
    assert settings(["--max_steps=5", "--max-steps", "5"])[1] == {"max_steps"}  # the same value twice: one setting


@pytest.mark.parametrize("argv, message", [
    (["--log_dir", "--max_steps=5"], "--log_dir is followed by '--max_steps=5', a setting, not a value: write "
                                     "--log_dir=VALUE (--log_dir= for an empty one)"),
    (["--max_steps"], "--max_steps needs a value: write --max_steps=VALUE or --max_steps VALUE"),
    (["--max_steps=5", "--max-steps", "6"], "--max_steps is given twice, as --max_steps=5 and --max-steps 6: keep one"),
    (["--compile", "--no-compile"], "--compile is given twice, as --compile and --no-compile: keep one"),
    (["--compile", "0"], "bad argument '0' after --compile: a bool setting takes its value after =, as --compile=0"),
    (["--no-compile=1"], "--no-compile=1: --no-compile takes no value; write --no-compile or --compile=1"),
    (["--no-n_layer"], "unknown setting 'no-n_layer': did you mean n_layer?"),
    (["--n_layer"], "--n_layer needs a value"),  # a bare name is true only for a bool
    (["max_lr=1"], "bad argument 'max_lr=1': write --name=value or --name value, as --max_lr=1"),
    (["--lr=1"], "unknown setting 'lr': did you mean max_lr, min_lr, muon_lr? (--help lists them all)"),
    (["--steps", "3"], "unknown setting 'steps': did you mean max_steps, warmup_steps, lr_decay_steps?"),
    (["--xyzzy"], "unknown setting 'xyzzy': --help lists the settings"),
    (["--max-steps", "five"], "--max_steps=five: expected an int"),
])
def test_what_could_be_read_two_ways_is_one_error(argv, message):
    with pytest.raises(cli.UserError) as e:
        settings(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_ambiguous_setting_stops_the_command_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "--log_dir", "--max_steps=5"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == ("error: --log_dir is followed by '--max_steps=5', a setting, not a "
                                                    "value: write --log_dir=VALUE (--log_dir= for an empty one)\n")
    assert os.listdir(tmp_path) == []


def test_merge_settings_keeps_the_last_value_of_each():
    merged = cli.merge_settings(["--a=1", "x", "--b-c=2", "--a=3", "--d", "4", "--b_c=5"])
    assert merged == ["--a=3", "x", "--b_c=5", "--d", "4"]


@pytest.mark.slow
def test_torchrun_takes_the_typed_forms(shards, tmp_path):
    # torchrun's own arguments come before the script and are its own; gpt2.py's come after, in every form
    log_dir = tmp_path / "log"
    run_gpt2("--n-layer", "2", "--n_head", "2", "--n-embd=32", "--block-size", "16", "--vocab-size", "128",
             "--micro-batch-size", "4", "--total-batch-size", "128", "--no-compile", "--device", "cpu",
             "--hellaswag-every", "0", "--sample-every", "0", "--data-dir", shards, "--log-dir", str(log_dir),
             "--max-steps", "2", "--val-every", "0", "--checkpoint-every", "2", "--fsdp", "--shuffle", torchrun_ranks=2)
    ckpt = gpt2.load_checkpoint(str(log_dir / "model_00002.pt"))
    assert ckpt["world_size"] == 2
    config = ckpt["config"]
    assert {k: config[k] for k in ("n_layer", "n_embd", "block_size", "max_steps", "compile", "fsdp", "shuffle")} == {
        "n_layer": 2, "n_embd": 32, "block_size": 16, "max_steps": 2, "compile": False, "fsdp": True, "shuffle": True}
    assert set(read_log(log_dir)) == {(0, "train"), (1, "train")}
