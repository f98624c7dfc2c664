"""Every setting checked in one place (cli.check_settings over each script's RULES and RELATIONS), checkpoints that
cannot be read, resume that skips them, ranks that must agree on where they start, and HellaSwag's row boundary."""

import dataclasses
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, read_log, run_gpt2

import cli
import evaluate
import fineweb
import gpt2
import hellaswag

SCRIPTS = {"gpt2": gpt2, "hellaswag": hellaswag, "fineweb": fineweb, "evaluate": evaluate}


# --- settings ---


def bad_setting_cases():
    """(script, setting, argv) for every value a rule refuses and every relation's breaking example. A Config field
    without a rule becomes a case of its own, which fails: a new setting cannot be added without saying what it takes."""
    cases = []
    for script, module in SCRIPTS.items():
        for field in dataclasses.fields(module.Config):
            rule = module.RULES.get(field.name)
            if rule is None:
                cases.append(pytest.param(script, field.name, None, id=f"{script}-{field.name}-NO-RULE"))
            for value in rule.bad if rule else ():
                cases.append(pytest.param(script, field.name, [f"--{field.name}={value}"], id=f"{script}-{field.name}={value}"))
        for relation in getattr(module, "RELATIONS", ()):
            argv = [f"--{k}={v}" for k, v in relation.bad.items()]
            cases.append(pytest.param(script, relation.names[0], argv, id=f"{script}-{'+'.join(relation.names)}"))
    return cases


def safe_base(tmp_path):
    """Settings under which a run that got past the checks would fail at once, touching nothing outside tmp_path."""
    missing = tmp_path / "missing"
    return {"gpt2": [f"--data_dir={missing}", f"--log_dir={missing}", "--device=cpu", "--hellaswag_every=0"],
            "hellaswag": [f"--checkpoint={missing}.pt", f"--data_file={missing}.jsonl", "--device=cpu"],
            "fineweb": [f"--data_files={missing}.txt", f"--out_dir={missing}"],
            "evaluate": [f"--checkpoint={missing}.pt", "--device=cpu"]}


