"""Shared test setup: offline tokenizer files, the repo on sys.path, tiny shards and a runner for gpt2.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# tiktoken reads its GPT-2 files from here when the machine has no internet access
_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)

# a model small enough to train a few steps in about a second on a CPU
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=128", "--micro_batch_size=4",
        "--total_batch_size=128",
        "--compile=0", "--device=cpu", "--hellaswag_every=0", "--sample_every=0"]


def write_shards(data_dir, sizes, split, vocab_size=128, seed=0, start_index=0):
    """Writes uint16 shards of the given lengths, named as fineweb.py names them; returns their tokens."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, vocab_size, size=n, dtype=np.uint16)
        np.save(os.path.join(data_dir, f"edufineweb_{split}_{start_index + i:06d}.npy"), tokens)
        shards.append(tokens)
    return shards


@pytest.fixture
def shards(tmp_path):
    """A data_dir with one val shard and three train shards of uneven lengths."""
    data_dir = str(tmp_path / "data")
    write_shards(data_dir, [3000], "val", seed=1)
    write_shards(data_dir, [5000, 777, 4321], "train", seed=2, start_index=1)
    return data_dir


def run_gpt2(*args, torchrun_ranks=0, check=True, timeout=600):
    """Runs gpt2.py in a fresh process (under torchrun with N ranks if asked); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if torchrun_ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_ranks}"]
    else:
        cmd = [sys.executable]
    proc = subprocess.run(cmd + [os.path.join(ROOT, "gpt2.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt2.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_log(log_dir):
    """log.txt as {(step, kind): value}."""
    out = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            step, kind, value = line.split()
            out[(int(step), kind)] = float(value)
    return out
