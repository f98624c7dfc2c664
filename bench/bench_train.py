"""Training throughput on this machine: our GPT vs transformers' GPT2LMHeadModel, side by side.

Same config, batch, dtype, weights and optimizer hyperparameters; each model runs its own usual path
(ours: GPT.forward + configure_optimizers; theirs: model(input_ids, labels=...) + torch AdamW).
    python bench/bench_train.py                      # 4 layers, 256 wide, T=256, batch 8, float32
    python bench/bench_train.py --n_layer=12 --n_embd=768 --T=1024 --B=4 --device=cuda --dtype=bfloat16
"""

import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cli import answer_help

    answer_help(__file__)

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import describe  # noqa: E402

from gpt2 import GPT, HF_TRANSPOSED, GPTConfig, compile_model, resolve_device, run_cli  # noqa: E402


@dataclass
class Config:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    T: int = 256  # sequence length
    B: int = 8  # sequences per step
    vocab_size: int = 50304
    device: str = "cpu"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False  # also time our model under torch.compile
    warmup: int = 2  # untimed steps per model
    steps: int = 9  # timed steps per model, alternating; the median step is reported


def main(cfg, _):
    from transformers import GPT2Config, GPT2LMHeadModel

    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=cfg.T, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd)).to(device)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=cfg.T, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                    n_embd=cfg.n_embd, activation_function="gelu_new", resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).to(device)
    with torch.no_grad():  # the same starting weights
        theirs = hf.state_dict()
        for name, p in ours.state_dict().items():
            theirs[name].copy_(p.t() if name.endswith(HF_TRANSPOSED) else p)
    hf.train()
    opt_ours = ours.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, device.type)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    compiled = compile_model(ours) if cfg.compile else None
    bf16 = cfg.dtype == "bfloat16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    x = torch.randint(0, min(cfg.vocab_size, 50257), (cfg.B, cfg.T + 1), device=device)

    def step_ours(model=ours):
        opt_ours.zero_grad(set_to_none=True)
        with autocast():
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt_ours.step()

    def step_hf():
        opt_hf.zero_grad(set_to_none=True)
        with autocast():
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        opt_hf.step()

    steps = {"ours": step_ours, "hf": step_hf}
    if compiled is not None:
        steps["compiled"] = lambda: step_ours(compiled)

    def timed(step, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for step in steps.values():
        for _ in range(cfg.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(cfg.steps):  # take turns, so all see the same machine load
        for name, step in steps.items():
            times[name].append(timed(step, 1))
    spent = {name: statistics.median(t) for name, t in times.items()}  # a step's time, robust to hiccups
    # each round's two steps ran back to back: their ratio sees one machine speed, so take the median of those
    rounds = [hf / ours for hf, ours in zip(times["hf"], times["ours"], strict=True)]
    tokens = cfg.B * cfg.T
    print(describe(device))
    print(f"config: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, T={cfg.T}, B={cfg.B}, "
          f"vocab {cfg.vocab_size}, {cfg.dtype}, AdamW")
    print(f"ours (gpt2.GPT)             {tokens / spent['ours']:10.0f} tokens/s")
    print(f"transformers GPT2LMHeadModel {tokens / spent['hf']:9.0f} tokens/s")
    print(f"ratio ours/transformers: {statistics.median(rounds):.2f}x (median of the rounds: "
          f"{' '.join(f'{r:.2f}' for r in rounds)})")
    if compiled is not None:
        print(f"ours, torch.compile         {tokens / spent['compiled']:10.0f} tokens/s")
        print(f"compile speed-up: {spent['ours'] / spent['compiled']:.2f}x")


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
