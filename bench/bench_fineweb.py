"""
Benchmark of fineweb.py: tokens/s against the machine's limit and against build-nanogpt's method, and peak memory.

    python bench/bench_fineweb.py                           # ~20M and ~60M token inputs, all cores
    python bench/bench_fineweb.py --small_docs=5000 --large_docs=15000 --rounds=1   # quicker

It writes FineWeb-Edu-like parquet files (English text from Python's own documentation and docstrings, document
lengths drawn around FineWeb-Edu's ~1000 tokens), then, in one run:
  - the single-core rate of raw enc.encode_ordinary over the same documents (before and after the other runs);
    the physical limit on N cores is N times it
  - fineweb.py on both inputs (a subprocess each), with the peak RSS of its whole process tree
  - build-nanogpt's method, Pool(cpu_count // 2).imap(tokenize, ds, chunksize=16), on the same inputs
Steady-state rates are (tokens_large - tokens_small) / (seconds_large - seconds_small): start-up cancels out.
"""

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from machine import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- config ---


@dataclass
class Config:
    small_docs: int = 20_000  # documents in the small input (~1000 tokens each)
    large_docs: int = 60_000  # ...and in the large one
    num_proc: int = 0  # fineweb.py's tokenizer processes; 0 = all cores
    shard_size: int = 10_000_000  # tokens per shard, for both methods (several shards per input)
    rounds: int = 1  # repeat each timed run; medians are reported
    work_dir: str = ""  # where inputs and shards go; "" = a temporary directory, deleted at the end
    seed: int = 0


# --- machine ---


def machine():
    import datasets
    import numpy
    import pyarrow
    import tiktoken

    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU: {cpu}, {cores} cores usable ({os.cpu_count()} online), {platform.system()} {platform.release()}\n"
            f"Python {platform.python_version()}, numpy {numpy.__version__}, tiktoken {tiktoken.__version__}, "
            f"datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")


def load():
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


# --- inputs ---


