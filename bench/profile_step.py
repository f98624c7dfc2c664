"""Our training step and build-nanogpt's, side by side in one process: built, timed in turn, and ours profiled.

bench/gpu_check.py's speed check stands on this file. Two runs timed one after the other measure the machine as much
as the code: on a busy CPU the same comparison gave 0.80x in one run and 12.5x in the next. So both steps live in one
process and run in turn (ABAB: one step of ours, one of the baseline, after a warmup of both), each timed between two
device synchronizes, and their medians are compared: whatever slows the machine for longer than a step slows both.
(Steps of a few milliseconds on a shared CPU still differ from run to run, by whether they were preempted.)

    ours, baseline = OurStep(shape, B, grad_accum, data_dir, device), NanoStep(shape, B, grad_accum, shard, device)
    times = time_in_turn({"ours": ours, "baseline": baseline}, rounds=20, warmup=8, device=device)  # {name: [seconds]}
    speed_ratio(times)  # the baseline's median step time over ours: above 1, ours is faster
    rows, per_step = breakdown(ours.eager, ours.raw_model, ours.loader, device)
    print(format_breakdown(rows, per_step, device))

breakdown says where our step's time goes, in shares that add up to the measured step: attention, the matmuls by the
layer they belong to, the loss, the optimizer, data loading, host waits and the rest. A shared floor: it imports gpt2
and is imported by commands, never the reverse.
"""

import dataclasses
import math
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt2

# --- the baseline: build-nanogpt's model, loader and step, self-contained ---


class NanoSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, n_layer):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.c_proj.init_std = 0.02 * (2 * n_layer) ** -0.5  # residual projections, scaled as GPT-2

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, n_layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoSelfAttention(n_embd, n_head, n_layer)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd), c_proj=nn.Linear(4 * n_embd, n_embd)))
        self.mlp.c_proj.init_std = 0.02 * (2 * n_layer) ** -0.5

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(h), approximate="tanh"))


