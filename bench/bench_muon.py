"""Tokens to reach AdamW's loss: gpt2.py --optimizer=muon against --optimizer=adamw, the same small GPT on the same
real text, in one run.

AdamW trains first, once at each learning rate of a short sweep; the best run (lowest final validation loss) sets the
target, its final validation loss. Then Muon at its defaults (gpt2.py's muon_lr, muon_momentum, muon_weight_decay),
with the AdamW half at the sweep's best rate. Each run is `python gpt2.py` itself, same schedule and steps; the
benchmark prints, for each optimizer, the tokens it took to reach the target (the first validation at or below it)
and its time per step, and the ratio of the tokens.
    python bench/bench_muon.py                                    # ~4 minutes on 2 quiet CPU cores (~14 at --n_embd=128)
    python bench/bench_muon.py --max_steps=40 --adamw_lrs=3e-3    # a quick look
    python bench/bench_muon.py --fsdp=1                           # Muon's step at 1, 2 and 4 gloo ranks (below)

The text is demo.py's corpus, Python's own documentation (the language reference and the standard library's
docstrings, ~0.6M GPT-2 tokens): no download but tiktoken's files, as the demo fetches them. Its tokens are
renumbered by frequency and all but the vocab_size - 1 most frequent (95% of the text at 4096) share the last id, so
that a CPU spends its time in the blocks, where Muon acts, rather than in a 50257-way softmax.

--fsdp=1 measures instead what Muon's step costs each rank under torchrun, at 1, 2 and 4 gloo ranks of this machine
(--ranks), for FSDP Muon (muon.ShardedMuon: each matrix orthogonalized by one owner), DDP Muon (torch.optim.Muon on
every rank, on the all-reduced gradients) and FSDP AdamW: each rank's time in torch's Newton-Schulz per step (the
function wrapped with a timer) and the bytes it sends per step, read from /proc/self/io (wchar: on gloo, its socket
writes), for the whole step and for the optimizer's step alone. One torchrun per world size runs the three in turn, on
random tokens, --fsdp_steps steps each (the first, which makes the optimizer's state, not counted).
"""

import collections
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from machine import describe  # noqa: E402

from cli import run_cli  # noqa: E402
from offline import docstring_docs, ensure_tokenizer, reference_docs  # noqa: E402
from plot import read_log  # noqa: E402


@dataclass
class Config:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16  # sequences per optimizer step: 1024 tokens
    vocab_size: int = 4096  # the most frequent tokens kept (see the docstring)
    max_steps: int = 150  # ~0.15M tokens, a quarter of the train split: no token is seen twice
    warmup_steps: int = 8
    adamw_lrs: str = "1e-3,2e-3,4e-3"  # AdamW's max_lr sweep (min_lr = max_lr / 10); a best at an end adds one beyond (x2, /2)
    val_every: int = 10
    val_tokens: int = 4096  # the val split: the first documents of the shuffled corpus, about this many tokens
    threads: int = 0  # torch threads per run; 0 = torch's default (every core)
    fsdp: int = 0  # 1: Muon's step under torchrun instead (Newton-Schulz time and bytes sent per rank; see above)
    ranks: str = "1,2,4"  # fsdp: the world sizes
    fsdp_steps: int = 4  # fsdp: steps per mode, the first not counted
    worker: str = ""  # internal: the mode a torchrun rank runs (all three, in turn)


