"""evaluate.py and bits per byte: our model through lm-evaluation-harness against the harness's own `hf` model on our
export, bpb against transformers' GPT-2 and the bytes of the decoded text, --log_dir on a run's checkpoints, and the
one-line errors. The harness's tasks here are defined in a temporary directory on a small local jsonl."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY
from test_hellaswag import ROWS, offline_env, write_jsonl

import evaluate
import gpt2
import plot
from cli import merge_settings

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Everything here is local: the harness and transformers are told not to look for the Hub."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield

DOCS = [  # the fields of all four tasks below in one file
    {"goal": "To open a jar of pickles,", "sol1": "twist the lid counterclockwise until it pops.",
     "sol2": "bake the jar in a hot oven for an hour.", "label": 0,
     "text": "The cat sat on the warm mat by the kitchen window and fell asleep in the afternoon sun",
     "question": "What color is the sky on a clear day?", "answer": "blue"},
    {"goal": "To keep bread fresh for a few days,", "sol1": "leave it outside in the rain.",
     "sol2": "store it in a sealed bag in a cool place.", "label": 1,
     "text": "She opened the old wooden door and walked into the quiet room where nobody had been for years",
     "question": "How many legs does a dog have?", "answer": "four"},
    {"goal": "To cool a hot drink quickly,", "sol1": "add a few ice cubes and stir.", "sol2": "put it back on the stove.",
     "label": 0, "text": "Rain fell all night on the small town by the river, and by morning the streets were rivers too",
     "question": "What do bees make?", "answer": "honey"},
]
TASKS = {
    "tiny_choice": {"output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:",
                    "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "tiny_word": {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                  "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                  "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                  {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                     {"metric": "bits_per_byte"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}
BLOCK_SIZE = 16  # shorter than most prompts: the harness's truncation and rolling windows are exercised


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A directory of task YAML (JSON is YAML) on a local jsonl, as a user passes it with --include_path."""
    path = tmp_path_factory.mktemp("tasks")
    write_jsonl(path / "docs.jsonl", DOCS)
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path / "docs.jsonl")}},
                "test_split": "test", **spec}
        (path / f"{name}.yaml").write_text(json.dumps(task, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random GPT with our padded vocabulary (50304), saved as gpt2.py saves it, and its export."""
    torch.manual_seed(0)
    cfg = gpt2.Config(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK_SIZE)
    model = gpt2.GPT(gpt2.model_config(cfg))
    with torch.no_grad():  # larger than GPT-2's init, so that the choices' scores are far apart
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    path = str(tmp_path_factory.mktemp("run") / "model_00002.pt")
    gpt2.save_checkpoint(path, {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 2})
    export_dir = str(tmp_path_factory.mktemp("export") / "hf")
    gpt2.export_hf(gpt2.load_model(path), export_dir)  # what gpt2.py --mode=export does
    return path, export_dir


@pytest.fixture(scope="module")
def harness_hf(task_dir, checkpoint):
    """The harness's own hf model on the export: results and per-request responses."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_dir, include_defaults=False)
    lm = HFLM(pretrained=checkpoint[1], device="cpu", batch_size=2)
    return simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0, log_samples=True)


def test_requests_score_as_the_harness_hf_model(checkpoint, harness_hf):
    """Every request the hf model answered, asked of ours: log-likelihoods to 1e-4, the same greedy flags and
    the same generated text."""
    from lm_eval.api.instance import Instance

    lm = evaluate.GPTLM(gpt2.load_model(checkpoint[0]), torch.device("cpu"), nullcontext, batch_size=3)
    kinds = {"tiny_choice": "loglikelihood", "tiny_word": "loglikelihood", "tiny_rolling": "loglikelihood_rolling",
             "tiny_gen": "generate_until"}
    for task, kind in kinds.items():
        asked, expected = [], []
        for sample in harness_hf["samples"][task]:
            for args, resps in zip(sample["arguments"], sample["resps"], strict=True):
                asked.append(Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0))
                expected.append(resps[0])
        got = getattr(lm, kind)(asked)
        for ours, theirs in zip(got, expected, strict=True):
            if kind == "loglikelihood":
                assert ours[0] == pytest.approx(theirs[0], abs=1e-4) and ours[1] == theirs[1], task
            elif kind == "loglikelihood_rolling":
                assert ours == pytest.approx(theirs, abs=1e-4), task
            else:
                assert ours == theirs, task


