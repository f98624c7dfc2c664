"""
HellaSwag: pick the most likely of 4 endings for a context, scored by a GPT-2-style model.

Evaluate a Hugging Face GPT-2, or one of our checkpoints, on the 10,042 examples of the val split:
    python hellaswag.py -m gpt2                             # a hub name, or a local HF model directory
    python hellaswag.py --checkpoint=log/model_19073.pt     # a checkpoint written by gpt2.py
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl
The last line printed is `<N> acc: <acc> acc_norm: <acc_norm>`. gpt2.py calls load_examples() and
evaluate() below during training. The data is downloaded once from the HellaSwag authors' GitHub to
cache_dir (default $HELLASWAG_CACHE, else ~/.cache/gpt2-fineweb/hellaswag); on a machine without
internet pass --data_file=path/to/hellaswag_val.jsonl.

The recipe is build-nanogpt's: the context tokens, then each ending encoded as " " + ending; the
model's cross-entropy on the ending tokens; acc picks the ending with the lowest summed loss,
acc_norm the lowest mean loss per token (the number GPT-3's paper and build-nanogpt report).
"""

import http.client
import json
import os
import sys
import tempfile
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gpt2 import (
    GPT2_VOCAB,
    UserError,
    all_reduce_sum,
    get_tokenizer,
    load_hf_model,
    load_model,
    log_softmax_chunks,
    make_autocast,
    run_cli,
    setup_distributed,
    teardown_distributed,
)

# --- config ---

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"  # the authors' copy, as build-nanogpt uses


@dataclass
class Config:
    model: str = ""  # a Hugging Face GPT-2 (gpt2, gpt2-xl, or a saved directory); also -m NAME
    checkpoint: str = ""  # or one of our checkpoints, log/model_XXXXX.pt (exactly one of the two)
    data_file: str = ""  # a local jsonl in HellaSwag's schema; "" = the split's file, downloaded once to cache_dir
    split: str = "val"  # val | train (test has no public labels)
    limit: int = 0  # score only the first N examples; 0 = all
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    batch_size: int = 16  # examples per forward pass (each is one row: the context once, then its 4 endings)
    cache_dir: str = ""  # where downloads are kept; "" = $HELLASWAG_CACHE, else ~/.cache/gpt2-fineweb/hellaswag
    data_url: str = DATA_URL  # where hellaswag_{split}.jsonl is downloaded from
    debug: bool = False  # show tracebacks instead of one-line errors


# --- data ---


class Example(NamedTuple):
    context: list  # token ids of ctx
    endings: list  # 4 lists of token ids, each encoding " " + ending
    label: int  # index of the true ending


def default_cache_dir():
    return os.environ.get("HELLASWAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-fineweb", "hellaswag")


def download(split, cache_dir, url=DATA_URL, is_master=True):
    """The path of hellaswag_{split}.jsonl in cache_dir, downloaded first if it is not there yet.

    Every rank may call this at once: each writes its own temporary file and renames it into
    place, so a reader sees either no file or a complete one.
    """
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    source = f"{url}/hellaswag_{split}.jsonl"
    if is_master:
        print(f"downloading {source} to {path}", flush=True)
    try:
        with urllib.request.urlopen(source, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download {source} ({reason}): pass --data_file=PATH (in gpt2.py --hellaswag_file=PATH) "
                        f"with a local copy of hellaswag_{split}.jsonl") from None
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f"hellaswag_{split}.jsonl.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({e.strerror}): pass --cache_dir=PATH or set HELLASWAG_CACHE "
                        f"to a writable directory") from None
    return path


