"""
Generation speed with and without the KV cache: tokens per second for gpt2.generate on random weights.

    python bench/bench_generate.py                                       # 4 layers x 256 wide, 512 new tokens
    python bench/bench_generate.py --n_layer=12 --n_head=12 --n_embd=768  # GPT-2 124M (hours without the cache on 2 cores)

Without the cache every new token recomputes the whole sequence, so its cost grows with the
length so far; with it, each new token is one position's forward pass.
"""

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import describe  # noqa: E402


@dataclass
class BenchConfig:
    n_layer: int = 4  # small enough for a 2-core CPU; GPT-2 124M is --n_layer=12 --n_head=12 --n_embd=768
    n_head: int = 4
    n_embd: int = 256
    vocab_size: int = 50304
    block_size: int = 1024
    prompt_tokens: int = 16
    new_tokens: int = 512
    num_samples: int = 1  # the batch: sequences generated side by side
    device: str = "cpu"
    threads: int = 0  # torch threads; 0 = torch's default (one per core)
    seed: int = 0


def run(cfg, overridden):
    import torch

    import gpt2

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = gpt2.resolve_device(cfg.device)
    print(f"machine: {describe(device)} | running on {device}")
    torch.manual_seed(cfg.seed)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                                    n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device).eval()
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, vocab {cfg.vocab_size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), float32 | "
          f"{cfg.num_samples} x ({cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens)")
    prompt = torch.randint(0, cfg.vocab_size, (cfg.prompt_tokens,), generator=torch.Generator().manual_seed(cfg.seed)).tolist()

    def timed(use_cache, new_tokens):
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, _ = gpt2.generate(model, prompt, cfg.num_samples, new_tokens, top_k=50, generator=generator, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens, time.perf_counter() - t0

    timed(True, 8)  # warm-up: first-call allocations and kernel choices
    timed(False, 8)
    results = {}
    for use_cache in (True, False):
        tokens, seconds = timed(use_cache, cfg.new_tokens)
        results[use_cache] = tokens
        rate = cfg.num_samples * cfg.new_tokens / seconds
        print(f"{'with' if use_cache else 'without'} KV cache: {seconds:7.2f} s, {rate:8.1f} tokens/s")
        if use_cache:
            cached_seconds = seconds
        else:
            print(f"speed-up from the cache: {seconds / cached_seconds:.1f}x")
    same = bool((results[True] == results[False]).all())
    print(f"same tokens with and without the cache: {same}")


if __name__ == "__main__":
    from cli import run_cli

    run_cli(run, BenchConfig(), sys.argv[1:])
