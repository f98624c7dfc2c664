"""
The whole pipeline in a few minutes on a laptop CPU, offline: text -> shards -> a tiny GPT -> plot -> samples.

    pip install -r requirements.txt && python demo.py

The corpus is text every Python installation ships: the language reference behind help()
(pydoc_data.topics) and the docstrings of the standard library's modules, classes and
functions, read from the source files (nothing is imported or run). It goes through
fineweb.py's local-files path, gpt2.py trains a 4-layer GPT on it, plot.py draws the losses
and gpt2.py --mode=sample continues a prompt. Everything is written under --demo_dir (demo/).
The only download is tiktoken's GPT-2 tokenizer files, once (or set TIKTOKEN_CACHE_DIR).
"""

import ast
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass

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


def reference_docs():
    """The language reference's sections, as help('TOPIC') shows them."""
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


def docstring_docs():
    """Yields one document per standard-library module: its docstrings (module, classes, functions), read with ast."""
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a template or a file for another Python version
            nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
            texts = [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) > 40]
            if texts:
                yield "\n\n".join(texts)


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


# GPT-2's tokenizer file, for a machine that reaches PyPI and nothing else: openai-whisper's source release
# ships it as whisper/assets/gpt2.tiktoken, byte for byte tiktoken's r50k_base.tiktoken (checked by its SHA-256)
WHISPER_SDIST = "openai-whisper==20250625"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def install_tokenizer_file(data, cache_dir):
    """Puts r50k_base.tiktoken's bytes where tiktoken looks for them (its cache names files by the URL's SHA-1)."""
    if hashlib.sha256(data).hexdigest() != R50K_SHA256:
        sys.exit("demo: the tokenizer file from PyPI does not match r50k_base.tiktoken's SHA-256; set TIKTOKEN_CACHE_DIR")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, hashlib.sha1(R50K_URL.encode()).hexdigest())
    tmp = f"{path}.{os.getpid()}.tmp"  # its own name: processes that start together (test workers) may all write it
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_tokenizer(demo_dir):
    """GPT-2's tokenizer for this process and the scripts it runs: tiktoken's own download or cache if it works,
    else the copy on PyPI (see WHISPER_SDIST)."""
    from gpt2 import get_tokenizer

    try:
        get_tokenizer()
        return
    except Exception as e:  # no route to tiktoken's host: fall back to PyPI, the one network this demo relies on
        reason = type(e).__name__
    cache_dir = os.path.join(demo_dir, "tiktoken_cache")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    try:
        get_tokenizer()  # fetched on an earlier run
        return
    except Exception:
        pass
    print(f"0. tiktoken could not fetch GPT-2's tokenizer ({reason}): taking it from PyPI ({WHISPER_SDIST})")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                        "--dest", tmp, WHISPER_SDIST], check=True)
        with tarfile.open(glob.glob(os.path.join(tmp, "*.tar.gz"))[0]) as sdist:
            member = next(m for m in sdist.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            install_tokenizer_file(sdist.extractfile(member).read(), cache_dir)
    get_tokenizer()


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
