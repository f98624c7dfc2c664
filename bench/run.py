"""The whole benchmark suite, in one run, on whatever machine this is.

Runs each benchmark in its own process, one after another (so they do not compete for cores), prints each one's
report, then a summary table of the headline figure against its target.
    python bench/run.py            # CPU-sized settings; the GPU benchmark runs only where CUDA is available
    python bench/run.py --only=train,loader
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from cli import run_cli  # noqa: E402

# name, script and arguments, the pattern of its headline figure in the output, the target it should meet
SUITE = [
    ("train: ours vs transformers", ["bench_train.py"], r"ratio ours/transformers: ([\d.]+)x", 1.3),
    ("train: compile=1 vs 0", ["bench_train.py", "--compile=1"], r"compile speed-up: ([\d.]+)x", None),
    ("loader: tokens/s, one core", ["bench_loader.py"], r"([\d.]+)M tokens/s", 50),
    ("loader: shuffled tokens/s, one core", ["bench_loader.py"], r"shuffle=1: ([\d.]+)M tokens/s", 50),
    ("fineweb.py vs raw tiktoken", ["bench_fineweb.py"],
     r"steady state: [\d.]+M tokens/s = ([\d.]+)x the \d+-core limit", 0.85),
    ("fineweb.py vs build-nanogpt", ["bench_fineweb.py"],
     r"fineweb.py \(\d+ procs\) / build-nanogpt \(\d+ procs\): ([\d.]+)x", 1.3),
    ("generate: KV cache speed-up", ["bench_generate.py", "--n_layer=12", "--n_head=6", "--n_embd=384"],
     r"speed-up[^\d]*([\d.]+)x", 5),
    ("hellaswag: batched vs 1/forward", ["bench_hellaswag.py", "--n_layer=4", "--n_head=4", "--n_embd=256"],
     r"16 examples per forward\s+[\d.]+ examples/s\s+([\d.]+)x", 4),
    ("memory: FSDP state / DDP's, target <= 0.55", ["bench_memory.py"],
     r"FSDP weights\+gradients\+AdamW per rank / DDP's: ([\d.]+)x", None),
    ("memory: activations kept, recompute 0 / 1", ["bench_memory.py"], r"saved for backward ([\d.]+)x", 3),
    ("muon: tokens to AdamW's loss / AdamW's, target <= 0.75", ["bench_muon.py"],
     r"muon/adamw tokens to AdamW's final loss: ([\d.]+)x", None),
    ("muon: FSDP Newton-Schulz per rank / DDP's, 4 ranks", ["bench_muon.py", "--fsdp=1", "--n_embd=128"],
     r"FSDP Muon's Newton-Schulz per rank / DDP Muon's: ([\d.]+)x", None),
    ("gpu: 124M MFU % (ours)", ["bench_gpu.py"], r"ours .*MFU\s+([\d.]+)%", 50),
    ("gpu: ours vs build-nanogpt", ["bench_gpu.py"], r"ours / baseline: ([\d.]+)x", 1.1),
    ("gpu: acceptance checks passed, of 7", ["gpu_check.py"], r"gpu_check \w+: (\d+) passed", 7),
]


@dataclass
class Config:
    only: str = ""  # comma-separated words; run only the benchmarks whose name contains one of them


def main(cfg, _):
    wanted = [w for w in cfg.only.split(",") if w]
    outputs = {}  # each script once, even when two rows read it
    rows = []
    for name, args, pattern, target in SUITE:
        if wanted and not any(w in name for w in wanted):
            continue
        key = " ".join(args)
        if key not in outputs:
            print(f"\n=== python bench/{key}", flush=True)
            start = time.time()
            proc = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]], capture_output=True, text=True)
            outputs[key] = proc.stdout + proc.stderr
            print(proc.stdout.rstrip() or proc.stderr.rstrip()[-2000:])
            print(f"({time.time() - start:.0f} s, exit {proc.returncode})", flush=True)
        found = re.search(pattern, outputs[key])
        value = float(found.group(1)) if found else None
        rows.append((name, value, target))
    print("\n| benchmark | figure | target | met |\n|---|---|---|---|")
    for name, value, target in rows:
        shown = "skipped" if value is None else f"{value:g}"
        met = "" if value is None or target is None else ("yes" if value >= target else "no")
        print(f"| {name} | {shown} | {'' if target is None else f'>= {target:g}'} | {met} |")


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
