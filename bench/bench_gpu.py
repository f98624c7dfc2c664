"""GPT-2 124M training throughput on one CUDA GPU: gpt2.py's loop vs build-nanogpt's settings, in one run.

Both train the same model (T=1024, bf16 autocast, torch.compile, fused AdamW, TF32, vocab 50304) on random tokens
from memory-mapped shards. "ours" is gpt2.py's own training loop; "baseline" is a plain loop with build-nanogpt's
habits (synchronous host-to-device copies, a host sync for the loss every micro-step). Prints tokens/s, step ms,
MFU against the GPU's dense bf16 peak, and peak memory. Skips (exit 0) where there is no CUDA GPU.
    python bench/bench_gpu.py                     # micro batch 64 (80 GB cards); --B=32 or 16 on smaller ones
"""

import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import describe  # noqa: E402

import gpt2  # noqa: E402
from cli import run_cli  # noqa: E402


@dataclass
class Config:
    B: int = 64  # micro batch
    grad_accum: int = 2  # micro-steps per optimizer step
    steps: int = 30  # optimizer steps per loop; the first 10 (compilation, warm-up) are not counted


def ours(cfg, data_dir, log_dir):
    run = gpt2.Config(data_dir=data_dir, log_dir=log_dir, micro_batch_size=cfg.B, max_steps=cfg.steps,
                      total_batch_size=cfg.B * 1024 * cfg.grad_accum, val_every=0, hellaswag_every=0,
                      sample_every=0, checkpoint_every=0, device="cuda")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpt2.train(run, set())
    dts = [float(m.group(1)) for m in re.finditer(r"dt\s+([\d.]+)ms", out.getvalue())]
    return statistics.median(dts[10:]) / 1e3


def baseline(cfg, data_dir):
    device = torch.device("cuda")
    torch.manual_seed(1337)
    model = gpt2.GPT(gpt2.GPTConfig(vocab_size=50304)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, "cuda")
    model = torch.compile(model)
    loader = gpt2.DataLoaderLite(data_dir, "train", cfg.B, 1024)
    dts = []
    for _ in range(cfg.steps):
        t0 = time.time()
        optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss = loss / cfg.grad_accum
            loss_accum += loss.detach().item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        torch.cuda.synchronize()
        dts.append(time.time() - t0)
    return statistics.median(dts[10:])


def main(cfg, _):
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here, skipped")
        return
    torch.set_float32_matmul_precision("high")
    peak = gpt2.peak_flops(torch.device("cuda"))
    flops_per_token = gpt2.GPT(gpt2.GPTConfig(vocab_size=50304)).flops_per_token(1024)
    tokens = cfg.B * 1024 * cfg.grad_accum
    print(describe(torch.device("cuda")))
    print(f"GPT-2 124M, T=1024, micro batch {cfg.B} x {cfg.grad_accum} micro-steps")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split, n in (("val", 2_000_000), ("train", 50_000_000)):
            np.save(os.path.join(tmp, f"bench_{split}_000000.npy"), rng.integers(0, 50257, n, dtype=np.uint16))
        results = {}
        for label, run in (("ours", lambda: ours(cfg, tmp, os.path.join(tmp, "log"))), ("baseline", lambda: baseline(cfg, tmp))):
            torch.cuda.reset_peak_memory_stats()
            dt = run()
            mfu = f"{100 * flops_per_token * tokens / dt / peak:.1f}%" if peak else "-"
            results[label] = dt
            print(f"{label:9s} {1e3 * dt:8.1f} ms/step  {tokens / dt:10.0f} tokens/s  MFU {mfu:>6s}  "
                  f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"ours / baseline: {results['baseline'] / results['ours']:.2f}x")


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
