"""Memory per rank on 2 gloo ranks of this CPU: DDP vs FSDP, each with and without activation checkpointing, and GPT-2 large.

    python bench/bench_memory.py                  # GPT-2 medium's shape (24 layers, 1024 wide), short sequences
    python bench/bench_memory.py --run=large      # GPT-2 large (774M) trained 3 steps by gpt2.py on 2 FSDP ranks
    python bench/bench_memory.py --run=resume     # GPT-2 medium's shape on 2 FSDP ranks: host memory of a resume vs training
    python bench/bench_memory.py --run=table      # the table of estimates in docs/scaling.md (GPT-2 sizes x 8 ranks x GPUs)
    python bench/bench_memory.py --run=simulate   # GPT-2 1.5B sharded by the real FSDP2 code over 8 and 64 fake ranks
    python bench/bench_memory.py --run=simulate --optimizer=muon   # the same with Muon (--run=resume takes it too)

`compare` starts each setting as its own 2-rank torchrun of this file, which measures its resident memory (RSS,
what the CPU's "GPU memory" is here) at each phase: after the model and optimizer are built, after the first
optimizer step (weights + gradients + AdamW state), and the peak over the next steps; peak - state is what a step
adds (activations, and under FSDP the gathered units). Every figure is above the RSS of the process before the model
(torch, gloo). `saved` is the activation memory proper: the bytes of the tensors autograd keeps for the backward
pass (torch.autograd.graph.saved_tensors_hooks, weights left out). `large` runs gpt2.py itself
and reads each rank's peak RSS from /proc while it trains; DDP is not run at that size (it would not fit two ranks
in 24 GB) but estimated. gpt2.py's own estimate (estimate_memory, printed at the start of a run) is shown beside.
`simulate` runs gpt2.shard_model (the real FSDP2 code) at world sizes this machine has no ranks for: one process
joins torch's fake process group as one rank, builds the model as fake tensors (FakeTensorMode: shapes, no memory),
shards it, takes one fake forward, backward and AdamW step, and counts that rank's bytes of weights, gradients and
optimizer state, for the first and the last rank, against estimate_memory's.
"""

import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from machine import descendants  # noqa: E402

from cli import run_cli  # noqa: E402
from plot import read_log  # noqa: E402

GB = 1e9
FSDP_T, FSDP_B = 64, 2  # large and resume: tokens per sequence, sequences per rank
SIZES = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280), "1.5B": (48, 25, 1600)}


@dataclass
class Config:
    run: str = "compare"  # compare | large | resume | table | simulate
    n_layer: int = 24  # compare: the model shape (GPT-2 medium)
    n_head: int = 16
    n_embd: int = 1024
    vocab_size: int = 50304
    T: int = 128  # compare: sequence length
    B: int = 8  # compare: sequences per rank
    steps: int = 2  # compare: optimizer steps; the state is measured after the first, the peak over the others
    settings: str = "ddp,ddp_recompute,fsdp,fsdp_recompute"  # compare: which of them to run
    setting: str = ""  # internal: the one setting a torchrun worker measures (one of settings)
    model: str = "1.5B"  # simulate: 124M | 350M | 774M | 1.5B, or custom (n_layer, n_head, n_embd above; T as block_size)
    world_sizes: str = "8,64"  # simulate: the simulated numbers of ranks
    optimizer: str = "adamw"  # simulate and resume: adamw, or muon (simulate: Muon's momentum and its step's memory)


def rss(field="VmRSS", pid="self"):
    """Resident memory in bytes from /proc: VmRSS now, or VmHWM, the peak since start (or since reset_peak)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def settle():
    """Gives freed memory back to the system, so that RSS counts only live tensors."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def worker(cfg):
    """One rank of one setting, under torchrun: measures and prints one JSON line per rank."""
    import torch
    import torch.distributed as dist

    import gpt2

    d = gpt2.setup_distributed("cpu")
    torch.set_num_threads(1)
    settle()
    base = rss()
    fsdp, recompute = cfg.setting.startswith("fsdp"), cfg.setting.endswith("_recompute")
    run_cfg = gpt2.Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                          block_size=cfg.T, micro_batch_size=cfg.B, fsdp=fsdp, activation_checkpointing=recompute)
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.model_config(run_cfg))
    for block in model.transformer.h:
        block.recompute = recompute
    if fsdp:
        gpt2.shard_model(model, d)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 1e-8, "cpu")
    train_model = gpt2.wrap_model(run_cfg, model, d)
    settle()
    built = rss() - base
    x, y = torch.randint(0, min(cfg.vocab_size, 50257), (2, cfg.B, cfg.T))
    saved = {}  # storage: bytes of the tensors autograd keeps for the backward pass (not the weights)

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for step in range(cfg.steps):
        if step == 1:
            settle()
            state = rss() - base  # weights, gradients (kept until the next zero_grad) and AdamW state
            reset_peak()
            saved.clear()
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = train_model(x, y)
        loss.backward()
        gpt2.clip_gradients(model, 1.0)
        optimizer.step()
    peak = rss("VmHWM") - base
    estimate = gpt2.estimate_memory(run_cfg, d.world_size, torch.float32, "chunked")
    result = {"rank": d.rank, "setting": cfg.setting, "built": built, "state": state, "peak": peak,
              "activations": peak - state, "saved": sum(saved.values()), "estimate": estimate, "loss": loss.item()}
    results = [None] * d.world_size
    dist.all_gather_object(results, result)
    if d.is_master:
        print("RESULT " + json.dumps(results))
    gpt2.teardown_distributed()


def torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def compare(cfg):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = {}
    for setting in cfg.settings.split(","):
        shape = [f"--{k}={getattr(cfg, k)}" for k in ("n_layer", "n_head", "n_embd", "vocab_size", "T", "B", "steps")]
        args = [os.path.abspath(__file__), f"--setting={setting}", *shape]
        out = subprocess.run(torchrun(args), capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{setting} failed:\n{out.stdout}\n{out.stderr}")
        ranks = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows[setting] = {k: max(r[k] for r in ranks) for k in ("built", "state", "peak", "activations", "saved")}
        rows[setting]["estimate"] = ranks[0]["estimate"]
        rows[setting]["loss"] = [r["loss"] for r in ranks]
    n = 12 * cfg.n_layer * cfg.n_embd ** 2 / 1e6
    print(f"{cfg.n_layer} layers, {cfg.n_embd} wide (~{n:.0f}M in the blocks), vocab {cfg.vocab_size}, "
          f"{cfg.B}x{cfg.T} tokens per rank, 2 gloo ranks, float32, chunked loss; GB per rank (the larger rank)")
    print(f"{'setting':16} {'model+opt':>9} {'+grads,AdamW':>12} {'peak':>7} {'peak-state':>10} {'saved':>7} "
          f"{'estimate':>9} {'est. state':>10} {'est. act.':>9}")
    for setting, r in rows.items():
        e = r["estimate"]
        est_state = e["weights"] + e["gradients"] + e["optimizer"]
        print(f"{setting:16} {r['built'] / GB:9.2f} {r['state'] / GB:12.2f} {r['peak'] / GB:7.2f} {r['activations'] / GB:10.2f}"
              f" {r['saved'] / GB:7.2f} {e['total'] / GB:9.2f} {est_state / GB:10.2f} {e['activations'] / GB:9.2f}")
    if "ddp" in rows and "fsdp" in rows:
        print(f"FSDP weights+gradients+AdamW per rank / DDP's: {rows['fsdp']['state'] / rows['ddp']['state']:.2f}x "
              f"(target <= 0.55x)")
    if "fsdp" in rows and "fsdp_recompute" in rows:
        fsdp, rec = rows["fsdp"], rows["fsdp_recompute"]
        print(f"activation memory, FSDP / FSDP + recompute: saved for backward {fsdp['saved'] / rec['saved']:.2f}x "
              f"(target >= 3x); peak - state {fsdp['activations'] / rec['activations']:.2f}x")
    for setting, r in rows.items():
        print(f"{setting}: estimate / measured peak = {r['estimate']['total'] / r['peak']:.2f}; losses {r['loss']}")


def gpt2_fsdp_args(data_dir, size):
    """gpt2.py's command line for a GPT of SIZES[size] on 2 FSDP ranks of this CPU, 2 x 64 tokens each, float32,
    without evaluation or compile, on random tokens that it writes to data_dir."""
    rng = np.random.default_rng(0)
    for split, n in (("val", 10000), ("train", 100000)):
        np.save(os.path.join(data_dir, f"bench_{split}_000000.npy"), rng.integers(0, 50257, n, dtype=np.uint16))
    n_layer, n_head, n_embd = SIZES[size]
    return [os.path.join(ROOT, "gpt2.py"), f"--data_dir={data_dir}", f"--n_layer={n_layer}", f"--n_head={n_head}",
            f"--n_embd={n_embd}", f"--block_size={FSDP_T}", f"--micro_batch_size={FSDP_B}",
            f"--total_batch_size={2 * FSDP_B * FSDP_T}", "--val_every=0", "--hellaswag_every=0", "--sample_every=0",
            "--compile=0", "--device=cpu", "--fsdp=1"]


def large(cfg):
    """GPT-2 large (774M) trained 3 steps by gpt2.py on 2 FSDP ranks; each rank's peak RSS read from /proc."""
    import gpt2

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        args = [*gpt2_fsdp_args(tmp, "774M"), f"--log_dir={tmp}/log", "--max_steps=3", "--checkpoint_every=0"]
        start = time.time()
        peaks, out = rank_peaks(args, env, "VmHWM", every=0.2)  # a high-water mark: no need to poll often
    print("\n".join(line for line in out.splitlines() if line.startswith(("step", "memory per rank", "7"))))
    estimate = float(re.search(r"memory per rank \(estimate, GB\).*= ([\d.]+)", out).group(1))
    n_layer, n_head, n_embd = SIZES["774M"]
    run_cfg = gpt2.Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=FSDP_T, micro_batch_size=FSDP_B)
    ddp = gpt2.estimate_memory(run_cfg, 2, gpt2.torch.float32, "chunked")["total"] / GB
    measured = max(peaks.values()) / GB
    print(f"GPT-2 large (774M), {FSDP_B}x{FSDP_T} tokens per rank, 2 gloo ranks with --fsdp=1, 3 steps in "
          f"{time.time() - start:.0f} s")
    print(f"peak RSS per rank: {', '.join(f'{p / GB:.2f}' for p in peaks.values())} GB; gpt2.py's estimate {estimate:.2f} GB "
          f"(estimate / measured = {estimate / measured:.2f}); DDP would need {ddp:.2f} GB per rank (estimate), "
          f"{2 * ddp:.1f} GB for the two")