def test_command_on_two_ranks_equals_the_harness_hf_model(checkpoint, task_dir, harness_hf, tmp_path):
    """evaluate.py under torchrun (3 documents per task over 2 ranks), its --output against the hf model's run. Two of
    the tasks (the requests of all four are compared above): multiple choice, and perplexity over rolling windows."""
    tasks = ["tiny_choice", "tiny_rolling"]
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "evaluate.py"), f"--checkpoint={checkpoint[0]}", f"--tasks={','.join(tasks)}",
                           f"--include_path={task_dir}", f"--output={out}", "--bootstrap_iters=0", "--device=cpu",
                           "--batch_size=2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("|tiny_choice ") == 1  # rank 0 prints the harness's table, once
    ours, theirs = json.loads(out.read_text()), harness_hf["results"]
    assert set(ours["configs"]) == set(tasks) and "samples" not in ours
    for task in tasks:
        for metric, value in theirs[task].items():
            if metric in ("acc,none", "acc_norm,none", "exact_match,none", "sample_len"):
                assert ours["results"][task][metric] == value, (task, metric)
            elif isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_hugging_face_directory_equals_the_harness_hf_model(checkpoint, task_dir, harness_hf, tmp_path, capsys):
    """-m on the export itself (loaded as our GPT, in this process): the hf model's metrics on all four tasks."""
    out = tmp_path / "results.json"
    evaluate.run_cli(evaluate.main, evaluate.Config(), evaluate.expand_aliases([
        "-m", checkpoint[1], f"--tasks={','.join(TASKS)}", f"--include_path={task_dir}", f"--output={out}",
        "--bootstrap_iters=0", "--device=cpu"]))
    assert "|tiny_gen" in capsys.readouterr().out
    ours = json.loads(out.read_text())
    assert ours["config"]["model"] == checkpoint[1]
    for task in TASKS:
        for metric, value in harness_hf["results"][task].items():
            if isinstance(value, float) and "_stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


# --- bits per byte, and evaluation after the fact ---

