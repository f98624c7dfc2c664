"""The training script end to end through its command line: accumulation, torchrun ranks, resume, overrides.

A single-process run goes through gpt2.py's command line inside the test process (conftest.gpt2_here), seconds cheaper
than a fresh one; ranks run under torchrun, and one bad setting and the compiled run go through a real `python gpt2.py`.
"""

import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, read_log, run_gpt2, write_shards, write_test_shards

from gpt2 import list_checkpoints, load_checkpoint

T = 16  # TINY's block_size


def train(shards, log_dir, *extra, ranks=0, check=True):
    args = [*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--warmup_steps=2", "--max_steps=6",
            "--val_every=3", "--val_tokens=128", "--checkpoint_every=3", "--max_lr=3e-3", *extra]
    return run_gpt2(*args, torchrun_ranks=ranks, check=check, in_process=not ranks)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(shards, log_dir) of one uninterrupted 6-step run, checkpoints at steps 3 and 6: the run that the resume tests
    must log again, and a log_dir with checkpoints for the tests that refuse one. A test that writes copies it first."""
    root = tmp_path_factory.mktemp("straight")
    data_dir = write_test_shards(str(root / "data"))  # the shards fixture's tokens
    train(data_dir, root / "log")
    return data_dir, root / "log"


def final_weights(log_dir):
    step, path = list_checkpoints(log_dir)[-1]
    return step, load_checkpoint(path)["model"]


def assert_logs_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=atol), key


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_train_and_val_loss_fall_on_learnable_data(tmp_path):
    # counting upwards mod 128, with every tenth token random: learnable, unlike the shards fixture's noise
    rng = np.random.default_rng(0)
    stream = np.arange(20000) % 128
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(0, 128, noise.sum())
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x_val_000000.npy", stream[:2000].astype(np.uint16))
    np.save(data / "x_train_000001.npy", stream[2000:].astype(np.uint16))
    train(data, tmp_path / "log", "--max_steps=30", "--val_every=10", "--checkpoint_every=0", "--total_batch_size=128")
    log = read_log(tmp_path / "log")
    assert log[(0, "train")] == pytest.approx(math.log(128), abs=0.1)
    assert sum(log[(s, "train")] for s in range(25, 30)) / 5 < math.log(128) - 0.5
    assert log[(0, "val")] > log[(10, "val")] > log[(20, "val")] > log[(30, "val")]


def test_gradient_accumulation_equals_the_big_batch(shards, tmp_path):
    big = tmp_path / "big"
    accum = tmp_path / "accum"
    train(shards, big, "--micro_batch_size=4", f"--total_batch_size={4 * T}")
    train(shards, accum, "--micro_batch_size=2", f"--total_batch_size={4 * T}")  # 2 micro-steps
    # val reads the same first 2 * micro-batch windows: compare only the train losses and the weights
    log_big, log_accum = read_log(big), read_log(accum)
    train_only = lambda log: {k: v for k, v in log.items() if k[1] == "train"}
    assert_logs_close(train_only(log_big), train_only(log_accum), atol=2e-6)
    assert final_weights(big)[0] == final_weights(accum)[0] == 6
    assert_weights_close(final_weights(big)[1], final_weights(accum)[1], atol=1e-5)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_accumulation_and_their_checkpoint_resumes_on_one(shards, tmp_path):
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    # 150 val tokens: 10 sequences (the last of 6 tokens), 5 per rank in 3 micro-batches of 2, the last padded
    batch = ["--micro_batch_size=2", f"--total_batch_size={4 * T}", "--val_tokens=150"]
    train(shards, one, *batch)  # 2 micro-steps
    train(shards, two, *batch, ranks=2)  # 1 on each rank
    assert_logs_close(read_log(one), read_log(two), atol=1e-5)
    assert_weights_close(final_weights(one)[1], final_weights(two)[1], atol=1e-5)

    # the two ranks' step-3 checkpoint goes on in one process, as if they had stopped after writing it
    moved.mkdir()
    for name in ("model_00003.pt", "log.txt"):
        shutil.copy(two / name, moved / name)
    out = train(shards, moved, *batch, "--init_from=resume").stdout
    assert "written by 2 ranks, now 1" in out
    assert_logs_close(read_log(one), read_log(moved), atol=1e-5)
    assert_weights_close(final_weights(one)[1], final_weights(moved)[1], atol=1e-5)


def test_resume_is_bit_identical(straight, tmp_path):
    shards, straight = straight
    resumed = tmp_path / "resumed"
    train(shards, resumed, "--max_steps=3")  # stops after the step-3 checkpoint...
    out = train(shards, resumed, "--init_from=resume", "--max_steps=6").stdout  # ...and goes on to 6
    assert "resuming from" in out and "model_00003.pt" in out
    with open(straight / "log.txt") as a, open(resumed / "log.txt") as b:
        assert a.read() == b.read()
    ckpt_a, ckpt_b = (load_checkpoint(d / "model_00006.pt") for d in (straight, resumed))
    for name in ckpt_a["model"]:
        assert torch.equal(ckpt_a["model"][name], ckpt_b["model"][name]), name
    assert ckpt_a["loader"] == ckpt_b["loader"]
    assert ckpt_a["optimizer"]["state"][0]["step"] == ckpt_b["optimizer"]["state"][0]["step"] == 6


def test_resume_from_a_checkpoint_path_after_an_interruption(straight, tmp_path):
    shards, straight = straight
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    # as if killed between the step-3 and step-6 checkpoints: the log has run ahead of the checkpoint
    os.remove(interrupted / "model_00006.pt")
    train(shards, interrupted, f"--init_from={interrupted / 'model_00003.pt'}")
    with open(straight / "log.txt") as a, open(interrupted / "log.txt") as b:
        assert a.read() == b.read()


def test_checkpoint_holds_clean_plain_state(straight):
    _, log_dir = straight
    ckpt = torch.load(log_dir / "model_00003.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert ckpt["config"]["n_layer"] == 2 and ckpt["config"]["max_steps"] == 6
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["loader"] == {"position": 3 * 2 * 4 * T}  # 3 steps of 2 micro-steps of 4 x T tokens
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}


def test_resume_without_checkpoint_starts_from_scratch(shards, tmp_path):
    out = train(shards, tmp_path / "log", "--init_from=resume", "--max_steps=1").stdout
    assert "no checkpoint in" in out and "starting from scratch" in out
    assert (tmp_path / "log" / "model_00001.pt").exists()


def test_scratch_run_refuses_a_log_dir_with_checkpoints(straight, tmp_path):
    shards, straight = straight
    shutil.copytree(straight, tmp_path / "log")
    before = (tmp_path / "log" / "model_00003.pt").read_bytes()
    proc = train(shards, tmp_path / "log", check=False)
    assert proc.returncode == 1
    assert "already holds checkpoints" in proc.stderr and "--init_from=resume" in proc.stderr
    assert (tmp_path / "log" / "model_00003.pt").read_bytes() == before


def one_line_error(*args, in_process=True):
    proc = run_gpt2(*args, check=False, in_process=in_process)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_override_errors():
    # once in a real process: exit status 1 and this one line is all the shell sees on stderr (no traceback, no warning)
    err = one_line_error("--n_layers=4", in_process=False)
    assert "unknown setting 'n_layers': did you mean n_layer?" in err
    assert "--max_lr=fast: expected a float" in one_line_error("--max_lr=fast")
    assert "--n_layer=2.5: expected an int" in one_line_error("--n_layer=2.5")
    assert "--compile=maybe: expected 0, 1, true or false" in one_line_error("--compile=maybe")
    assert "write --name=value" in one_line_error("max_lr=1")


def test_config_errors(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", f"--log_dir={tmp_path / 'log'}"]
    err = one_line_error(*common, "--n_embd=30", "--n_head=4")
    assert "n_embd=30 is not divisible by n_head=4" in err
    err = one_line_error(*common, "--total_batch_size=100")
    assert "total_batch_size=100 is not divisible by" in err and "--total_batch_size=128" in err
    err = one_line_error(*common, f"--init_from={tmp_path / 'missing.pt'}")
    assert "missing.pt: no such checkpoint" in err
    assert "no train shards" in one_line_error(*TINY, f"--data_dir={tmp_path}", f"--log_dir={tmp_path / 'log'}")


def test_checkpoint_conflicting_with_overrides_is_refused(straight, tmp_path):
    shards, straight = straight
    shutil.copytree(straight, tmp_path / "log")
    proc = train(shards, tmp_path / "log", "--init_from=resume", "--n_embd=64", check=False)
    assert proc.returncode == 1
    assert "--n_embd=64 conflicts with checkpoint" in proc.stderr and "n_embd=32" in proc.stderr


@pytest.mark.slow
def test_compile_keeps_validation_hellaswag_and_sampling_working(tmp_path):
    # build-nanogpt's torch.compile breaks its HellaSwag and sampling; here they run on the uncompiled module
    from test_hellaswag import ROWS, write_jsonl

    data = tmp_path / "data"
    write_shards(data, [3000], "val", vocab_size=50257, seed=1)
    write_shards(data, [9000], "train", vocab_size=50257, seed=2, start_index=1)
    hella = write_jsonl(tmp_path / "hellaswag_val.jsonl", ROWS)
    common = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--micro_batch_size=2", "--device=cpu",
              "--total_batch_size=128", "--max_steps=2", "--val_every=1", "--val_tokens=256", "--hellaswag_every=1",
              f"--hellaswag_file={hella}", "--sample_every=1", "--num_samples=2", "--max_new_tokens=4",
              "--checkpoint_every=0", f"--data_dir={data}"]
    outputs = {}
    for flag in (0, 1):  # eager in this process; compiled in a fresh one, where no other test has compiled anything
        outputs[flag] = run_gpt2(*common, f"--compile={flag}", f"--log_dir={tmp_path / str(flag)}",
                                 in_process=not flag).stdout
    eager, compiled = read_log(tmp_path / "0"), read_log(tmp_path / "1")
    assert {kind for _, kind in compiled} == {"train", "val", "bpb", "hella"}
    assert_logs_close(compiled, eager, atol=1e-4)
    samples = lambda out: [line for line in out.splitlines() if line.startswith("sample ")]
    assert len(samples(outputs[1])) == 3 * 2  # at steps 0, 1 and 2
    assert samples(outputs[1]) == samples(outputs[0])