def english_paragraphs():
    """Paragraphs of English prose from the interpreter's own documentation: pydoc topics and stdlib docstrings."""
    import importlib
    import inspect
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and friends, seen while listing members

    texts = []
    try:
        from pydoc_data.topics import topics

        texts += topics.values()
    except ImportError:
        pass
    for name in ("argparse", "asyncio", "collections", "datetime", "decimal", "email", "functools", "http.client",
                 "inspect", "json", "logging", "os", "pathlib", "random", "re", "shutil", "socket", "statistics",
                 "string", "subprocess", "threading", "typing", "unittest", "urllib.request", "zipfile"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        texts.append(module.__doc__ or "")
        for _, obj in inspect.getmembers(module, callable):
            texts.append(inspect.getdoc(obj) or "")
    paragraphs = {p.strip() for t in texts if isinstance(t, str) for p in t.split("\n\n")}
    return sorted(p for p in paragraphs if len(p) > 80 and sum(c.isalpha() for c in p) > 0.6 * len(p))


def write_input(path, n_docs, paragraphs, seed):
    """A parquet file of n_docs documents with FineWeb-Edu's columns; lengths are log-normal, mean ~4.6k characters
    (~1000 GPT-2 tokens), as FineWeb-Edu's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    writer, chunk = None, 5000
    for start in range(0, n_docs, chunk):
        texts = []
        for _ in range(min(chunk, n_docs - start)):
            target = int(rng.lognormvariate(8.1, 0.9))  # characters; median ~3.3k, mean ~5k
            parts, size = [], 0
            while size < target:
                p = rng.choice(paragraphs)
                parts.append(p)
                size += len(p) + 2
            texts.append("\n\n".join(parts)[:max(target, 50)])
        n = len(texts)
        table = pa.table({"text": texts, "id": [f"<urn:uuid:{start + i}>" for i in range(n)],
                          "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{start + i}" for i in range(n)],
                          "file_path": ["s3://x.warc.gz"] * n, "language": ["en"] * n, "language_score": [0.97] * n,
                          "token_count": [len(t) // 4 for t in texts], "score": [3.0] * n, "int_score": [3] * n})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1000)
    writer.close()


# --- measurements ---


def single_core_rate(path, n_docs=3000, repeats=3):
    """(wall, cpu) tokens/s of raw enc.encode_ordinary over the first n_docs documents on one core, medians."""
    import pyarrow.parquet as pq
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n_docs]
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(enc.encode_ordinary(d)) for d in docs)
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def tree_rss(pid):
    """Summed RSS (bytes) of pid and all its descendants, from /proc."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_measured(cmd, env):
    """Runs cmd; returns (wall seconds, CPU seconds of its whole process tree, stdout, peak summed RSS of the tree
    sampled every 50 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # its usage includes the workers it waited for
        if pid:
            break
        if os.path.isdir("/proc"):
            peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, out, peak


def run_ours(cfg, path, out_dir, num_proc, env):
    cmd = [sys.executable, os.path.join(ROOT, "fineweb.py"), f"--data_files={path}", f"--out_dir={out_dir}",
           "--overwrite=1", f"--shard_size={cfg.shard_size}", "--val_tokens=1000000", f"--num_proc={num_proc}"]
    seconds, cpu, _, peak = run_measured(cmd, env)
    with open(os.path.join(out_dir, "manifest.json")) as f:
        tokens = json.load(f)["totals"]["tokens"]
    return tokens, seconds, cpu, peak


def run_nanogpt(cfg, path, out_dir, procs, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--nanogpt", path, out_dir, str(procs), str(cfg.shard_size)]
    seconds, cpu, out, peak = run_measured(cmd, env)
    return json.loads(out.strip().splitlines()[-1])["tokens"], seconds, cpu, peak


def nanogpt_method(path, out_dir, procs, shard_size):
    """build-nanogpt's fineweb.py, as written there (fork Pool, imap of one document per call, chunksize=16),
    reading the same parquet file with datasets (its arrow cache is built before the clock starts)."""
    import multiprocessing as mp

    import datasets
    import numpy as np
    import tiktoken

    datasets.disable_progress_bars()
    fw = datasets.load_dataset("parquet", data_files=path, split="train")
    enc = tiktoken.get_encoding("gpt2")
    eot = enc._special_tokens["<|endoftext|>"]
    global tokenize

    def tokenize(doc):
        tokens = [eot]
        tokens.extend(enc.encode_ordinary(doc["text"]))
        tokens_np = np.array(tokens)
        assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
        return tokens_np.astype(np.uint16)

    os.makedirs(out_dir, exist_ok=True)
    total = 0
    with mp.get_context("fork").Pool(procs) as pool:
        shard_index, token_count = 0, 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
        for tokens in pool.imap(tokenize, fw, chunksize=16):
            total += len(tokens)
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                np.save(os.path.join(out_dir, f"edufineweb_{split}_{shard_index:06d}"), all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            np.save(os.path.join(out_dir, f"edufineweb_{split}_{shard_index:06d}"), all_tokens_np[:token_count])
    print(json.dumps({"tokens": total}))


# --- main ---


def main(cfg, overridden=()):
    num_proc = cfg.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(machine())
    print(f"load average at start: {load()} (other work on the machine lowers every figure below)")
    work = cfg.work_dir or tempfile.mkdtemp(prefix="bench_fineweb_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(work, "hf_cache"), PYTHONUNBUFFERED="1")
    try:
        paragraphs = english_paragraphs()
        inputs = {}
        for size, n in (("small", cfg.small_docs), ("large", cfg.large_docs)):
            inputs[size] = os.path.join(work, f"{size}.parquet")
            write_input(inputs[size], n, paragraphs, cfg.seed)
        print(f"inputs: {cfg.small_docs:,} and {cfg.large_docs:,} documents from {len(paragraphs):,} paragraphs; "
              f"shard_size={cfg.shard_size:,}")

        single, runs = [single_core_rate(inputs["small"])], {}
        methods = [("fineweb.py", num_proc, run_ours), ("build-nanogpt", max(1, os.cpu_count() // 2), run_nanogpt)]
        if max(1, os.cpu_count() // 2) != num_proc:
            methods.append(("build-nanogpt", num_proc, run_nanogpt))
        for _ in range(cfg.rounds):
            for name, procs, fn in methods:
                for size in ("small", "large"):
                    out_dir = os.path.join(work, f"out_{name}_{procs}_{size}")
                    shutil.rmtree(out_dir, ignore_errors=True)
                    runs.setdefault((name, procs, size), []).append(fn(cfg, inputs[size], out_dir, procs, env))
                    shutil.rmtree(out_dir, ignore_errors=True)
            single.append(single_core_rate(inputs["small"]))

        one, one_cpu = (statistics.median(r[i] for r in single) for i in (0, 1))
        print(f"single core, raw enc.encode_ordinary: {one / 1e6:.2f}M tokens/s wall (median of "
              f"{', '.join(f'{r[0] / 1e6:.2f}' for r in single)}), {one_cpu / 1e6:.2f}M tokens per CPU-second; "
              f"physical limit on {num_proc} cores: {num_proc * one / 1e6:.2f}M tokens/s")
        steady = {}
        for name, procs, _ in methods:
            small, large = runs[(name, procs, "small")], runs[(name, procs, "large")]
            tok_s, sec_s, cpu_s = small[0][0], *(statistics.median(r[i] for r in small) for i in (1, 2))
            tok_l, sec_l, cpu_l = large[0][0], *(statistics.median(r[i] for r in large) for i in (1, 2))
            rate = (tok_l - tok_s) / max(sec_l - sec_s, 1e-9)
            rate_cpu = (tok_l - tok_s) / max(cpu_l - cpu_s, 1e-9)
            steady[(name, procs)] = rate
            peaks = ", ".join(f"{r[0][0] / 1e6:.1f}M tokens: {max(x[3] for x in r) / 2**20:,.0f} MiB" for r in (small, large))
            print(f"{name:13s} {procs:2d} procs: {tok_s / 1e6:.1f}M tokens in {sec_s:.1f} s, {tok_l / 1e6:.1f}M in "
                  f"{sec_l:.1f} s (whole runs, start-up included)\n"
                  f"    steady state: {rate / 1e6:.2f}M tokens/s = {rate / (num_proc * one):.2f}x the {num_proc}-core "
                  f"limit; {rate_cpu / 1e6:.2f}M tokens per CPU-second of the process tree = "
                  f"{rate_cpu / one_cpu:.2f}x raw encode_ordinary's\n"
                  f"    peak RSS of the whole process tree: {peaks}")
        ours = steady[("fineweb.py", num_proc)]
        for (name, procs), rate in steady.items():
            if name != "fineweb.py":
                print(f"steady tokens/s, fineweb.py ({num_proc} procs) / build-nanogpt ({procs} procs): {ours / rate:.2f}x")
        print(f"load average at end: {load()}")
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--nanogpt"]:  # one build-nanogpt run, in its own process (bench internal)
        nanogpt_method(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.path.insert(0, ROOT)
        from cli import run_cli

        run_cli(main, Config(), sys.argv[1:])
