"""--dtype=float16 with a GradScaler (GPUs without bfloat16: T4, V100), run on the CPU's float16 autocast: it trains
like float32, resumes exactly with the scaler's state, and a step whose gradients overflow is skipped, not failed."""

import os

import numpy as np
import pytest
import torch
from conftest import TINY, read_log, run_gpt2

import gpt2

RUN = [*TINY, "--max_steps=6", "--checkpoint_every=3", "--val_every=3", "--max_lr=1e-2", "--warmup_steps=2"]


def run(*args):
    """gpt2.py with RUN and args, through its command line in this process (conftest.gpt2_here)."""
    return run_gpt2(*RUN, *args, in_process=True)


@pytest.fixture(scope="module")
def pattern_shards(tmp_path_factory):
    """Tokens in a fixed cycle of 17: a corpus a tiny model learns in a few steps, so that the loss clearly falls."""
    data_dir = tmp_path_factory.mktemp("pattern")
    cycle = np.arange(6000) % 17 * 7 % 128
    np.save(data_dir / "edufineweb_val_000000.npy", cycle[:2000].astype(np.uint16))
    np.save(data_dir / "edufineweb_train_000001.npy", cycle.astype(np.uint16))
    return str(data_dir)


def test_float16_trains_as_float32_and_resumes_exactly(pattern_shards, tmp_path):
    runs = {name: tmp_path / name for name in ("fp32", "fp16", "resumed")}
    run(f"--data_dir={pattern_shards}", f"--log_dir={runs['fp32']}", "--dtype=float32")
    out = run(f"--data_dir={pattern_shards}", f"--log_dir={runs['fp16']}", "--dtype=float16").stdout
    assert "float16 with a GradScaler" in out
    fp32, fp16 = read_log(runs["fp32"]), read_log(runs["fp16"])
    assert fp16.keys() == fp32.keys()
    for key in fp32:
        assert fp16[key] == pytest.approx(fp32[key], abs=5e-3), key
    assert fp16[(5, "train")] < fp16[(0, "train")] - 1  # it learns

    # the step-3 checkpoint holds the scaler, and a resume from it logs what the uninterrupted run logged
    ckpt = gpt2.load_checkpoint(str(runs["fp16"] / "model_00003.pt"))
    assert ckpt["scaler"]["scale"] == 65536.0 and ckpt["scaler"]["_growth_tracker"] == 3  # no overflow, 3 growth steps
    os.makedirs(runs["resumed"])
    run(f"--data_dir={pattern_shards}", f"--log_dir={runs['resumed']}", f"--init_from={runs['fp16'] / 'model_00003.pt'}")
    after_3 = lambda log: {k: v for k, v in log.items() if k[0] >= 3}
    assert read_log(runs["resumed"]) == after_3(fp16)
    a, b = (gpt2.load_checkpoint(str(d / "model_00006.pt")) for d in (runs["fp16"], runs["resumed"]))
    assert a["scaler"] == b["scaler"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_a_float16_overflow_skips_the_step_and_lowers_the_scale(pattern_shards, tmp_path):
    first = tmp_path / "first"
    run("--max_steps=2", "--checkpoint_every=2", f"--data_dir={pattern_shards}", f"--log_dir={first}", "--dtype=float16")
    # a scale so large that the scaled gradients overflow float16 (max 65504): the next step must be skipped
    path = first / "model_00002.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["scaler"]["scale"] = 2.0 ** 40
    torch.save(ckpt, path)
    after = tmp_path / "after"
    os.makedirs(after)
    out = run("--max_steps=3", "--checkpoint_every=3", f"--data_dir={pattern_shards}", f"--log_dir={after}",
              f"--init_from={path}")
    step_line = next(line for line in out.stdout.splitlines() if line.startswith("step      2/3 "))
    assert "gradients overflowed float16: step skipped, loss scale now 5.49756e+11" in step_line  # 2**40 / 2
    assert (2, "train") in read_log(after)  # its loss is logged: the forward was fine
    done = gpt2.load_checkpoint(str(after / "model_00003.pt"))
    for name, tensor in ckpt["model"].items():
        assert torch.equal(done["model"][name], tensor), name  # no update
    assert done["scaler"]["scale"] == 2.0 ** 39
    steps = {float(s["step"]) for s in done["optimizer"]["state"].values()}
    assert steps == {2.0}  # AdamW did not count it


def test_float16_with_muon_trains_as_float32(pattern_shards, tmp_path):
    # the scaler unscales, checks and clips the fused qkv gradient, which Muon takes as three matrices
    runs = {name: tmp_path / name for name in ("fp32", "fp16")}
    for name, path in runs.items():
        run("--optimizer=muon", "--checkpoint_every=0", f"--data_dir={pattern_shards}", f"--log_dir={path}",
            f"--dtype={'float32' if name == 'fp32' else 'float16'}")
    fp32, fp16 = read_log(runs["fp32"]), read_log(runs["fp16"])
    assert fp16.keys() == fp32.keys()
    for key in fp32:
        assert fp16[key] == pytest.approx(fp32[key], abs=5e-3), key  # ~1e-4; a qkv gradient left scaled up: > 2e-2