class NanoGPT(nn.Module):
    """build-nanogpt's GPT: the same parameters, names and initialisation as GPT-2 (and as gpt2.GPT), and the loss
    its way: the whole (B, T, vocab) logits, then F.cross_entropy."""

    def __init__(self, block_size, vocab_size, n_layer, n_head, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([NanoBlock(n_embd, n_head, n_layer) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=getattr(module, "init_std", 0.02))
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")


class NanoLoader:
    """build-nanogpt's loader: a whole shard as an int64 tensor on the host, read B*T+1 tokens at a time."""

    def __init__(self, path, B, T):
        self.tokens = torch.tensor(np.load(path).astype(np.int32), dtype=torch.long)
        self.B, self.T, self.pos = B, T, 0

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.pos:self.pos + B * T + 1]
        self.pos += B * T
        if self.pos + B * T + 1 > len(self.tokens):
            self.pos = 0
        return buf[:-1].view(B, T), buf[1:].view(B, T)


def nanogpt_lr(step, max_lr=6e-4, warmup=715, max_steps=19073):
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min((step - warmup) / (max_steps - warmup), 1.0)
    return 0.1 * max_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * 0.9 * max_lr


class NanoStep:
    """build-nanogpt's training step, its loop's body as it runs it: its model (torch.compile'd, as build-nanogpt timed
    it), fused AdamW on CUDA, TF32, bf16 autocast on CUDA, synchronous host-to-device copies, plain F.cross_entropy, a
    device synchronize and the loss read back. step(i) trains step i and returns its loss."""

    def __init__(self, shape, B, grad_accum, train_file, device, compile=True):
        self.device, self.grad_accum = device, grad_accum
        torch.manual_seed(1337)
        torch.set_float32_matmul_precision("high")  # TF32, as build-nanogpt sets it (process-wide: the caller restores it)
        self.raw_model = NanoGPT(**shape).to(device)
        self.optimizer = self.raw_model.configure_optimizers(0.1, 6e-4, device.type)
        self.model = torch.compile(self.raw_model) if compile else self.raw_model
        self.loader = NanoLoader(train_file, B, shape["block_size"])
        self.tokens = B * shape["block_size"] * grad_accum  # per step

    def __call__(self, step):
        device = self.device
        self.optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, loss = self.model(x, y)
            loss = loss / self.grad_accum
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = nanogpt_lr(step)
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss_accum.item()  # build-nanogpt prints it every step


# --- ours: gpt2.py's own training step ---


class OurStep:
    """gpt2.py's training step, gpt2.train_step itself, on what gpt2.run_training builds for it with gpt2.py's defaults
    (compiled, bf16 autocast and the plain loss on CUDA, the chunked loss on a CPU, fused AdamW) at this shape and
    batch. Silent: its step lines go nowhere. step(i) trains step i and returns its loss; step.eager(i) the same on the
    model without torch.compile (the same weights, optimizer and loader), which breakdown can label."""

    def __init__(self, shape, B, grad_accum, data_dir, device, compile=True):
        T = shape["block_size"]
        cfg = dataclasses.replace(gpt2.Config(), **shape, micro_batch_size=B, total_batch_size=B * T * grad_accum,
                                  data_dir=data_dir, device=device.type, compile=compile, val_every=0,
                                  hellaswag_every=0, sample_every=0)  # train_step evaluates nothing
        gpt2.check_config(cfg)
        self.cfg, self.d = cfg, gpt2.Dist(0, 0, 1, device)
        torch.manual_seed(cfg.seed)
        autocast, dtype = gpt2.make_autocast(cfg.dtype, device)
        self.loader = gpt2.DataLoaderLite(data_dir, "train", B, T, vocab_size=cfg.vocab_size)
        self.raw_model, optimizer, scaler, _ = gpt2.build_model(cfg, self.d, None, None, self.loader, lambda *_: None, dtype)
        self.parts = gpt2.StepParts(
            model=gpt2.wrap_model(cfg, self.raw_model, self.d), raw_model=self.raw_model, optimizer=optimizer,
            scaler=scaler, loader=self.loader, autocast=autocast, grad_accum=grad_accum,
            flops_per_token=self.raw_model.flops_per_token(T), peak=gpt2.peak_flops(device),
            stop=gpt2.StopRequest(signals=()), progress=gpt2.Progress(cfg.max_steps))  # no signal stops it
        self.run_log = gpt2.RunLog(cfg, False, 0)  # not rank 0's: prints and writes nothing
        self.tokens = cfg.total_batch_size  # per step

    def __call__(self, step):
        loss, _ = gpt2.train_step(self.cfg, self.d, self.parts, step, self.run_log)
        return loss

    def eager(self, step):
        eager = dataclasses.replace(self.parts, model=self.raw_model)
        loss, _ = gpt2.train_step(self.cfg, self.d, eager, step, self.run_log)
        return loss


# --- timing in turn ---


def time_in_turn(steps, rounds, warmup, device, clock=time.perf_counter):
    """Rounds of one call of each step function in `steps` ({name: step(i)}), in their order: A B A B ... The first
    `warmup` rounds are not timed (compilation, the allocator, the caches); each later call is timed between two
    device synchronizes. Returns {name: [seconds of each of the `rounds` timed calls]}."""
    times = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            gpt2.synchronize(device)
            start = clock()
            step(i)
            gpt2.synchronize(device)
            if i >= warmup:
                times[name].append(clock() - start)
    return times


def speed_ratio(times, ours="ours", baseline="baseline"):
    """How much faster ours is: the baseline's median step time over ours (medians: a step that a neighbour's burst
    slowed moves a mean, not a median)."""
    return statistics.median(times[baseline]) / statistics.median(times[ours])


# --- where a step's time goes ---


CATEGORIES = ("attention", "matmul qkv", "matmul attn out", "matmul mlp", "matmul lm_head", "loss", "optimizer", "data",
              "host / idle", "other")
LABEL = "label: "  # the record_function ranges that labelled() opens, around the work of one kind
STEP, LOSS, DATA = LABEL + "step", LABEL + "loss", LABEL + "data"
LINEARS = {"attn.c_attn": "qkv", "attn.c_proj": "attn out", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp", "lm_head": "lm_head"}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_addmm_activation"}
ATTENTION = ("scaled_dot_product", "scaleddotproduct", "flash", "fmha", "efficient_attention", "cudnn_attention")
OPTIMIZER = ("Optimizer.", "aten::_foreach_", "aten::_fused_adam")  # torch's own ranges around step and zero_grad
HOST_DATA = ("aten::pin_memory", "aten::_pin_memory", "Memcpy HtoD")  # the copy to the GPU; on CUDA, a memcpy kernel
HOST_WAITS = {"aten::item", "aten::_local_scalar_dense", "cudaDeviceSynchronize", "cudaStreamSynchronize"}


def categorize(names):
    """The category of one piece of a step's work, from the names around it: outermost first, its own last. They are
    the labels (labelled), the ops that called it and, on CUDA, the kernel itself; a backward op's list starts with the
    names of the forward op that made it (label_chains). "other" is every op in none of the other categories:
    LayerNorm, GELU, the embeddings, residual adds, dtype casts, gradient accumulation and the loss scale."""
    lowered = [n.lower() for n in names]
    if any(pattern in n for n in lowered for pattern in ATTENTION):
        return "attention"
    linears = [n.removeprefix(LABEL) for n in names if n.startswith(LABEL) and n.removeprefix(LABEL) in LINEARS.values()]
    if linears:
        return f"matmul {linears[-1]}"  # the innermost: lm_head's matmul sits inside the loss's range
    if LOSS in names:  # the chunked loss computes lm_head's logits and their gradients itself, chunk by chunk
        return "matmul lm_head" if any(n in MATMULS for n in names[names.index(LOSS):]) else "loss"
    if any(n.startswith(OPTIMIZER) for n in names):
        return "optimizer"
    if DATA in names or any(n.startswith(HOST_DATA) for n in names):
        return "data"
    if names[-1] == STEP or any(n in HOST_WAITS for n in names):
        return "host / idle"  # the step's own time between ops: Python, and waits for the device
    return "other"


class Ranges:
    """record_function ranges opened in one hook and closed in another, innermost last."""

    def __init__(self):
        self.open = []

    def enter(self, name):
        from torch.profiler import record_function

        rf = record_function(name)
        rf.__enter__()
        self.open.append((name, rf))

    def exit(self, name):
        if self.open and self.open[-1][0] == name:
            self.open.pop()[1].__exit__(None, None, None)


@contextmanager
def labelled(model, loader):
    """Labels a GPT's work while inside: a record_function range around each Linear layer's forward (LINEARS: the
    qkv, attention output, MLP and lm_head matmuls), one from the final LayerNorm to the end of the forward (the loss,
    with lm_head's matmul inside it), and one around the loader's next_batch. Backward work is labelled after the fact,
    by the forward op that made it (label_chains). Forward hooks, removed on leaving: eager only (torch.compile traces
    through them and fuses across the labels)."""
    ranges, handles = Ranges(), []
    for name, module in model.named_modules():
        kind = next((k for suffix, k in LINEARS.items() if name == suffix or name.endswith("." + suffix)), None)
        if kind:
            handles.append(module.register_forward_pre_hook(lambda m, a, label=LABEL + kind: ranges.enter(label)))
            handles.append(module.register_forward_hook(lambda m, a, o, label=LABEL + kind: ranges.exit(label)))
    handles.append(model.transformer.ln_f.register_forward_hook(lambda m, a, o: ranges.enter(LOSS)))
    handles.append(model.register_forward_hook(lambda m, a, o: ranges.exit(LOSS)))
    next_batch = loader.next_batch

    def labelled_next_batch():
        from torch.profiler import record_function

        with record_function(DATA):
            return next_batch()

    loader.next_batch = labelled_next_batch
    try:
        yield
    finally:
        del loader.next_batch  # the class's method again
        for handle in handles:
            handle.remove()


def is_backward(event):
    """The autograd node's range an event runs in (itself or its nearest such parent), or None in the forward."""
    while event is not None:
        if event.scope == 1 or event.name.startswith("autograd::engine::evaluate_function"):  # 1: BACKWARD_FUNCTION
            return event
        event = event.cpu_parent
    return None


def label_chains(events):
    """{id(event): (event, names, own)} for the CPU events: `own` the names from its outermost range down to itself, `names`
    the same after, for a backward op, the `own` names of the forward op that made its node. An autograd node takes
    the sequence number of the forward op that created it, on that op's thread (as torch's own profiler matches
    backward ops to forward stack traces); of the forward events with that number, the last to start is the op that
    created the node or one inside it (ops before it with the same number made no node)."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    cpu.sort(key=lambda e: (e.time_range.start, -e.time_range.end))  # a parent before a child that starts with it
    own = {}
    for e in cpu:  # parents start first: each one's chain is known before its children's
        own[id(e)] = (own[id(e.cpu_parent)] if e.cpu_parent is not None and id(e.cpu_parent) in own else ()) + (e.name,)
    forward = {}
    for e in cpu:
        if e.sequence_nr >= 0 and is_backward(e) is None:
            forward[(e.sequence_nr, e.thread)] = own[id(e)]
    chains = {}
    for e in cpu:
        node = is_backward(e)
        made_by = forward.get((node.sequence_nr, node.fwd_thread), ()) if node is not None else ()
        chains[id(e)] = (e, list(made_by + own[id(e)]), own[id(e)])
    return chains


def time_by_category(events, on_device):
    """{category: microseconds} over a profile's events. On the CPU: each op's self time (its time less its children's),
    for the ops inside the STEP ranges. On CUDA: each kernel's time on the GPU, categorised with the op that launched
    it (its self device time, as torch's own tables count it)."""
    total = dict.fromkeys(CATEGORIES, 0.0)
    for event, names, own in label_chains(events).values():
        if on_device:
            for kernel in event.kernels:
                if not (event.is_user_annotation and kernel.name == event.name):  # a range's mirror on the GPU
                    total[categorize(names + [kernel.name])] += kernel.duration
        elif STEP in own:
            total[categorize(names)] += event.self_cpu_time_total
    return total


def breakdown(step, model, loader, device, steps=3, first=0, warmup=1):
    """Where the time of step(i) goes: `warmup` calls, then `steps` more under torch.profiler, each in a STEP range and
    timed between device synchronizes, with the model's work labelled (labelled). Returns ([(category, seconds per
    step, share of the step)] in CATEGORIES' order, the measured seconds per step). The shares are of the measured
    time: on CUDA, host / idle is what the kernels leave of it (the GPU waiting on the host: Python, launches, syncs),
    so they add up to 100% unless kernels overlapped; on the CPU every row is measured and they add up to about 100%
    (the synchronizes and the profiler's own bookkeeping between the ranges are left out)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for i in range(warmup):
        step(first + i)
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    measured = 0.0
    with labelled(model, loader), profile(activities=activities) as prof:
        for i in range(first + warmup, first + warmup + steps):
            gpt2.synchronize(device)
            start = time.perf_counter()
            with record_function(STEP):
                step(i)
                gpt2.synchronize(device)
            measured += time.perf_counter() - start
    total = time_by_category(prof.events(), on_device)
    if on_device:
        total["host / idle"] += max(measured * 1e6 - sum(total.values()), 0.0)
    per_step = measured / steps
    return [(c, total[c] / 1e6 / steps, total[c] / 1e6 / measured) for c in CATEGORIES], per_step


def format_breakdown(rows, per_step, device):
    """breakdown's figures as a small table, one category a line, under a line saying what was measured."""
    what = ("GPU time of each kernel, by the op that launched it; host / idle = the step's time the kernels leave"
            if device.type == "cuda" else "CPU self time of each op; host / idle = Python between the ops")
    lines = [f"where our step's time goes (eager, under torch.profiler: {1e3 * per_step:.2f} ms/step; {what}):",
             f"  {'category':16s} {'ms/step':>9s} {'share':>7s}"]
    lines += [f"  {c:16s} {1e3 * s:9.2f} {100 * share:6.1f}%" for c, s, share in rows]
    lines.append(f"  {'total':16s} {1e3 * sum(s for _, s, _ in rows):9.2f} {100 * sum(sh for _, _, sh in rows):6.1f}%")
    return "\n".join(lines)
