"""GPT-2 124M training throughput on one CUDA GPU: gpt2.py's loop against build-nanogpt's recipe, on the same tokens.

"ours" is `python gpt2.py` itself (bf16 autocast, torch.compile, fused AdamW, TF32, loss_impl auto = plain on CUDA,
pinned non-blocking copies, one host sync per step), its step times read from its step lines. "baseline" is
build-nanogpt's train_gpt2.py recipe, written out below as its own small model and loop so that nothing of ours
flatters it or slows it: its GPT (lm_head, then plain F.cross_entropy on the logits), fused AdamW, TF32,
torch.compile (as build-nanogpt timed it; its final script leaves compilation off for the sake of its evaluation),
bf16 autocast, synchronous host-to-device copies, a device synchronize and the loss read back each step. Both train
the same shape on the same random tokens, with the same batch per step. Prints tokens/s, step ms, MFU against the
GPU's dense bf16 peak, and peak memory; the last line is the ratio. Skips (exit 0) without a CUDA GPU.
    python bench/bench_gpu.py                     # micro batch 64 (80 GB cards); --B=32 or 16 on smaller ones
    python bench/bench_gpu.py --device=cpu --compile=0 --n_layer=2 --n_head=2 --n_embd=64 --T=64 --B=4 --steps=4 --warmup=1
                                                  # the same comparison on a CPU at a tiny size, to try the code
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cli import answer_help

    answer_help(__file__)

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from machine import describe  # noqa: E402
from profile_step import NanoGPT, NanoLoader, nanogpt_lr  # noqa: E402

import gpt2  # noqa: E402
from cli import run_cli  # noqa: E402


@dataclass
class Config:
    B: int = 64  # micro batch
    T: int = 1024  # sequence length
    grad_accum: int = 2  # micro-steps per optimizer step
    steps: int = 30  # optimizer steps per loop...
    warmup: int = 10  # ...of which the first are not timed (compilation, allocator warm-up)
    n_layer: int = 12  # the model (GPT-2 124M, vocabulary padded to 50304 as both recipes do)
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    device: str = "cuda"  # cuda; cpu only to try the code at a tiny size (float32, no MFU)
    compile: bool = True  # torch.compile both


# --- the baseline: build-nanogpt's training loop (its model, loader and schedule are in profile_step.py) ---


def baseline(cfg, train_file):
    """build-nanogpt's training loop for cfg.steps steps: (seconds per step, loss per step)."""
    device = torch.device(cfg.device)
    torch.manual_seed(1337)
    torch.set_float32_matmul_precision("high")  # TF32
    model = NanoGPT(cfg.T, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, device.type)
    if cfg.compile:
        model = torch.compile(model)
    loader = NanoLoader(train_file, cfg.B, cfg.T)
    use_bf16 = device.type == "cuda"
    dts, losses = [], []
    for step in range(cfg.steps):
        t0 = time.time()
        optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                _, loss = model(x, y)
            loss = loss / cfg.grad_accum
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dts.append(time.time() - t0)
        losses.append(loss_accum.item())  # build-nanogpt prints it every step
    return dts, losses


# --- ours: gpt2.py as a user runs it ---


def ours(cfg, data_dir, log_dir):
    """gpt2.py for cfg.steps steps in its own process: (seconds per step, peak memory in GB or None)."""
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, block_size=cfg.T)
    args = [f"--{k}={v}" for k, v in shape.items()] + [
        f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--micro_batch_size={cfg.B}", f"--max_steps={cfg.steps}",
        f"--total_batch_size={cfg.B * cfg.T * cfg.grad_accum}", "--val_every=0", "--hellaswag_every=0",
        "--sample_every=0", "--checkpoint_every=0", f"--device={cfg.device}", f"--compile={int(cfg.compile)}"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
    if proc.returncode:
        sys.exit(f"gpt2.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    dts = [float(m.group(1)) / 1e3 for m in re.finditer(r"dt\s+([\d.]+)ms", proc.stdout)]
    mems = [float(m.group(1)) for m in re.finditer(r"mem\s+([\d.]+)GB", proc.stdout)]
    return dts, max(mems) if mems else None


def write_tokens(data_dir, train_tokens, vocab=50257, seed=0):
    """Random tokens as fineweb.py's shards (one train, one val); returns the train shard's path."""
    rng = np.random.default_rng(seed)
    for split, n in (("val", 100_000), ("train", train_tokens)):
        np.save(os.path.join(data_dir, f"bench_{split}_000000.npy"), rng.integers(0, vocab, n, dtype=np.uint16))
    return os.path.join(data_dir, "bench_train_000000.npy")


def main(cfg, _):
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here, skipped")
        return
    if cfg.steps <= cfg.warmup:
        raise gpt2.UserError(f"--steps={cfg.steps} leaves nothing to time after --warmup={cfg.warmup}: "
                             f"pass --steps={cfg.warmup + 10}")
    peak = gpt2.peak_flops(device)
    flops_per_token = gpt2.GPT(gpt2.GPTConfig(block_size=cfg.T, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                                              n_head=cfg.n_head, n_embd=cfg.n_embd)).flops_per_token(cfg.T)
    tokens = cfg.B * cfg.T * cfg.grad_accum
    print(describe(device))
    print(f"{cfg.n_layer} layers, {cfg.n_embd} wide, T={cfg.T}, micro batch {cfg.B} x {cfg.grad_accum} micro-steps "
          f"= {tokens} tokens per step, {cfg.steps} steps, the first {cfg.warmup} not timed")
    with tempfile.TemporaryDirectory() as tmp:
        # enough tokens that neither loop reads any twice
        train_file = write_tokens(tmp, tokens * cfg.steps + cfg.B * cfg.T + 1, vocab=min(cfg.vocab_size, 50257))
        results = {}
        our_dts, our_mem = ours(cfg, tmp, os.path.join(tmp, "log"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base_dts, _ = baseline(cfg, train_file)
        base_mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        for label, dts, mem in (("ours", our_dts, our_mem), ("baseline", base_dts, base_mem)):
            dt = statistics.median(dts[cfg.warmup:])
            results[label] = dt
            mfu = f"{100 * flops_per_token * tokens / dt / peak:.1f}%" if peak else "-"
            print(f"{label:9s} {1e3 * dt:8.1f} ms/step  {tokens / dt:10.0f} tokens/s  MFU {mfu:>6s}  "
                  f"peak memory {f'{mem:.1f} GB' if mem is not None else '-'}")
    print(f"ours / baseline: {results['baseline'] / results['ours']:.2f}x")


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