def check_row(row):
    """Raises ValueError saying what is wrong with one parsed line of the jsonl."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("ctx"), str) or not row["ctx"]:
        raise ValueError("'ctx' is missing or not a non-empty string")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise ValueError("'endings' is missing or not a list of 4 strings")
    label = row.get("label")
    if label is None or label == "":
        raise ValueError("no 'label' (the test split's labels are not public: use the val split)")
    if str(label) not in ("0", "1", "2", "3"):
        raise ValueError(f"'label' is {label!r}, expected 0, 1, 2 or 3")


def read_jsonl(path, fix):
    """The examples of a HellaSwag jsonl file as dicts; a bad line is a UserError naming it, ending with `fix`."""
    rows = []
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line number too
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                check_row(row)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                problem = str(e).splitlines()[0]
                raise UserError(f"{path} line {number} is not a HellaSwag example ({problem}): {fix}") from None
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no examples: {fix}")
    return rows


def render(row, enc):
    """One example as tokens: the context, and each ending with the space that joins it to the context."""
    context = enc.encode_ordinary(row["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in row["endings"]]
    return Example(context, endings, int(row["label"]))


def load_examples(split="val", data_file=None, *, is_master=True, cache_dir=None, url=DATA_URL, limit=0):
    """The examples of one split as token ids: read from data_file if given, else from the download cache."""
    if data_file:
        if not os.path.isfile(data_file):
            raise UserError(f"data file {data_file} does not exist: pass the path of a local hellaswag_{split}.jsonl, "
                            f"or leave it empty to download the split")
        path, fix = data_file, "fix that line, or pass a file in HellaSwag's jsonl schema"
    else:
        if split not in ("val", "train"):
            raise UserError(f"--split={split}: expected val or train")
        path = download(split, cache_dir or default_cache_dir(), url, is_master)
        fix = f"delete {path} to download it again"
    rows = read_jsonl(path, fix)
    if limit > 0:
        rows = rows[:limit]
    enc = get_tokenizer()
    return [render(row, enc) for row in rows]


# --- scoring ---


def fit(example, block_size):
    """The context and endings cut to fit block_size positions: endings to block_size - 1 tokens (one
    context token must predict their first), then the context from the left. GPT-2's 1024 fits them all."""
    endings = [e[:block_size - 1] for e in example.endings]
    keep = block_size - max(len(e) for e in endings)
    return example.context[-keep:], endings


def pack(examples, block_size, device):
    """One row per example, the context once and then its 4 endings, each ending seeing only the
    context and itself (positions restart after the context for each). Shares the context's work
    4 ways; the scores equal those of 4 separate rows context + ending.

    Returns idx, pos (B, T); mask (B, 1, T, T), True where a token may attend; and for each ending
    token: the flat row*T + position whose output predicts it, the token, and its (example, ending)
    index ex*4 + i.
    """
    fitted = [fit(example, block_size) for example in examples]
    # an ending's last token is only predicted, never read: it is left out of the row
    T = max(len(context) + sum(len(ending) - 1 for ending in endings) for context, endings in fitted)
    rows, sources, targets, owners = [], [], [], []
    for b, (context, endings) in enumerate(fitted):
        tokens, pos, seg = list(context), list(range(len(context))), [0] * len(context)
        for i, ending in enumerate(endings):
            start = len(tokens)
            # the first ending token is predicted from the last context token, the others from the one before
            sources += [b * T + len(context) - 1] + [b * T + start + j for j in range(len(ending) - 1)]
            targets += ending
            owners += [4 * b + i] * len(ending)
            tokens += ending[:-1]
            pos += range(len(context), len(context) + len(ending) - 1)
            seg += [i + 1] * (len(ending) - 1)
        rows.append((tokens, pos, seg))
    pad = lambda xs, value: xs + [value] * (T - len(xs))
    idx = torch.tensor([pad(r[0], 0) for r in rows], dtype=torch.long, device=device)  # (B, T)
    pos = torch.tensor([pad(r[1], 0) for r in rows], dtype=torch.long, device=device)  # (B, T)
    seg = torch.tensor([pad(r[2], -1) for r in rows], dtype=torch.long, device=device)  # (B, T) 0 context, i ending i, -1 pad
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))  # (B, T, T) query, key
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return idx, pos, mask[:, None], as_tensor(sources), as_tensor(targets), as_tensor(owners)


