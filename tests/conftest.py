"""Shared test setup: offline tokenizer files, the repo on sys.path, tiny shards and a runner for gpt2.py (in a fresh
process, on torchrun's ranks, or in the test's own process)."""

import base64
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import merge_settings  # noqa: E402


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte, as its encoder.json and vocab.bpe spell tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def gpt2_files_from_r50k(r50k_bytes):
    """GPT-2's encoder.json and vocab.bpe, rebuilt from r50k_base.tiktoken (the same ranks): the token -> id table,
    and each merged token split into the pair that BPE, using only the merges before it, leaves last."""
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in r50k_bytes.splitlines())}
    spell = lambda token: "".join(BYTE_TO_CHAR[b] for b in token)
    ordered = sorted(ranks, key=ranks.get)
    encoder = {spell(token): ranks[token] for token in ordered} | {"<|endoftext|>": len(ordered)}
    merges = []
    for token in ordered[256:]:
        parts, limit = [bytes([b]) for b in token], ranks[token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: min(ranks.get(parts[j] + parts[j + 1], limit), limit))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return json.dumps(encoder).encode(), ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()


BYTE_TO_CHAR = bytes_to_unicode()


def ensure_tokenizer_files():
    """tiktoken's GPT-2 files (r50k_base, which the scripts use, and gpt2, which tests compare with) for a machine
    whose only network is the package index: the demo's route, offline.ensure_tokenizer (openai-whisper's sdist on
    PyPI, checked by SHA-256) into demo/tiktoken_cache (git ignores demo/), and gpt2's two files rebuilt from it,
    checked against the SHA-256 tiktoken expects. Nothing happens where tiktoken already loads both."""
    import tiktoken

    try:
        tiktoken.get_encoding("r50k_base"), tiktoken.get_encoding("gpt2")
        return
    except Exception:
        pass
    import gpt2
    import offline

    demo_dir = os.path.join(ROOT, "demo")
    cache_dir = os.path.join(demo_dir, "tiktoken_cache")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    offline.ensure_tokenizer(demo_dir)
    cached = lambda url: os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    with open(cached(offline.R50K_URL), "rb") as f:
        derived = dict(zip(("vocab.json", "merges.txt"), gpt2_files_from_r50k(f.read()), strict=True))
    for name, (url, sha256) in gpt2.GPT2_TOKENIZER_FILES.items():
        assert hashlib.sha256(derived[name]).hexdigest() == sha256, f"rebuilt GPT-2 {name} differs from tiktoken's"
        tmp = f"{cached(url)}.{os.getpid()}.tmp"  # one per process: pytest-xdist's workers may both get here
        with open(tmp, "wb") as f:
            f.write(derived[name])
        os.replace(tmp, cached(url))
    tiktoken.get_encoding("gpt2")


# tiktoken reads its GPT-2 files from TIKTOKEN_CACHE_DIR: CI's shared copy when there is one, else they are fetched
_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ:
    if os.path.isdir(_cache):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)
    else:
        ensure_tokenizer_files()

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


def write_test_shards(data_dir):
    """One val shard and three train shards of uneven lengths in data_dir, the same tokens every time; returns it."""
    write_shards(data_dir, [3000], "val", seed=1)
    write_shards(data_dir, [5000, 777, 4321], "train", seed=2, start_index=1)
    return data_dir


@pytest.fixture
def shards(tmp_path):
    """A data_dir of write_test_shards'."""
    return write_test_shards(str(tmp_path / "data"))


def run_gpt2(*args, torchrun_ranks=0, check=True, timeout=600, in_process=False):
    """Runs gpt2.py in a fresh process (under torchrun with N ranks if asked); returns the CompletedProcess.

    in_process=True runs the same command line in this process instead (gpt2_here): the same numbers, seconds cheaper.
    What only a fresh process shows (the interpreter's start, a stderr that nothing in Python wrote) needs one."""
    # a test's own settings replace TINY's: gpt2.py refuses a setting given twice with two values
    argv = merge_settings(args)
    if in_process:
        assert not torchrun_ranks, "ranks need torchrun's processes"
        proc = gpt2_here(argv)
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if torchrun_ranks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_ranks}"]
        else:
            cmd = [sys.executable]
        proc = subprocess.run(cmd + [os.path.join(ROOT, "gpt2.py"), *argv], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt2.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def gpt2_here(argv):
    """`python gpt2.py ARGV` in this process: cli.run_cli on gpt2.main, as gpt2.py's last line calls it, with one torch
    thread (run_gpt2's OMP_NUM_THREADS=1), in the repo's directory. A run seeds every generator it draws from and puts
    back the signal handlers it sets, so it leaves nothing behind for the next. Returns a CompletedProcess: what it
    printed, the warnings a fresh process would print (Python's default filters), and the status sys.exit gave.
    A fresh process pays seconds of imports (torch, matplotlib, tiktoken's tables) that this one has paid once."""
    import contextlib
    import io
    import warnings

    import torch
    import torch.distributed as dist

    import gpt2
    from cli import run_cli

    assert not dist.is_initialized(), "a process group left by another test would make this run a rank of it"
    out, err = io.StringIO(), io.StringIO()
    threads, cwd, status = torch.get_num_threads(), os.getcwd(), 0
    try:
        torch.set_num_threads(1)
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # pytest's filters out, Python's defaults in
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category, append=True)
            warnings.simplefilter("default", append=True)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            run_cli(gpt2.main, gpt2.Config(), argv)
    except SystemExit as e:
        status = 0 if e.code is None else e.code
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    return subprocess.CompletedProcess(["gpt2.py", *argv], status, out.getvalue(), err.getvalue())


def read_log(log_dir):
    """log.txt as {(step, kind): value}."""
    out = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            step, kind, value = line.split()
            out[(int(step), kind)] = float(value)
    return out