def rank_of(pid):
    """torchrun's RANK of process pid, or None for a process that is not a rank of gpt2.py."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            cmdline = f.read()
        if "gpt2.py" not in cmdline or "torch.distributed.run" in cmdline:
            return None
        with open(f"/proc/{pid}/environ") as f:
            env = dict(kv.split("=", 1) for kv in f.read().split("\0") if "=" in kv)
        return int(env["RANK"])
    except (OSError, KeyError, ValueError):
        return None


def rank_peaks(args, env, field, every):
    """Runs torchrun with args; returns ({rank: the peak of field in /proc/PID/status}, the output), polled every
    `every` seconds from the processes that are ranks of gpt2.py."""
    peaks, ranks = {}, {}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a pipe nobody reads would stop a chatty run
        proc = subprocess.Popen(torchrun(args), stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                if ranks.get(pid) is None:  # asked again until the forked process has become a rank
                    ranks[pid] = rank_of(pid)
                if ranks[pid] is not None:
                    try:
                        peaks[ranks[pid]] = max(peaks.get(ranks[pid], 0), rss(field, pid))
                    except (OSError, StopIteration):
                        pass
            time.sleep(every)
        log.seek(0)
        out = log.read()
    if proc.returncode:
        sys.exit(f"gpt2.py failed:\n{out}")
    return dict(sorted(peaks.items())), out


def resume(cfg):
    """GPT-2 medium's shape on 2 FSDP ranks: one step trained and checkpointed, then resumed for one more. The peak
    private memory of rank 1 (which does not write checkpoints) in each run, and the resumed run's losses against an
    uninterrupted one's. Private (anonymous) memory is the process's own: a file mapped and read (a checkpoint loaded
    with mmap) is page cache, shared by the ranks of a node and given back under pressure, so it is not counted; it is
    polled every 5 ms."""
    n_layer, _, n_embd = SIZES["350M"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        common = [*gpt2_fsdp_args(tmp, "350M"), "--checkpoint_every=1", f"--optimizer={cfg.optimizer}"]
        private_peaks = lambda *args: rank_peaks([*common, *args], env, "RssAnon", every=0.005)[0]
        start = time.time()
        train = private_peaks(f"--log_dir={tmp}/log", "--max_steps=1")
        resumed = private_peaks(f"--log_dir={tmp}/log", "--max_steps=2", "--init_from=resume")
        private_peaks(f"--log_dir={tmp}/straight", "--max_steps=2")  # for its losses
        losses = [read_log(os.path.join(tmp, name, "log.txt"))["train"] for name in ("log", "straight")]
        size = os.path.getsize(os.path.join(tmp, "log", "model_00001.pt"))
    print(f"GPT-2 medium's shape ({n_layer} x {n_embd}), {FSDP_B}x{FSDP_T} tokens per rank, 2 gloo ranks with --fsdp=1, "
          f"float32; checkpoint {size / GB:.2f} GB; three runs in {time.time() - start:.0f} s")
    print(f"peak private (anonymous) memory of rank 1: training {train[1] / 2**30:.2f} GiB, resume {resumed[1] / 2**30:.2f} "
          f"GiB: {resumed[1] / train[1]:.2f}x (target <= 1.25x); rank 0 (writes checkpoints): {train[0] / 2**30:.2f} and "
          f"{resumed[0] / 2**30:.2f} GiB")
    print(f"losses (steps, values), resumed vs uninterrupted: {losses[0]} vs {losses[1]}: "
          f"{'equal' if losses[0] == losses[1] else 'DIFFERENT'}")


def largest_micro_batches(run_cfg, world_size, state=None):
    """The largest micro batch (T=1024, bf16, plain loss) whose estimate fits 24, 40 and 80 GB ("-": not one sequence).
    state: bytes of weights + gradients + AdamW per rank to use instead of the estimate's (a simulated count)."""
    import gpt2

    def total(b):
        e = gpt2.estimate_memory(replace(run_cfg, micro_batch_size=b), world_size, gpt2.torch.bfloat16, "plain")
        return e["total"] if state is None else e["total"] - e["weights"] - e["gradients"] - e["optimizer"] + state

    fits = []
    for budget in (24, 40, 80):
        best = 0
        for b in range(1, 257):
            if total(b) > budget * GB:
                break
            best = b
        fits.append(str(best) if best else "-")
    return fits


