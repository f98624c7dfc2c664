"""
HellaSwag scoring speed: gpt2.py's batched HellaSwag scorer against build-nanogpt's one example per forward pass.

    python bench/bench_hellaswag.py                        # GPT-2 124M shape, random init, 64 examples, CPU
    python bench/bench_hellaswag.py --n_layer=4 --n_examples=32 --device=cuda

The examples are written in HellaSwag's jsonl schema with random words, at lengths like the val set's
(a third short ActivityNet-style, two thirds long WikiHow-style), and read back with gpt2.load_hellaswag.
The three methods run on the same chunks of examples in turn, so a busy machine slows them alike.
"""

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cli import answer_help

    answer_help(__file__)

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import describe  # noqa: E402

import gpt2  # noqa: E402
from cli import run_cli  # noqa: E402

# --- config ---


@dataclass
class Config:
    n_layer: int = 12  # model shape: GPT-2 124M by default
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304  # padded, as gpt2.py trains it
    n_examples: int = 128
    batch_size: int = 16  # examples per forward pass for the batched scorer
    chunk: int = 64  # examples each method scores before the next takes its turn; several batches, as in real use
    device: str = "cpu"
    seed: int = 0


WORDS = ("the man woman person camera then she he they begins shows continues holds takes puts water ball dog car "
         "room kitchen table paper brush paint hair floor window slowly again while after before around into over "
         "with from small large red blue people group stage field pool bike rope knife cake step title header how "
         "make clean remove choose your you can use should need sure keep place it a an of to in on and for").split()


# --- data ---


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(n, seed):
    """n examples in HellaSwag's schema. Lengths in words (GPT-2 tokens are about 1.2 per word here)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if rng.random() < 1 / 3:  # ActivityNet captions: a short context, short endings
            ctx, endings, source = words(rng, 12, 35), [words(rng, 6, 22) + "." for _ in range(4)], "activitynet~v_x"
        else:  # WikiHow steps: a longer context with its markup, longer endings
            ctx = f"[header] How to {words(rng, 3, 6)} [title] {words(rng, 4, 10)}. [step] {words(rng, 25, 70)}."
            endings, source = [words(rng, 12, 50) + "." for _ in range(4)], "wikihow~1"
        rows.append({"ind": i, "activity_label": "Bench", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
                     "split_type": "indomain", "label": rng.randrange(4), "endings": endings, "source_id": source})
    return rows


# --- methods ---


@torch.no_grad()
def one_per_forward(model, example, device):
    """build-nanogpt's render_example + evaluate: 4 rows padded to the longest, full logits at every position.
    Returns the (4,) summed and mean loss of the endings."""
    rows = [example.context + ending for ending in example.endings]
    T = max(map(len, rows))
    tokens = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(example.context):len(row)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens)  # (4, T, V)
    shift_logits = logits[:, :-1, :gpt2.GPT2_VOCAB].contiguous()
    shift_tokens = tokens[:, 1:].contiguous()
    losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1), reduction="none")
    losses = losses.view(4, -1) * mask[:, 1:]  # (4, T-1)
    return losses.sum(1).cpu(), (losses.sum(1) / mask[:, 1:].sum(1)).cpu()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(cfg, overridden):
    device = gpt2.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = gpt2.GPT(gpt2.GPTConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                    n_embd=cfg.n_embd)).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hellaswag_val.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_rows(cfg.n_examples, cfg.seed))
        examples = gpt2.load_hellaswag("val", path)
    ctx = sum(len(ex.context) for ex in examples) / len(examples)
    end = sum(len(e) for ex in examples for e in ex.endings) / (4 * len(examples))
    print(describe(device))
    print(f"model: {model.num_params() / 1e6:.0f}M parameters ({cfg.n_layer} layers, {cfg.n_embd} wide, vocab "
          f"{cfg.vocab_size}), float32, random init | {len(examples)} examples, mean context {ctx:.0f} tokens, "
          f"mean ending {end:.0f} tokens")

    methods = {
        "one example per forward, full logits (build-nanogpt)": lambda chunk: [one_per_forward(model, ex, device)
                                                                               for ex in chunk],
        "ours, 1 example per forward": lambda chunk: gpt2.score_endings(model, chunk, device, batch_size=1),
        f"ours, {cfg.batch_size} examples per forward": lambda chunk: gpt2.score_endings(
            model, chunk, device, batch_size=cfg.batch_size),
    }
    for run in methods.values():  # warm up allocators and kernels
        run(examples[:2])
    seconds = dict.fromkeys(methods, 0.0)
    outputs = {name: [] for name in methods}
    for start in range(0, len(examples), cfg.chunk):
        chunk = examples[start:start + cfg.chunk]
        for name, run in methods.items():
            sync(device)
            t0 = time.perf_counter()
            outputs[name].append(run(chunk))
            sync(device)
            seconds[name] += time.perf_counter() - t0

    # the same scores: build-nanogpt's per-ending sums and means against gpt2.score_endings's
    base_sum = torch.stack([s for part in outputs[next(iter(methods))] for s, _ in part])  # (N, 4)
    base_mean = torch.stack([m for part in outputs[next(iter(methods))] for _, m in part])  # (N, 4)
    labels = torch.tensor([ex.label for ex in examples])
    base = ((base_sum.argmin(1) == labels).sum().item(), (base_mean.argmin(1) == labels).sum().item())
    first = seconds[next(iter(methods))]
    for name in methods:
        line = f"{name:55s} {len(examples) / seconds[name]:8.2f} examples/s  {first / seconds[name]:5.2f}x"
        if name != next(iter(methods)):
            sums = torch.cat([s for s, _ in outputs[name]])
            counts = torch.cat([c for _, c in outputs[name]])
            diff = (sums / counts - base_mean).abs().max().item()
            same = ((sums.argmin(1) == labels).sum().item(), ((sums / counts).argmin(1) == labels).sum().item()) == base
            line += f"  | max |mean loss diff| {diff:.1e}, same acc/acc_norm counts: {same}"
        print(line)


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
