"""
Benchmark of fineweb.py: tokens/s against the machine's limit, the coordinating process's CPU share, peak memory.

    python bench/bench_fineweb.py                           # FineWeb-like (~1000 tokens) and short (~150) documents
    python bench/bench_fineweb.py --long_docs=10000 --short_docs=60000 --nanogpt=0   # quicker

It writes parquet files with FineWeb-Edu's columns (English text from Python's own documentation and docstrings,
row groups of 1000 documents), two sizes of each kind, then, in one run:
  - the single-core rate of raw enc.encode_ordinary over the same documents (before and after the other runs);
    the physical limit on N cores is N times it
  - fineweb.py on each input (a subprocess each). Every 100 ms it reads from /proc the CPU time of the process the
    user starts (the coordinator, all its threads) and of its worker processes, and the RSS of all of them
  - optionally build-nanogpt's method, Pool(cpu_count // 2).imap(tokenize, ds, chunksize=16), on the long documents
Steady-state figures are differences between the two sizes of an input: (tokens_large - tokens_small) /
(seconds_large - seconds_small), and the same for CPU seconds, so start-up cancels out. The coordinator's share is
also shown while tokenizing: over the samples from 25% to 90% of the larger run's time.
A coordinator saturates one core when its share times the worker count reaches 1: that worker count is printed.
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
    long_docs: int = 20_000  # documents (~1000 tokens each, as FineWeb-Edu's) in the smaller input; the larger has 3x
    short_docs: int = 120_000  # documents (~150 tokens each) in the smaller short-document input; the larger has 3x
    num_proc: int = 0  # fineweb.py's tokenizer processes; 0 = all cores
    shard_size: int = 10_000_000  # tokens per shard (several shards per input)
    rounds: int = 1  # repeat each timed run; medians are reported
    nanogpt: bool = True  # also time build-nanogpt's method on the long documents
    fineweb: str = ""  # the fineweb.py to measure (e.g. an older version's); "" = this repository's
    work_dir: str = ""  # where inputs and shards go; "" = a temporary directory, deleted at the end
    seed: int = 0


# --- machine ---


def machine():
    import numpy
    import pyarrow
    import tiktoken

    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU: {cpu}, {cores} cores usable ({os.cpu_count()} online), {platform.system()} {platform.release()}\n"
            f"Python {platform.python_version()}, numpy {numpy.__version__}, tiktoken {tiktoken.__version__}, "
            f"pyarrow {pyarrow.__version__}")


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


def write_input(path, n_docs, paragraphs, seed, mean_chars):
    """A parquet file of n_docs documents with FineWeb-Edu's columns, row groups of 1000 rows; lengths are
    log-normal with the given mean in characters (4.6k characters ~ 1000 GPT-2 tokens, as FineWeb-Edu's)."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    mu = math.log(mean_chars) - 0.9**2 / 2  # log-normal, sigma 0.9
    writer, chunk = None, 5000
    for start in range(0, n_docs, chunk):
        texts = []
        for _ in range(min(chunk, n_docs - start)):
            target = int(rng.lognormvariate(mu, 0.9))
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


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_stat(pid):
    """(CPU seconds, RSS bytes) of one process, from /proc/PID/stat; None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 of stat (state): utime is field 14, stime 15, rss (pages) 24
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[21]) * PAGE


def children(pid):
    """The child processes of pid (read where the kernel lists them: cheaper than walking /proc, the sampler
    shares the cores with what it measures)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return kids


def sample(pid, tracker):
    """(coordinator CPU s, workers' CPU s by pid, coordinator RSS, summed RSS of the tree) for the process tree of
    pid; None once it has gone. multiprocessing's resource tracker (pids in `tracker`) is not a worker."""
    me = proc_stat(pid)
    if me is None:
        return None
    workers, rss, todo = {}, me[1], children(pid)
    while todo:
        child = todo.pop()
        s = proc_stat(child)
        if s is None:
            continue
        rss += s[1]
        if child not in tracker:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if b"resource_tracker" in f.read():
                        tracker.add(child)
                        continue
            except OSError:
                continue
            workers[child] = s[0]
        todo += children(child)
    return me[0], workers, me[1], rss


def run_measured(cmd, env, interval=0.1):
    """Runs cmd and samples its process tree every `interval` s. Returns a record: wall seconds, the coordinator's
    and the workers' CPU seconds (last values seen), the samples (time, coordinator CPU, workers' CPU) and the
    peak RSS of the coordinator and of the whole tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    worker_cpu, samples, peak, peak_coord, coord, tracker = {}, [], 0, 0, 0.0, set()
    while proc.poll() is None:
        s = sample(proc.pid, tracker)
        if s:
            coord, workers, coord_rss, tree_rss = s
            worker_cpu.update(workers)  # a worker that has exited keeps its last value
            samples.append((time.perf_counter() - t0, coord, sum(worker_cpu.values())))
            peak, peak_coord = max(peak, tree_rss), max(peak_coord, coord_rss)
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return {"seconds": seconds, "coord_cpu": coord, "worker_cpu": sum(worker_cpu.values()), "samples": samples,
            "peak_rss": peak, "peak_coord_rss": peak_coord, "out": out}


def run_ours(cfg, path, out_dir, num_proc, env):
    script = cfg.fineweb or os.path.join(ROOT, "fineweb.py")
    cmd = [sys.executable, script, f"--data_files={path}", f"--out_dir={out_dir}", "--overwrite=1",
           f"--shard_size={cfg.shard_size}", "--val_tokens=1000000", f"--num_proc={num_proc}"]
    r = run_measured(cmd, env)
    with open(os.path.join(out_dir, "manifest.json")) as f:
        r["tokens"] = json.load(f)["totals"]["tokens"]
    return r


def run_nanogpt(cfg, path, out_dir, procs, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--nanogpt", path, out_dir, str(procs), str(cfg.shard_size)]
    r = run_measured(cmd, env)
    r["tokens"] = json.loads(r["out"].strip().splitlines()[-1])["tokens"]
    return r


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


def window_share(samples, lo=0.25, hi=0.9):
    """The coordinator's CPU / the workers' CPU between the samples at lo and hi of the run's time."""
    end = samples[-1][0]
    a = next(s for s in samples if s[0] >= lo * end)
    b = [s for s in samples if s[0] <= hi * end][-1]
    return (b[1] - a[1]) / max(b[2] - a[2], 1e-9)


# --- main ---


def report(name, procs, small, large, one, one_cpu, num_proc):
    """Prints one method's figures on one kind of input; returns its steady tokens/s."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    tok_s, tok_l = small[0]["tokens"], large[0]["tokens"]
    sec_s, sec_l = med(small, "seconds"), med(large, "seconds")
    cpu_s = med(small, "coord_cpu") + med(small, "worker_cpu")
    cpu_l = med(large, "coord_cpu") + med(large, "worker_cpu")
    rate = (tok_l - tok_s) / max(sec_l - sec_s, 1e-9)
    rate_cpu = (tok_l - tok_s) / max(cpu_l - cpu_s, 1e-9)
    peaks = ", ".join(f"{r[0]['tokens'] / 1e6:.1f}M tokens: {max(x['peak_rss'] for x in r) / 2**20:,.0f} MiB "
                      f"(coordinator {max(x['peak_coord_rss'] for x in r) / 2**20:,.0f} MiB)" for r in (small, large))
    print(f"{name:13s} {procs:2d} procs: {tok_s / 1e6:.1f}M tokens in {sec_s:.1f} s, {tok_l / 1e6:.1f}M in "
          f"{sec_l:.1f} s (whole runs, start-up included)\n"
          f"    steady state: {rate / 1e6:.2f}M tokens/s = {rate / (num_proc * one):.2f}x the {num_proc}-core "
          f"limit; {rate_cpu / 1e6:.2f}M tokens per CPU-second of the process tree = "
          f"{rate_cpu / one_cpu:.2f}x raw encode_ordinary's\n"
          f"    peak RSS of the whole process tree: {peaks}")
    if name == "fineweb.py":
        steady = (med(large, "coord_cpu") - med(small, "coord_cpu")) / max(
            med(large, "worker_cpu") - med(small, "worker_cpu"), 1e-9)
        during = statistics.median(window_share(r["samples"]) for r in large)
        whole = med(large, "coord_cpu") / max(med(large, "worker_cpu"), 1e-9)
        print(f"    coordinator CPU / workers' CPU: {during:.2%} while tokenizing (25-90% of the larger run), "
              f"{steady:.2%} steady state (large - small), {whole:.2%} over the whole larger run\n"
              f"    the coordinator would saturate one core at about {1 / max(during, 1e-9):,.0f} workers")
    return rate


def main(cfg, overridden=()):
    num_proc = cfg.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(machine())
    print(f"load average at start: {load()} (other work on the machine lowers every figure below)")
    work = cfg.work_dir or tempfile.mkdtemp(prefix="bench_fineweb_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(work, "hf_cache"), PYTHONUNBUFFERED="1")
    try:
        paragraphs = english_paragraphs()
        kinds = {"long": (cfg.long_docs, 4400), "short": (cfg.short_docs, 600)}  # documents, mean characters
        inputs = {}
        for kind, (n, chars) in kinds.items():
            for size, k in (("small", 1), ("large", 3)):
                inputs[kind, size] = os.path.join(work, f"{kind}_{size}.parquet")
                write_input(inputs[kind, size], n * k, paragraphs, cfg.seed, chars)
        print(f"inputs: {len(paragraphs):,} paragraphs; shard_size={cfg.shard_size:,}; "
              f"fineweb.py: {cfg.fineweb or 'this repository'}")

        methods = [("fineweb.py", num_proc, run_ours, ("long", "short"))]
        if cfg.nanogpt:
            methods.append(("build-nanogpt", max(1, os.cpu_count() // 2), run_nanogpt, ("long",)))
            if max(1, os.cpu_count() // 2) != num_proc:
                methods.append(("build-nanogpt", num_proc, run_nanogpt, ("long",)))
        single = {kind: [single_core_rate(inputs[kind, "small"])] for kind in kinds}
        runs = {}
        for _ in range(cfg.rounds):
            for name, procs, fn, which in methods:
                for kind in which:
                    for size in ("small", "large"):
                        out_dir = os.path.join(work, f"out_{name}_{procs}_{kind}_{size}")
                        shutil.rmtree(out_dir, ignore_errors=True)
                        runs.setdefault((name, procs, kind, size), []).append(fn(cfg, inputs[kind, size], out_dir,
                                                                                 procs, env))
                        shutil.rmtree(out_dir, ignore_errors=True)
            for kind in kinds:
                single[kind].append(single_core_rate(inputs[kind, "small"]))

        steady = {}
        for kind in kinds:
            one, one_cpu = (statistics.median(r[i] for r in single[kind]) for i in (0, 1))
            n, sizes = kinds[kind][0], [os.path.getsize(inputs[kind, s]) for s in ("small", "large")]
            tokens = runs[("fineweb.py", num_proc, kind, "small")][0]["tokens"]
            print(f"\n{kind} documents: {n:,} and {3 * n:,} documents, {sizes[0] / 2**20:,.0f} and "
                  f"{sizes[1] / 2**20:,.0f} MiB of parquet, {tokens / n:,.0f} tokens per document (<|endoftext|> "
                  f"included)\nsingle core, raw enc.encode_ordinary: {one / 1e6:.2f}M tokens/s wall (median of "
                  f"{', '.join(f'{r[0] / 1e6:.2f}' for r in single[kind])}), {one_cpu / 1e6:.2f}M tokens per "
                  f"CPU-second; physical limit on {num_proc} cores: {num_proc * one / 1e6:.2f}M tokens/s")
            for name, procs, _, which in methods:
                if kind in which:
                    steady[name, procs, kind] = report(name, procs, runs[(name, procs, kind, "small")],
                                                       runs[(name, procs, kind, "large")], one, one_cpu, num_proc)
        for (name, procs, kind), rate in steady.items():
            if name != "fineweb.py":
                print(f"steady tokens/s on {kind} documents, fineweb.py ({num_proc} procs) / build-nanogpt "
                      f"({procs} procs): {steady['fineweb.py', num_proc, kind] / rate:.2f}x")
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
