"""DataLoaderLite throughput from memory-mapped shards, on one core.

Writes shards of random tokens into a temporary directory (or reads --data_dir), then times next_batch()
for the GPT-2 124M micro batch (64 x 1024), in the stream's order and shuffled (--shuffle=1 in gpt2.py). The
loader must never be what a GPU waits for.
    python bench/bench_loader.py
"""

import os
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import describe  # noqa: E402

from gpt2 import DataLoaderLite, run_cli  # noqa: E402


@dataclass
class Config:
    data_dir: str = ""  # shards to read; "" = write 4 shards of 25M random tokens to a temporary directory
    B: int = 64
    T: int = 1024
    seconds: float = 3.0  # how long to time


def main(cfg, _):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = cfg.data_dir
        if not data_dir:
            data_dir = tmp
            rng = np.random.default_rng(0)
            for i in range(4):
                tokens = rng.integers(0, 50257, size=25_000_000, dtype=np.uint16)
                np.save(os.path.join(tmp, f"bench_train_{i:06d}.npy"), tokens)
        lines = []
        for shuffle in (False, True):
            loader = DataLoaderLite(data_dir, "train", cfg.B, cfg.T, shuffle=shuffle, seed=1337)
            for _ in range(loader.total // (cfg.B * cfg.T) + 1):  # one pass first: page cache warm, ids checked
                loader.next_batch()
            batches, start = 0, time.perf_counter()
            while time.perf_counter() - start < cfg.seconds:
                loader.next_batch()
                batches += 1
            elapsed = time.perf_counter() - start
            rate = batches * cfg.B * cfg.T / elapsed
            lines.append(f"DataLoaderLite, one thread, B={cfg.B} T={cfg.T}, {loader.total:,} tokens in {len(loader.paths)} "
                         f"shards, shuffle={int(shuffle)}: {rate / 1e6:.0f}M tokens/s "
                         f"({1e3 * elapsed / batches:.2f} ms per batch)")
    print(describe())
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