TEXTS = ["Bits per byte counts the UTF-8 bytes of the text, so it is the same for any tokenizer.",
         "Naïve café owners in Zürich serve crème brûlée — and 日本語 menus — to tourists 🙂 every day.",
         "A short one.", "The quick brown fox jumps over the lazy dog, again and again, until the dog gets up."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One optimizer step of a tiny GPT with GPT-2's vocabulary on GPT-2 tokens, validating before and after it, with
    its checkpoint (gpt2.py in this process: the same code as its command line, without a second start-up). Returns
    (log_dir, the val tokens, (loss, bpb) computed independently for the checkpoint)."""
    root = tmp_path_factory.mktemp("bpb")
    enc = gpt2.get_tokenizer()
    tokens = []
    for text in TEXTS * 3:
        tokens += [enc.eot_token] + enc.encode_ordinary(text)  # documents start with <|endoftext|>, as fineweb.py writes
    data_dir = root / "data"
    data_dir.mkdir()
    for split in ("val", "train"):
        np.save(data_dir / f"edufineweb_{split}_000000.npy", np.array(tokens, dtype=np.uint16))
    log_dir = str(root / "log")
    gpt2.run_cli(gpt2.main, gpt2.Config(), merge_settings([*TINY, "--vocab_size=50257", f"--data_dir={data_dir}",
                 f"--log_dir={log_dir}", "--max_steps=1", "--val_every=1", "--checkpoint_every=1", "--max_lr=1e-2"]))
    expected = independent_val(os.path.join(log_dir, "model_00001.pt"), tokens, BLOCK_SIZE, root)
    return log_dir, tokens, expected


def independent_val(checkpoint_path, tokens, T, tmp_path):
    """(loss, bpb) from transformers' GPT-2 on the checkpoint's export: the val targets cut into sequences of T, and
    the bytes counted by decoding the targets that are not <|endoftext|> with the export's own tokenizer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    gpt2.export_hf(gpt2.load_model(checkpoint_path), str(tmp_path / "export"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    losses, targets = [], []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, T):
            y = torch.tensor(tokens[start + 1:start + T + 1])
            x = torch.tensor(tokens[start:start + len(y)])
            losses.append(F.cross_entropy(hf(x[None]).logits[0].double(), y, reduction="none"))
            targets.append(y)
    losses, targets = torch.cat(losses), torch.cat(targets)
    text = targets != tokenizer.eos_token_id
    n_bytes = len(tokenizer.decode(targets[text].tolist()).encode("utf-8"))
    return losses.mean().item(), losses[text].sum().item() / (math.log(2) * n_bytes)


def log_lines(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return f.read().splitlines()


def test_training_logs_bpb_beside_val(trained):
    log_dir, _, (loss, bpb) = trained
    logged = {(int(s), k): float(v) for s, k, v in (line.split() for line in log_lines(log_dir))}
    assert {(0, "val"), (0, "bpb"), (1, "val"), (1, "bpb")} <= set(logged)
    assert logged[(1, "val")] == pytest.approx(loss, abs=2e-6)
    assert logged[(1, "bpb")] == pytest.approx(bpb, abs=2e-6)


def run_evaluate_in_process(capsys, *argv):
    evaluate.run_cli(evaluate.main, evaluate.Config(), list(argv))
    return capsys.readouterr().out


def test_log_dir_evaluates_a_run_trained_without_evaluation(trained, task_dir, tmp_path, capsys):
    log_dir, _, (loss, bpb) = trained
    quiet = tmp_path / "quiet"  # the same run as if trained with --val_every=0: its log holds train lines only
    quiet.mkdir()
    shutil.copy(os.path.join(log_dir, "model_00001.pt"), quiet)
    train_lines = [line for line in log_lines(log_dir) if line.split()[1] == "train"]
    (quiet / "log.txt").write_text("\n".join(train_lines) + "\n")
    hella_file = write_jsonl(tmp_path / "hellaswag_val.jsonl", ROWS)

    settings = [f"--log_dir={quiet}", f"--hellaswag_file={hella_file}", "--device=cpu", "--tasks=tiny_choice",
                f"--include_path={task_dir}", "--bootstrap_iters=0"]
    out = run_evaluate_in_process(capsys, *settings)
    assert "model_00001.pt (step 1) | val loss" in out and "|tiny_choice|" in out.replace(" ", "")
    first = log_lines(quiet)
    assert first[:len(train_lines)] == train_lines  # appended, nothing rewritten
    added = {(int(s), k): float(v) for s, k, v in (line.split() for line in first[len(train_lines):])}
    assert set(added) == {(1, "val"), (1, "bpb"), (1, "hella"), (1, "tiny_choice/acc"), (1, "tiny_choice/acc_norm")}
    assert all(round(3 * added[(1, f"tiny_choice/{m}")], 4) in (0, 1, 2, 3) for m in ("acc", "acc_norm"))  # 3 documents
    assert added[(1, "val")] == pytest.approx(loss, abs=2e-6) and added[(1, "bpb")] == pytest.approx(bpb, abs=2e-6)
    model = gpt2.load_model(str(quiet / "model_00001.pt"))
    expected = gpt2.evaluate_hellaswag(model, gpt2.load_hellaswag("val", hella_file), torch.device("cpu"))
    assert added[(1, "hella")] == round(expected["acc_norm"], 4)
    assert plot.read_log(quiet / "log.txt")["bpb"] == ([1], [added[(1, "bpb")]])
    from PIL import Image

    with Image.open(quiet / "log.png") as img:
        assert img.width == 3 * 650  # three panels: loss, bits per byte, HellaSwag

    # again with the same settings: skipped; with other settings: evaluated again, the new values in the old ones' place
    out = run_evaluate_in_process(capsys, *settings)
    assert "skipped" in out and log_lines(quiet) == first
    out = run_evaluate_in_process(capsys, f"--log_dir={quiet}", f"--hellaswag_file={hella_file}", "--device=cpu",
                                  "--val_tokens=40")
    again = log_lines(quiet)
    changed = [i for i, (old, new) in enumerate(zip(first, again, strict=True)) if old != new]
    assert [again[i].split()[:2] for i in changed] == [["1", "val"], ["1", "bpb"]]
    assert float(again[changed[0]].split()[2]) != added[(1, "val")]  # 40 targets, not all of them
    assert "replaced in log.txt by this evaluation: val " in out


def val_tokens_of(texts):
    enc = gpt2.get_tokenizer()
    return [t for text in texts for t in [enc.eot_token] + enc.encode_ordinary(text)]


def test_log_dir_evaluated_again_with_other_data_replaces_values(trained, tmp_path, capsys):
    """--log_dir twice with --data_dir at two other val sets, then the first again: log.txt holds one value per step and
    metric, each time the latest evaluation's (checked against transformers on that set), in the place of training's
    line, a line printed says what was replaced, and nothing else in log.txt changes."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = log_lines(run)
    checkpoint = str(run / "model_00001.pt")
    sets = {"a": val_tokens_of(TEXTS[:2] * 2), "b": val_tokens_of(TEXTS[::-1] * 2)}
    expected = {}
    for name, tokens in sets.items():
        os.makedirs(tmp_path / name / "export")
        np.save(tmp_path / name / "edufineweb_val_000000.npy", np.array(tokens, dtype=np.uint16))
        expected[name] = independent_val(checkpoint, tokens, BLOCK_SIZE, tmp_path / name)

    previous = {(int(s), k): v for s, k, v in (line.split() for line in before)}
    for name in ("a", "b", "a"):  # "a" again: evaluated, not skipped, since "b" replaced its values
        out = run_evaluate_in_process(capsys, f"--log_dir={run}", f"--data_dir={tmp_path / name}", "--hellaswag=0",
                                      "--device=cpu")
        lines = log_lines(run)
        keys = [(int(s), k) for s, k, _ in (line.split() for line in lines)]
        assert len(keys) == len(set(keys)) == len(before)  # one value per (step, metric), in the lines training wrote
        assert [line for line in lines if line.split()[:2] not in (["1", "val"], ["1", "bpb"])] == \
            [line for line in before if line.split()[:2] not in (["1", "val"], ["1", "bpb"])]
        logged = {(int(s), k): v for s, k, v in (line.split() for line in lines)}
        assert float(logged[(1, "val")]) == pytest.approx(expected[name][0], abs=2e-6)
        assert float(logged[(1, "bpb")]) == pytest.approx(expected[name][1], abs=2e-6)
        assert (f"model_00001.pt (step 1) | replaced in log.txt by this evaluation: val {previous[(1, 'val')]} -> "
                f"{logged[(1, 'val')]}, bpb {previous[(1, 'bpb')]} -> {logged[(1, 'bpb')]}") in out
        previous = logged
    assert expected["a"][0] != pytest.approx(expected["b"][0], abs=1e-3)  # the two sets are told apart
    out = run_evaluate_in_process(capsys, f"--log_dir={run}", f"--data_dir={tmp_path / 'a'}", "--hellaswag=0",
                                  "--device=cpu")
    assert "skipped" in out and log_lines(run) == lines
    assert not os.path.exists(run / "log.txt.tmp")


def test_log_dir_without_the_file_names_its_own_setting(trained, tmp_path, capsys):
    """evaluate.py offline (a fresh process, see offline_env), and with a file that is not there: its errors name
    --hellaswag_file, not hellaswag.py's --data_file."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--log_dir={run}", "--device=cpu"],
                          capture_output=True, text=True, env=dict(os.environ, **offline_env(tmp_path / "cache")), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot download "), proc.stderr
    assert "pass --hellaswag_file=PATH" in proc.stderr and "--data_file" not in proc.stderr, proc.stderr
    err = one_line_error(capsys, f"--log_dir={run}", "--device=cpu", f"--hellaswag_file={tmp_path / 'nope.jsonl'}")
    assert f"--hellaswag_file={tmp_path / 'nope.jsonl'} does not exist" in err and "--data_file" not in err


def test_log_dir_skips_what_training_logged(trained, tmp_path, capsys):
    log_dir = trained[0]
    run = tmp_path / "run"
    shutil.copytree(log_dir, run)
    before = log_lines(run)
    out = run_evaluate_in_process(capsys, f"--log_dir={run}", "--hellaswag=0", "--device=cpu")
    assert "skipped" in out and log_lines(run) == before


def test_log_dir_reports_progress_over_the_checkpoints(trained, tmp_path, capsys):
    """A line per checkpoint, skipped or evaluated, with how many of the run's two checkpoints are done, the time
    elapsed and the ETA: unknown while nothing was evaluated (a skipped checkpoint says nothing of the speed)."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.copy(run / "model_00001.pt", run / "model_00002.pt")  # a later checkpoint, which training did not evaluate
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["model_00001.pt", "model_00002.pt"]
    out = run_evaluate_in_process(capsys, f"--log_dir={run}", "--hellaswag=0", "--device=cpu")
    lines = [line for line in out.splitlines() if "| checkpoint " in line]
    assert len(lines) == 2, out
    assert re.fullmatch(r"model_00001\.pt: evaluated already with these settings, skipped \| checkpoint 1/2 "
                        r"\(50\.0%\) \| elapsed 0:00:\d\d \| eta \?", lines[0]), lines[0]
    assert re.fullmatch(r"model_00002\.pt \(step 2\) \| evaluated \| checkpoint 2/2 \(100\.0%\) \| "
                        r"elapsed 0:00:\d\d \| eta 0:00:00", lines[1]), lines[1]


# --- errors: one line, before any download ---


def one_line_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.run_cli(evaluate.main, evaluate.Config(), evaluate.expand_aliases(list(argv)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_errors_are_one_line(tmp_path, capsys, checkpoint, task_dir):
    assert "pass exactly one of" in one_line_error(capsys)
    assert "pass exactly one of" in one_line_error(capsys, "-m", "gpt2", f"--log_dir={tmp_path}")
    err = one_line_error(capsys, f"--checkpoint={checkpoint[0]}", f"--include_path={tmp_path / 'nowhere'}")
    assert "--include_path" in err and "no such directory" in err
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    assert "not one of ours" in one_line_error(capsys, f"--checkpoint={tmp_path / 'notes.pt'}")
    small = gpt2.Config(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=128)
    gpt2.save_checkpoint(str(tmp_path / "model_00001.pt"), {"model": gpt2.GPT(gpt2.model_config(small)).state_dict(),
                                                          "config": dataclasses.asdict(small), "step": 1})
    assert "vocab_size=128, not GPT-2's" in one_line_error(capsys, f"--checkpoint={tmp_path / 'model_00001.pt'}")
    from transformers import GPT2Config

    GPT2Config(vocab_size=1000, n_layer=1, n_head=1, n_embd=8).save_pretrained(tmp_path / "hf")
    err = one_line_error(capsys, "-m", str(tmp_path / "hf"), "--tasks=tiny_choice", f"--include_path={task_dir}")
    assert "vocab_size=1000, not GPT-2's" in err
    assert "no checkpoints" in one_line_error(capsys, f"--log_dir={tmp_path / 'hf'}")


def test_without_the_harness_the_command_says_how_to_install_it(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "TemplateLM", None)  # what evaluate.py holds when `import lm_eval` failed
    assert "pip install lm_eval" in one_line_error(capsys, f"--checkpoint={checkpoint[0]}")


def test_unknown_task_is_named_from_the_harness_list(task_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_dir, include_defaults=False)
    expected = r"unknown task 'tiny_choise' \(did you mean tiny_choice, .*\): `lm-eval ls tasks` lists"
    with pytest.raises(gpt2.UserError, match=expected):
        evaluate.check_tasks(["tiny_word", "tiny_choise"], manager)
    evaluate.check_tasks(list(TASKS), manager)