def run_in_process(script, argv, capsys):
    """cli.run_cli on the script's own main and Config; returns (exit status, stderr)."""
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(module.main, module.Config(), argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script, name, argv", bad_setting_cases())
def test_every_bad_setting_is_one_line_before_any_work(script, name, argv, tmp_path, monkeypatch, capsys):
    module = SCRIPTS[script]
    assert name in module.RULES, f"{script}.py's Config.{name} has no rule: add one to {script}.RULES"
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(script, cli.merge_settings(safe_base(tmp_path)[script] + argv), capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert name in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []  # nothing written, nothing downloaded
    suggestion = re.search(rf"e\.g\. --{name}=(.*)$", err.strip())
    if suggestion:  # the value the message suggests is one the rule accepts
        cfg = module.Config()
        cli.apply_overrides(cfg, [f"--{name}={suggestion.group(1)}"])
        assert module.RULES[name].holds(getattr(cfg, name)), err


# the issue's list of values that used to run silently or crash, written out here rather than taken from RULES
REFUSED = ["--micro_batch_size=0", "--micro_batch_size=-4", "--total_batch_size=0", "--max_steps=0", "--max_steps=-3",
           "--max_lr=0", "--max_lr=-1e-3", "--min_lr=-1e-5", "--seed=-1", "--seed=4294967296", "--beta1=1", "--beta1=-0.1",
           "--beta2=1.5", "--eps=0", "--eps=-1e-8", "--weight_decay=-0.1", "--keep_checkpoints=-1", "--val_every=-1",
           "--hellaswag_every=-250", "--sample_every=-1", "--checkpoint_every=-1", "--val_tokens=0", "--warmup_steps=-1",
           "--lr_decay_steps=-1", "--grad_clip=-1", "--num_samples=0", "--max_new_tokens=0", "--top_k=0",
           "--temperature=0", "--temperature=-1", "--n_layer=0", "--n_head=-1", "--n_embd=0", "--block_size=0",
           "--vocab_size=0", "--device=gpu", "--dtype=float8", "--fsdp=1 --dtype=float16", "--mode=eval", "--log_dir=",
           "--data_dir=", "--dist_timeout_min=0",
           "--min_lr=1e-3", "--warmup_steps=10 --lr_decay_steps=100 --max_steps=50",
           "--block_size=16 --max_new_tokens=16", "--mode=export", "--total_batch_size=1000 --micro_batch_size=3"]
ACCEPTED = ["--beta1=0", "--min_lr=0", "--warmup_steps=0", "--keep_checkpoints=0", "--val_every=0", "--grad_clip=0",
            "--weight_decay=0", "--seed=0", "--top_k=1", "--dtype=float16", "--min_lr=6e-4", "--max_steps=1",
            "--warmup_steps=10 --lr_decay_steps=40 --max_steps=50", "--block_size=16 --max_new_tokens=16 --sample_every=0",
            "--mode=sample --block_size=16 --max_new_tokens=16", "--mode=export --export_dir=out",
            "--total_batch_size=192 --micro_batch_size=3 --block_size=64", "--warmup_steps=715 --max_steps=100"]


@pytest.mark.parametrize("args", REFUSED)
def test_values_the_issue_lists_are_refused(args):
    cfg = gpt2.Config()
    cli.apply_overrides(cfg, args.split())
    with pytest.raises(cli.UserError):
        gpt2.check_config(cfg)


@pytest.mark.parametrize("args", ACCEPTED)
def test_edge_values_that_work_are_accepted(args):
    cfg = gpt2.Config()
    cli.apply_overrides(cfg, args.split())
    gpt2.check_config(cfg)


def test_existing_messages_are_kept():
    for args, message in [("--n_embd=30 --n_head=4", "n_embd=30 is not divisible by n_head=4"),
                          ("--total_batch_size=100 --micro_batch_size=4 --block_size=16",
                           "total_batch_size=100 is not divisible by .* --total_batch_size=128"),
                          ("--top_k=0", "--top_k=0: must be at least 1"), ("--temperature=0", "must be > 0"),
                          ("--device=gpu", "--device=gpu: expected auto, cpu, cuda or mps"),
                          ("--dtype=fp16", "--dtype=fp16: expected auto, float32, bfloat16 or float16"),
                          ("--mode=generate", "--mode=generate: expected train, sample or export")]:
        cfg = gpt2.Config()
        cli.apply_overrides(cfg, args.split())
        with pytest.raises(cli.UserError, match=message):
            gpt2.check_config(cfg)


def one_line_error(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_script(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_bad_settings_end_to_end_write_nothing(shards, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # gpt2.py with real shards: a zero step count used to train nothing and exit 0
    err = one_line_error(run_script("gpt2", *TINY, f"--data_dir={shards}", "--log_dir=log", "--max_steps=0", cwd=work))
    assert "--max_steps=0: must be at least 1" in err
    # fineweb.py on a local file
    (tmp_path / "corpus.txt").write_text("some text\n")
    err = one_line_error(run_script("fineweb", f"--data_files={tmp_path / 'corpus.txt'}", "--out_dir=out",
                                    "--batch_docs=-1", cwd=work))
    assert "--batch_docs=-1: must be at least 1" in err
    assert os.listdir(work) == []


def test_hellaswag_checks_the_model_before_downloading_the_data(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = hellaswag.expand_aliases(["-m", str(tmp_path / "no_such_model"), f"--cache_dir={cache}"])
    code, err = run_in_process("hellaswag", argv, capsys)
    assert code == 1 and err.startswith("error: -m ") and "no_such_model: that directory does not exist" in err, err
    (tmp_path / "empty_dir").mkdir()
    code, err = run_in_process("hellaswag", [f"--model={tmp_path / 'empty_dir'}", f"--cache_dir={cache}"], capsys)
    assert code == 1 and "empty_dir: that directory holds no config.json" in err, err
    assert not cache.exists()


# --- checkpoints that cannot be read ---


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A log_dir with model_00002.pt and model_00004.pt of a tiny run, and its shards."""
    from conftest import write_test_shards

    root = tmp_path_factory.mktemp("trained")
    data_dir = write_test_shards(str(root / "data"))
    run_gpt2(*TINY, f"--data_dir={data_dir}", f"--log_dir={root / 'log'}", "--max_steps=4", "--checkpoint_every=2",
             "--val_every=2", "--val_tokens=64", "--warmup_steps=2", in_process=True)
    return data_dir, root / "log"


def test_unreadable_checkpoints_are_told_apart(trained, tmp_path):
    _, log_dir = trained
    good = (log_dir / "model_00004.pt").read_bytes()
    marker = tmp_path / "PWNED"
    cases = {"truncated_zip": good[: len(good) // 2], "truncated_header": good[:100], "random": os.urandom(5000),
             "empty": b"", "text": b"not a checkpoint\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(cli.UserError, match="cannot load checkpoint .* truncated, corrupt or not one of ours") as e:
            gpt2.load_checkpoint(str(tmp_path / name))
        assert "could run code" not in str(e.value)
    torch.save({"model": RunsCode(marker), "config": {}, "step": 1}, tmp_path / "code_in_torch_save")
    with open(tmp_path / "code_in_pickle", "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f)
    for name in ("code_in_torch_save", "code_in_pickle"):
        with pytest.raises(cli.UserError, match="refused to load checkpoint .*could run code"):
            gpt2.load_checkpoint(str(tmp_path / name))
    assert not marker.exists()
    torch.save(torch.zeros(3), tmp_path / "a_tensor")
    with pytest.raises(cli.UserError, match="not a checkpoint written by gpt2.py"):
        gpt2.load_checkpoint(str(tmp_path / "a_tensor"))


def copy_log(log_dir, dest, steps):
    dest.mkdir()
    for step in steps:
        shutil.copy(gpt2.checkpoint_path(log_dir, step), dest)
    shutil.copy(log_dir / "log.txt", dest)
    return dest


def test_resume_skips_a_corrupt_newest_checkpoint(trained, tmp_path):
    data_dir, log_dir = trained
    resumed = copy_log(log_dir, tmp_path / "log", [2, 4])
    newest = resumed / "model_00004.pt"
    corrupt = newest.read_bytes()[:5000]
    newest.write_bytes(corrupt)
    args = [*TINY, f"--data_dir={data_dir}", f"--log_dir={resumed}", "--max_steps=4", "--checkpoint_every=2",
            "--init_from=resume"]
    out = run_gpt2(*args, in_process=True).stdout
    assert "warning: skipping" in out and "model_00004.pt" in out and "resuming from" in out and "model_00002.pt" in out
    assert (resumed / "model_00004.pt.unreadable").read_bytes() == corrupt  # kept for a look, under another name
    assert read_log(resumed) == read_log(log_dir)  # steps 2 and 3 again, as the uninterrupted run took them
    out = run_gpt2(*args, in_process=True).stdout  # and the next resume takes the new model_00004.pt, skipping nothing
    assert "skipping" not in out and "model_00004.pt (step 4)" in out


def test_resumed_settings_are_checked_with_the_command_line_on_top(trained):
    data_dir, log_dir = trained
    d = gpt2.Dist(0, 0, 1, torch.device("cpu"))
    before = {n: (log_dir / n).read_bytes() for n in os.listdir(log_dir)}
    for extra, message in [
        # the checkpoint's warmup_steps=2 and max_steps=4 leave no room for 10 decay steps; the defaults would
        ("--lr_decay_steps=10", "--lr_decay_steps=10 after --warmup_steps=2 is longer than the run \\(--max_steps=4\\)"),
        ("--max_steps=3", "--max_steps=3 is before checkpoint .*model_00004.pt, at step 4: nothing to train"),
    ]:
        cfg = gpt2.Config()
        overridden = cli.apply_overrides(cfg, [f"--data_dir={data_dir}", f"--log_dir={log_dir}", "--init_from=resume",
                                               "--device=cpu", extra])
        gpt2.check_command_line(cfg)  # the other settings come from the checkpoint, so main lets this through
        with pytest.raises(cli.UserError, match=message):
            gpt2.starting_point(cfg, overridden, d, print)
    # and a resume that gives only what differs from the checkpoint is not held to the defaults of the rest
    # (micro_batch_size=64 x block_size=1024 would refuse this batch; the checkpoint's 4 x 16 divide it)
    cfg = gpt2.Config()
    overridden = cli.apply_overrides(cfg, [f"--log_dir={log_dir}", "--init_from=resume", "--total_batch_size=256"])
    gpt2.check_command_line(cfg)
    cfg, ckpt, _ = gpt2.starting_point(cfg, overridden, d, print)
    assert (cfg.total_batch_size, cfg.micro_batch_size, cfg.block_size, ckpt["step"]) == (256, 4, 16, 4)
    assert {n: (log_dir / n).read_bytes() for n in os.listdir(log_dir)} == before


def test_only_checkpoint_unreadable_stops_and_changes_nothing(trained, tmp_path):
    data_dir, log_dir = trained
    resumed = copy_log(log_dir, tmp_path / "log", [2])
    (resumed / "model_00002.pt").write_bytes(os.urandom(3000))
    before = {n: (resumed / n).read_bytes() for n in os.listdir(resumed)}
    err = one_line_error(run_gpt2(*TINY, f"--data_dir={data_dir}", f"--log_dir={resumed}", "--init_from=resume",
                                  check=False, in_process=True))
    assert "cannot load checkpoint" in err and "model_00002.pt" in err
    assert {n: (resumed / n).read_bytes() for n in os.listdir(resumed)} == before


def torchrun(*args, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, os.path.join(ROOT, "gpt2.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_torchrun_restart_loop_resumes_past_a_corrupt_checkpoint(trained, tmp_path):
    data_dir, log_dir = trained
    resumed = copy_log(log_dir, tmp_path / "log", [2, 4])
    (resumed / "model_00004.pt").write_bytes(os.urandom(4000))
    proc = torchrun(*TINY, f"--data_dir={data_dir}", f"--log_dir={resumed}", "--max_steps=4", "--checkpoint_every=2",
                    "--init_from=resume", extra=["--standalone", "--nproc_per_node=2", "--max-restarts=2"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("warning: skipping") == 1 and "resuming from" in out, out  # rank 0 speaks, once: no restart
    assert (resumed / "model_00004.pt.unreadable").exists()
    assert gpt2.load_checkpoint(str(resumed / "model_00004.pt"))["world_size"] == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_that_see_different_checkpoints_stop(trained, tmp_path):
    # two nodes of one rank each, as on a cluster whose log_dir is on each node's own disk
    data_dir, log_dir = trained
    views = [copy_log(log_dir, tmp_path / "node0", [2, 4]), copy_log(log_dir, tmp_path / "node1", [2])]
    before = [{n: (v / n).read_bytes() for n in os.listdir(v)} for v in views]
    port = free_port()
    procs = [torchrun(*TINY, f"--data_dir={data_dir}", f"--log_dir={view}", "--max_steps=6", "--init_from=resume",
                      extra=["--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}", "--rdzv_backend=c10d",
                             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=disagree"]) for i, view in enumerate(views)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode != 0, out
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, out
        assert "model_00004.pt" in errors[0] and "model_00002.pt" in errors[0] and "shares" in errors[0], errors
    assert [{n: (v / n).read_bytes() for n in os.listdir(v)} for v in views] == before  # no step was taken


# --- HellaSwag: an example that fits the block exactly ---


def test_hellaswag_example_that_fits_block_size_exactly_is_not_cut():
    from test_hellaswag import tiny_gpt

    model = tiny_gpt(block_size=128)
    torch.manual_seed(1)
    endings = [torch.randint(0, 50257, (n,)).tolist() for n in (20, 7, 13, 1)]
    for context_len, cut in ((109, 0), (110, 1)):  # 109 + 20 - 1 = 128 positions: fits; one more token: one cut
        context = torch.randint(0, 50257, (context_len,)).tolist()
        example = gpt2.HellaSwagExample(context, endings, 0)
        fitted_context, fitted_endings = gpt2.fit_example(example, 128)
        assert fitted_context == context[cut:] and fitted_endings == endings
        _, pos, *_ = gpt2.pack_examples([example], 128, "cpu")
        assert pos.max().item() == 127
        # the reference: each ending in a row of its own, context + ending[:-1], scored with F.cross_entropy
        expected = []
        with torch.no_grad():
            for ending in endings:
                row = torch.tensor([context[cut:] + ending[:-1]])
                assert row.size(1) <= 128
                logits, _ = model(row)
                predicted = logits[0, len(context) - cut - 1:, :50257]  # (len(ending), V)
                expected.append(F.cross_entropy(predicted.double(), torch.tensor(ending), reduction="sum").item())
        sums, counts = gpt2.score_endings(model, [example], "cpu")
        assert counts.tolist() == [[20, 7, 13, 1]]
        assert sums[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_errors_of_ranks_that_stop_together_stay_one_line_each(tmp_path):
    # every rank of a torchrun job prints its error to the same pipe, unbuffered (PYTHONUNBUFFERED=1, as torchrun
    # jobs often run): each line must reach it whole, never spliced with another rank's. Two processes fail over and
    # over for the same half second, so that their writes meet.
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import cli\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Config:\n"
        "    debug: bool = False\n"
        "def main(cfg, overridden):\n"
        "    raise cli.UserError('cannot write checkpoint ' + 'x' * 300)\n"
        "start = float(sys.argv[1])\n"
        "time.sleep(max(0, start - time.time()))\n"
        "while time.time() < start + 0.5:\n"
        "    try:\n"
        "        cli.run_cli(main, Config(), [])\n"
        "    except SystemExit:\n"
        "        pass\n")
    start = time.time() + 2  # both have started by then
    run = f"{sys.executable} {script} {start}"
    out = subprocess.run(["bash", "-c", f"{run} & {run} & wait"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=120)
    lines = out.stderr.splitlines()
    assert len(lines) > 100
    assert all(line == "error: cannot write checkpoint " + "x" * 300 for line in lines)