def table_row(name, mode, run_cfg, world_size, state=None):
    """One row of docs/scaling.md's table: model, mode, state per rank, activations per sequence, the micro batches that fit."""
    import gpt2

    one = gpt2.estimate_memory(replace(run_cfg, micro_batch_size=1), world_size, gpt2.torch.bfloat16, "plain")
    held = (one["weights"] + one["gradients"] + one["optimizer"] if state is None else state) + one["gathered"]
    fits = largest_micro_batches(run_cfg, world_size, state)
    return f"| {name} | {mode} | {held / GB:.1f} GB | {one['activations'] / GB:.2f} GB | {' | '.join(fits)} |"


def table(cfg):
    """Per size and mode, the largest micro batch (T=1024, bf16, loss_impl auto = plain on CUDA) that fits each GPU."""
    import gpt2

    print("| model | mode (8 ranks unless said) | weights, grads, AdamW, gathered | activations per sequence | 24 GB | 40 GB "
          "| 80 GB |")
    print("|---|---|---|---|---|---|---|")
    for name, (n_layer, n_head, n_embd) in SIZES.items():
        for mode, fsdp, recompute in (("DDP", False, False), ("DDP + recompute", False, True), ("FSDP", True, False),
                                      ("FSDP + recompute", True, True)):
            run_cfg = gpt2.Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, fsdp=fsdp,
                                  activation_checkpointing=recompute)
            print(table_row(name, mode, run_cfg, 8))


def simulate_rank(run_cfg, rank, world_size):
    """One rank of gpt2.py's FSDP2 sharding at world_size, with no memory behind it: {part: bytes on this rank}.

    The fake process group answers every collective at once; FakeTensorMode gives tensors shapes and dtypes only.
    The device mesh is made outside the fake mode (it reads real rank numbers), so the model is built under it,
    sharded outside it, and the step runs under it again. FSDP2 splits dim 0 of every parameter with ceil and pads
    the last shards: "weights_padded" is the storage this rank allocates, the other parts its local shards' sizes."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import gpt2

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        fake = FakeTensorMode()
        with fake:
            model = gpt2.GPT(gpt2.model_config(run_cfg))
        gpt2.shard_model(model, gpt2.Dist(rank, rank, world_size, torch.device("cpu")))
        with fake:
            optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu", gpt2.muon_settings(run_cfg))
            model.loss_impl = "plain"
            x = torch.randint(0, run_cfg.vocab_size, (1, run_cfg.block_size))
            _, loss = model(x, x)
            loss.backward()
            gpt2.clip_gradients(model, 1.0)
            optimizer.step()
            muon_step = muon_step_bytes(model, optimizer) if run_cfg.optimizer == "muon" else 0
        states = [optimizer.state] if run_cfg.optimizer != "muon" else [optimizer.adamw.state, optimizer.muon.state]
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
        nbytes = lambda t: local(t).numel() * local(t).element_size()
        padded = 0
        for module in model.modules():
            state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
            group = state._fsdp_param_group if state else None  # FSDP2's own record of the unit's padded shards
            padded += sum(p._sharded_param_data.numel() * p._sharded_param_data.element_size()
                          for p in (group.fsdp_params if group else []))
        params = list(model.parameters())
        return {"weights": sum(nbytes(p) for p in params), "weights_padded": padded,
                "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(nbytes(v) for state in states for s in state.values() for k, v in s.items() if k != "step"),
                "step_counts": sum(nbytes(s["step"]) for state in states for s in state.values() if "step" in s),
                "muon_step": muon_step}
    finally:
        dist.destroy_process_group()


def muon_step_bytes(model, optimizer):
    """The most bytes a second step of the distributed Muon (the first makes its momentum) holds at once beyond what
    existed before it, as torch's MemTracker counts the tensors it creates (fake ones here: their sizes)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer.adamw, optimizer.muon)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        optimizer.muon.step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before