def corpus_tokens(vocab_size, val_tokens, seed=0):
    """(train, val) uint16 token arrays of demo.py's corpus, documents shuffled as the demo shuffles them, the val split
    the first documents; ids renumbered by their frequency in train, the rarest sharing id vocab_size - 1."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(ROOT, "..", "shared", "tiktoken_cache")):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.path.join(ROOT, "..", "shared", "tiktoken_cache"))
    ensure_tokenizer(os.path.join(ROOT, "demo"))
    from gpt2 import get_tokenizer

    docs = list(itertools.chain(reference_docs(), docstring_docs()))
    random.Random(seed).shuffle(docs)
    eot = get_tokenizer().eot_token
    tokens = [np.array([eot, *doc], dtype=np.int64) for doc in get_tokenizer().encode_ordinary_batch(docs)]
    stream = np.concatenate(tokens)
    split = int(np.searchsorted(np.cumsum([len(t) for t in tokens]), val_tokens)) + 1  # whole documents
    val_len = sum(len(t) for t in tokens[:split])
    counts = collections.Counter(stream[val_len:].tolist())
    ids = np.full(int(stream.max()) + 1, vocab_size - 1, dtype=np.int64)
    for new, (old, _) in enumerate(counts.most_common(vocab_size - 1)):
        ids[old] = new
    stream = ids[stream].astype(np.uint16)
    return stream[val_len:], stream[:val_len]


def train(cfg, data_dir, log_dir, optimizer, lr):
    """One python gpt2.py run; returns ({step: val loss}, [ms of each step])."""
    args = [f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--n_layer={cfg.n_layer}", f"--n_head={cfg.n_head}",
            f"--n_embd={cfg.n_embd}", f"--block_size={cfg.block_size}", f"--vocab_size={cfg.vocab_size}",
            f"--micro_batch_size={cfg.batch_size}", f"--total_batch_size={cfg.batch_size * cfg.block_size}",
            f"--max_steps={cfg.max_steps}", f"--warmup_steps={cfg.warmup_steps}", f"--max_lr={lr}", f"--min_lr={lr / 10}",
            f"--val_every={cfg.val_every}", f"--val_tokens={cfg.val_tokens}", f"--optimizer={optimizer}",
            "--hellaswag_every=0", "--sample_every=0", "--checkpoint_every=0", "--compile=0", "--device=cpu",
            "--dtype=float32", "--shuffle=0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"gpt2.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    val = dict(zip(*read_log(os.path.join(log_dir, "log.txt")).get("val", ([], [])), strict=True))
    ms = [float(m) for m in re.findall(r"\| dt\s+([\d.]+)ms", proc.stdout)]
    return val, ms


def steps_to_reach(val, target):
    """(the first validated step at or below target, the step where the line between it and the validation before
    crosses target); (None, None) if none is."""
    steps = sorted(val)
    i = next((i for i, s in enumerate(steps) if val[s] <= target), None)
    if i is None:
        return None, None
    if i == 0:
        return steps[0], steps[0]
    a, b = steps[i - 1], steps[i]
    return b, a + (b - a) * (val[a] - target) / (val[a] - val[b])


def wchar():
    """Bytes this process has written so far (/proc/self/io): to files, pipes and, on gloo, its sockets."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def cost_worker(cfg):
    """One rank under torchrun: FSDP Muon, DDP Muon and FSDP AdamW in turn, each timed and counted per step."""
    import json

    import torch
    import torch.distributed as dist
    from torch.optim import _muon

    import gpt2

    d = gpt2.setup_distributed("cpu")
    torch.set_num_threads(1)
    newton_schulz, spent = _muon._zeropower_via_newtonschulz, [0.0, 0]

    def timed(g, *args):
        t = time.perf_counter()
        out = newton_schulz(g, *args)
        spent[0] += time.perf_counter() - t
        spent[1] += g.numel()
        return out

    _muon._zeropower_via_newtonschulz = timed  # torch.optim.Muon and muon.ShardedMuon both call it through the module
    results = {}
    for mode in ("fsdp_muon", "ddp_muon", "fsdp_adamw"):
        fsdp, optimizer_name = mode.startswith("fsdp"), mode.split("_")[1]
        run_cfg = gpt2.Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                              vocab_size=cfg.vocab_size, fsdp=fsdp, optimizer=optimizer_name, compile=False)
        torch.manual_seed(0)
        model = gpt2.GPT(gpt2.model_config(run_cfg))
        if fsdp and d.world_size > 1:
            gpt2.shard_model(model, d)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", gpt2.muon_settings(run_cfg))
        train_model = gpt2.wrap_model(run_cfg, model, d)
        x, y = torch.randint(0, cfg.vocab_size, (2, cfg.batch_size // d.world_size, cfg.block_size))
        rows = []
        for _ in range(cfg.fsdp_steps):
            spent[:] = [0.0, 0]
            dist.barrier()
            start, t = wchar(), time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            train_model(x, y)[1].backward()
            gpt2.clip_gradients(model, 1.0)
            before_step = wchar()
            optimizer.step()
            rows.append({"ns_ms": 1000 * spent[0], "ns_elements": spent[1], "sent": wchar() - start,
                         "sent_optimizer": wchar() - before_step, "step_ms": 1000 * (time.perf_counter() - t)})
        results[mode] = {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, results)
    if d.is_master:
        print("RESULT " + json.dumps(gathered), flush=True)
    gpt2.teardown_distributed()


def fsdp_costs(cfg):
    """The table of Muon's step costs per rank at each world size in cfg.ranks (see the docstring)."""
    import json

    t0 = time.time()
    print(describe())
    n = 12 * cfg.n_layer * cfg.n_embd ** 2
    print(f"config: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, T={cfg.block_size}, {cfg.batch_size} "
          f"sequences per step split over the ranks; {n / 1e6:.2f}M parameters in the blocks' matrices, "
          f"{n + cfg.vocab_size * cfg.n_embd + cfg.block_size * cfg.n_embd + cfg.n_layer * 13 * cfg.n_embd:,} in all; "
          f"gloo on the CPU, 1 thread per rank, float32; medians of {cfg.fsdp_steps - 1} steps", flush=True)
    print(f"{'ranks':>5} {'mode':10} | {'Newton-Schulz ms/step, each rank':>34} | {'its matrix elements':>22} | "
          f"{'MB sent/step, each rank':>24} | {'of which optimizer':>20} | {'step ms (max)':>13}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    shape = [f"--{k}={getattr(cfg, k)}" for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size",
                                                   "fsdp_steps")]
    for world in (int(w) for w in cfg.ranks.split(",")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                               os.path.abspath(__file__), "--worker=1", *shape], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{world} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        ranks = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        for mode in ranks[0]:
            each = lambda key, scale, width, mode=mode, ranks=ranks: " ".join(f"{r[mode][key] / scale:{width}}" for r in ranks)
            print(f"{world:5d} {mode:10} | {each('ns_ms', 1, '7.1f'):>34} | {each('ns_elements', 1, '7.0f'):>22} | "
                  f"{each('sent', 1e6, '5.2f'):>24} | {each('sent_optimizer', 1e6, '5.2f'):>20} | "
                  f"{max(r[mode]['step_ms'] for r in ranks):13.0f}", flush=True)
    mean = lambda mode, key: statistics.mean(r[mode][key] for r in ranks)  # the last world size's
    print(f"at {world} ranks: FSDP Muon's Newton-Schulz per rank / DDP Muon's: "
          f"{mean('fsdp_muon', 'ns_ms') / mean('ddp_muon', 'ns_ms'):.2f}x (elements "
          f"{mean('fsdp_muon', 'ns_elements') / mean('ddp_muon', 'ns_elements'):.2f}x); its exchange / FSDP AdamW's bytes "
          f"per step: {mean('fsdp_muon', 'sent_optimizer') / mean('fsdp_adamw', 'sent'):.1%}")
    print(f"({time.time() - t0:.0f} s)")


def main(cfg, _):
    if cfg.worker:
        return cost_worker(cfg)
    if cfg.fsdp:
        return fsdp_costs(cfg)
    t0 = time.time()
    train_tokens, val_tokens = corpus_tokens(cfg.vocab_size, cfg.val_tokens)
    per_step = cfg.batch_size * cfg.block_size
    print(describe())
    print(f"config: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, T={cfg.block_size}, {per_step} tokens per "
          f"step, {cfg.max_steps} steps ({cfg.max_steps * per_step / 1e6:.2f}M tokens), cosine after {cfg.warmup_steps} "
          f"warmup steps, vocab {cfg.vocab_size}; corpus {len(train_tokens) / 1e6:.2f}M train tokens, "
          f"validation over {cfg.val_tokens:,} tokens every {cfg.val_every} steps", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        np.save(os.path.join(data_dir, "docs_val_000000.npy"), val_tokens)
        np.save(os.path.join(data_dir, "docs_train_000001.npy"), train_tokens)
        final = lambda lr: runs[("adamw", lr)][0][cfg.max_steps]
        todo = sorted(float(x) for x in cfg.adamw_lrs.split(","))
        while todo:
            lr = todo.pop(0)
            runs[("adamw", lr)] = train(cfg, data_dir, os.path.join(tmp, f"adamw_{lr:g}"), "adamw", lr)
            val = runs[("adamw", lr)][0]
            print(f"adamw max_lr={lr:g}: val loss {val[0]:.4f} -> {val[cfg.max_steps]:.4f}", flush=True)
            swept = sorted(k[1] for k in runs)
            if not todo and len(swept) > 1 and len(swept) <= len(cfg.adamw_lrs.split(",")):
                best = min(swept, key=final)
                if best in (swept[0], swept[-1]):  # at an end of the sweep: one step further
                    todo.append(best / 2 if best == swept[0] else best * 2)
        best = min((k[1] for k in runs), key=final)
        runs[("muon", best)] = train(cfg, data_dir, os.path.join(tmp, "muon"), "muon", best)
        val = runs[("muon", best)][0]
        print(f"muon (Muon at its defaults, AdamW part max_lr={best:g}): val loss {val[0]:.4f} -> "
              f"{val[cfg.max_steps]:.4f}", flush=True)
    target = runs[("adamw", best)][0][cfg.max_steps]
    print(f"\ntarget: AdamW's final val loss {target:.4f} (max_lr={best:g}, the best of the sweep)")
    reached = {}
    for name in ("adamw", "muon"):
        val, ms = runs[(name, best)]
        reached[name] = steps_to_reach(val, target)
        timed = ms[2:] or ms  # the first steps pay for allocation and kernel set-up
        step, between = reached[name]
        shown = "not reached" if step is None else f"{step * per_step:,} tokens (step {step}; {between:.0f} interpolated)"
        print(f"{name:6s} reaches it after {shown:40s} | {statistics.median(timed):7.1f} ms/step (median)")
    curve = " ".join(f"{s}:{runs[('adamw', best)][0][s]:.3f}/{runs[('muon', best)][0][s]:.3f}"
                     for s in sorted(runs[("muon", best)][0]))
    print(f"val loss by step, adamw/muon: {curve}")
    if reached["muon"][0] is not None:
        print(f"muon/adamw tokens to AdamW's final loss: {reached['muon'][0] / reached['adamw'][0]:.2f}x at the validations, "
              f"{reached['muon'][1] / reached['adamw'][1]:.2f}x interpolated (target <= 0.75x)")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