@torch.no_grad()
def score(model, examples, device, autocast=nullcontext, batch_size=16, progress=False):
    """Summed cross-entropy of each ending's tokens, and their number: two (N, 4) tensors on the CPU."""
    from tqdm import tqdm

    model = getattr(model, "_orig_mod", model)  # a torch.compiled model's own module
    top = max((max(max(e, default=0) for e in (ex.context, *ex.endings)) for ex in examples), default=0)
    if top >= model.config.vocab_size:
        raise UserError(f"HellaSwag needs GPT-2's tokenizer (token ids up to {top}), but the model has "
                        f"vocab_size={model.config.vocab_size}: use vocab_size >= {GPT2_VOCAB}, or --hellaswag_every=0")
    sums = torch.zeros(len(examples), 4)
    counts = torch.zeros(len(examples), 4)
    # longest rows first, so a batch holds rows of similar length (little padding) and memory runs out early if at all
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].context) + sum(map(len, examples[i].endings))))
    keep = {}  # log_softmax_chunks' buffer, from batch to batch
    was_training = model.training
    model.eval()
    with tqdm(total=len(examples), desc="hellaswag", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = [examples[i] for i in chosen]
            idx, pos, mask, sources, targets, owners = pack(batch, model.config.block_size, device)
            with autocast():
                # the lm_head is left out: it runs below only where an ending token is predicted, because over
                # the whole vocabulary at every position it would be much of the cost
                h = model.hidden_states(idx, pos=pos, attn_mask=mask).flatten(0, 1)[sources]  # (M, C), M ending tokens
                chunks = log_softmax_chunks(h, model.lm_head.weight, keep, vocab=GPT2_VOCAB)  # no padding tokens
                losses = -torch.cat([logp.gather(1, targets[rows, None])[:, 0] for rows, logp, _ in chunks])  # (M,)
            batch_sums = torch.zeros(4 * len(batch), device=device).index_add_(0, owners, losses)  # (4B,)
            batch_counts = torch.zeros(4 * len(batch), device=device).index_add_(0, owners, torch.ones_like(losses))
            sums[chosen] = batch_sums.view(-1, 4).cpu()
            counts[chosen] = batch_counts.view(-1, 4).cpu()
            bar.update(len(batch))
    model.train(was_training)
    return sums, counts


def evaluate(model, examples, device, autocast=nullcontext, rank=0, world_size=1, batch_size=16, progress=False):
    """acc and acc_norm over all examples: rank r scores examples r, r + world_size, ...; the counts
    are summed over ranks, so any number of ranks gives the numbers of one."""
    mine = examples[rank::world_size]
    sums, counts = score(model, mine, device, autocast, batch_size, progress)
    labels = torch.tensor([ex.label for ex in mine], dtype=torch.long)
    totals = torch.tensor([len(mine),
                           (sums.argmin(1) == labels).sum().item(),  # lowest total loss
                           ((sums / counts).argmin(1) == labels).sum().item()],  # lowest loss per token
                          dtype=torch.long, device=device)
    n, correct, correct_norm = all_reduce_sum(totals).tolist()
    return {"n": n, "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}


# --- command line ---


def main(cfg, overridden):
    if bool(cfg.model) == bool(cfg.checkpoint):
        raise UserError("pass exactly one of -m NAME (a Hugging Face model such as gpt2, or its directory) "
                        "and --checkpoint=PATH (a model_XXXXX.pt written by gpt2.py)")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size}: must be at least 1")
    d = setup_distributed(cfg.device)
    try:
        say = print if d.is_master else (lambda *args, **kwargs: None)
        device = d.device
        autocast, use_bf16 = make_autocast(cfg.dtype, device)
        examples = load_examples(cfg.split, cfg.data_file or None, is_master=d.is_master, cache_dir=cfg.cache_dir or None,
                                 url=cfg.data_url, limit=cfg.limit)
        model = load_hf_model(cfg.model, device) if cfg.model else load_model(cfg.checkpoint, device)
        say(f"hellaswag {cfg.split}: {len(examples)} examples | {cfg.model or cfg.checkpoint} | {device} | "
            f"{'bfloat16' if use_bf16 else 'float32'} | {d.world_size} rank(s)", flush=True)
        result = evaluate(model, examples, device, autocast, d.rank, d.world_size, cfg.batch_size, progress=d.is_master)
        say(f"{result['n']} acc: {result['acc']:.4f} acc_norm: {result['acc_norm']:.4f}", flush=True)
    finally:
        teardown_distributed()


def expand_aliases(argv):
    """-m NAME is --model=NAME; everything else is --name=value."""
    out = []
    args = iter(argv)
    for arg in args:
        if arg == "-m":
            arg = f"--model={next(args, '')}"
        out.append(arg)
    return out


if __name__ == "__main__":
    run_cli(main, Config(), expand_aliases(sys.argv[1:]))