def simulate(cfg):
    """Per simulated rank: FSDP2's bytes of weights, gradients and AdamW state against estimate_memory's."""
    import gpt2

    n_layer, n_head, n_embd = (cfg.n_layer, cfg.n_head, cfg.n_embd) if cfg.model == "custom" else SIZES[cfg.model]
    block_size = cfg.T if cfg.model == "custom" else 1024
    run_cfg = gpt2.Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=cfg.vocab_size,
                          block_size=block_size, fsdp=True, optimizer=cfg.optimizer, micro_batch_size=1)  # state only
    muon = cfg.optimizer == "muon"
    print(f"GPT-2 {cfg.model} ({n_layer} layers, {n_embd} wide, vocab {cfg.vocab_size}, T={block_size}) sharded by "
          f"gpt2.shard_model (FSDP2) in torch's fake process group, one fake step; float32 (no bf16 policy on a CPU mesh)"
          + ("; --optimizer=muon: optimizer = AdamW's moments and Muon's momentum, muon step = what a second Muon step "
             "holds at once beyond them (torch's MemTracker)" if muon else ""))
    print(f"{'ranks':>5} {'rank':>4} {'weights':>9} {'(padded)':>9} {'gradients':>9} {'optimizer':>9} "
          + (f"{'muon step':>9} " if muon else "") + f"| {'estimate:':>9} {'weights':>9} {'gradients':>9} {'optimizer':>9} "
          + (f"{'muon step':>9} " if muon else "") + "| simulated / estimate (GB)")
    parts = ("weights", "gradients", "optimizer", "muon_step") if muon else ("weights", "gradients", "optimizer")
    results = []
    for world_size in (int(w) for w in cfg.world_sizes.split(",")):
        estimate = gpt2.estimate_memory(run_cfg, world_size, gpt2.torch.float32, "plain")
        for rank in sorted({0, world_size - 1}):
            r = simulate_rank(run_cfg, rank, world_size)
            if muon:  # this rank's share of the step (estimate_memory counts the most loaded rank's)
                shapes = [(3 * n_embd, n_embd), (n_embd, n_embd), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)] * n_layer
                estimate = {**estimate, "muon_step": gpt2.step_bytes(shapes, [3, 1, 1, 1] * n_layer, world_size, rank)}
            ratios = {k: r[k] / estimate[k] for k in parts}
            print(f"{world_size:5d} {rank:4d} {r['weights'] / GB:9.3f} {r['weights_padded'] / GB:9.3f} "
                  + "".join(f"{r[k] / GB:9.3f} " for k in parts[1:]) + f"| {'':9} "
                  + "".join(f"{estimate[k] / GB:9.3f} " for k in parts) + "| "
                  + " ".join(f"{k} {v:.4f}" for k, v in ratios.items()))
            results.append({"world_size": world_size, "rank": rank, **r, "estimate": {k: estimate[k] for k in parts}})
    print("\nrows for docs/scaling.md's table (bf16, T=1024; weights, gradients and AdamW as simulated, the rest estimated):")
    for world_size in sorted({r["world_size"] for r in results}):
        state = max(r["weights_padded"] + r["gradients"] + r["optimizer"] for r in results if r["world_size"] == world_size)
        for mode, recompute in (("FSDP", False), ("FSDP + recompute", True)):
            row_cfg = replace(run_cfg, activation_checkpointing=recompute)
            print(table_row(cfg.model, f"{mode}, {world_size} ranks, simulated", row_cfg, world_size, state))
    print("RESULT " + json.dumps(results))


def main(cfg, _):
    if cfg.setting:
        return worker(cfg)
    from machine import describe

    print(describe())
    {"compare": compare, "large": large, "resume": resume, "table": table, "simulate": simulate}[cfg.run](cfg)


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
