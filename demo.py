"""
The whole pipeline in a few minutes on a laptop CPU, offline: text -> shards -> a tiny GPT -> plot -> samples.

    pip install -r requirements.txt && python demo.py

The corpus is text every Python installation ships, read by offline.py: the language reference behind help()
(pydoc_data.topics) and the docstrings of the standard library's modules, classes and
functions, read from the source files (nothing is imported or run). It goes through
fineweb.py's local-files path, gpt2.py trains a 4-layer GPT on it, plot.py draws the losses
and gpt2.py --mode=sample continues a prompt. Everything is written under --demo_dir (demo/).
The only download is tiktoken's GPT-2 tokenizer files, once (or set TIKTOKEN_CACHE_DIR).
"""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from offline import docstring_docs, ensure_tokenizer, reference_docs

ROOT = os.path.dirname(os.path.abspath(__file__))

# --- config ---


@dataclass
class DemoConfig:
    demo_dir: str = "demo"  # corpus.jsonl, data/ (shards) and log/ (log.txt, log.png, the checkpoint)
    max_chars: int = 0  # corpus size cap; 0 = all (~2.2M characters, ~0.5M tokens): the language reference, then docstrings
    val_tokens: int = 60_000  # the val split: the first documents of the (shuffled) corpus
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    micro_batch_size: int = 8  # 8 x 128 = 1024 tokens per step; most of a step is the 50257-way softmax
    max_steps: int = 150  # ~0.15M tokens: val loss ~10.7 -> ~5.8, about 3 minutes on 2 idle cores
    max_lr: float = 2e-3  # a tiny model learns fast at a high rate
    val_every: int = 50
    val_loss_tokens: int = 5120  # validation loss over the first N tokens of the val split
    prompt: str = "The import statement"
    quick: bool = False  # a much shorter run (tests, a first look): a smaller corpus and model, 20 steps


QUICK = dict(max_chars=300_000, val_tokens=5_000, n_layer=2, n_head=2, n_embd=64, block_size=64, micro_batch_size=8,
             max_steps=20, val_every=10, val_loss_tokens=1024, max_lr=4e-3)


# --- corpus ---


def build_corpus(path, max_chars, seed=0):
    """Writes path (jsonl, one {"text": ...} per document), shuffled so that val and train are alike; returns its size."""
    docs, total = [], 0
    for doc in itertools.chain(reference_docs(), docstring_docs()):  # parses only as many modules as it needs
        if max_chars and total >= max_chars:
            break
        docs.append(doc)
        total += len(doc)
    random.Random(seed).shuffle(docs)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    os.replace(tmp, path)
    return len(docs), total


# --- steps ---


def run(script, *args):
    """Runs one of the repo's scripts in a fresh process, its output shown as it comes; stops the demo if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    print(f"\n$ python {script} {' '.join(args)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"demo: python {script} failed (its error is above)")


def summarize(log_file):
    """'train 10.95 -> 5.80, val 10.94 -> 5.95' from log.txt: the first and last values of each."""
    series = {}
    with open(log_file) as f:
        for line in f:
            step, kind, value = line.split()
            series.setdefault(kind, []).append(float(value))
    train = series["train"]
    k = max(1, len(train) // 10)  # average the ends: one step's loss is noisy
    parts = [f"train {sum(train[:k]) / k:.2f} -> {sum(train[-k:]) / k:.2f}"]
    if "val" in series:
        parts.append(f"val {series['val'][0]:.2f} -> {series['val'][-1]:.2f}")
    return ", ".join(parts), series


def main(cfg, overridden):
    if cfg.quick:
        for k, v in QUICK.items():
            if k not in overridden:
                setattr(cfg, k, v)
    t0 = time.time()
    demo_dir = os.path.abspath(cfg.demo_dir)
    ensure_tokenizer(demo_dir)
    data_dir, log_dir = os.path.join(demo_dir, "data"), os.path.join(demo_dir, "log")
    corpus = os.path.join(demo_dir, "corpus.jsonl")
    os.makedirs(demo_dir, exist_ok=True)

    n_docs, n_chars = build_corpus(corpus, cfg.max_chars)
    print(f"1. corpus: {n_docs:,} documents, {n_chars / 1e6:.1f}M characters of Python's own documentation -> {corpus}")
    run("fineweb.py", f"--data_files={corpus}", f"--out_dir={data_dir}", f"--val_tokens={cfg.val_tokens}",
        "--shard_size=10000000", "--overwrite=1")

    shutil.rmtree(log_dir, ignore_errors=True)  # each demo run trains from scratch
    batch = cfg.micro_batch_size * cfg.block_size
    run("gpt2.py", f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--n_layer={cfg.n_layer}", f"--n_head={cfg.n_head}",
        f"--n_embd={cfg.n_embd}", f"--block_size={cfg.block_size}", f"--micro_batch_size={cfg.micro_batch_size}",
        f"--total_batch_size={batch}", f"--max_steps={cfg.max_steps}", f"--warmup_steps={max(1, cfg.max_steps // 20)}",
        f"--max_lr={cfg.max_lr}", f"--min_lr={cfg.max_lr / 10}", f"--val_every={cfg.val_every}",
        f"--val_tokens={cfg.val_loss_tokens}",
        "--hellaswag_every=0", "--sample_every=0", "--compile=0", "--device=cpu", "--dtype=float32")
    run("plot.py", os.path.join(log_dir, "log.txt"))
    run("gpt2.py", "--mode=sample", "--init_from=resume", f"--log_dir={log_dir}", f"--prompt={cfg.prompt}",
        "--num_samples=3", "--max_new_tokens=48", "--top_k=40", "--temperature=0.8", "--device=cpu",
        f"--samples_file={os.path.join(demo_dir, 'samples.jsonl')}")

    summary, _ = summarize(os.path.join(log_dir, "log.txt"))
    print(f"\ndemo done in {time.time() - t0:.0f} s: loss {summary}")
    print(f"plot: {os.path.join(log_dir, 'log.png')} | checkpoint: {log_dir}/ | samples: {demo_dir}/samples.jsonl")
    print("next: real data with python fineweb.py, then python gpt2.py (see the README)")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from cli import run_cli

    run_cli(main, DemoConfig(), sys.argv[1:])
