"""
HellaSwag from the command line: the accuracy of a Hugging Face GPT-2, or of one of our checkpoints, at picking the
most likely of 4 endings for a context, on the 10,042 examples of the val split.

    python hellaswag.py -m gpt2                             # a hub name, or a local HF model directory
    python hellaswag.py --checkpoint=log/model_19073.pt     # a checkpoint written by gpt2.py
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl

The last line printed is `<N> acc: <acc> acc_norm: <acc_norm>`. The data is downloaded once from the HellaSwag
authors' GitHub to cache_dir (default $HELLASWAG_CACHE, else ~/.cache/gpt2-fineweb/hellaswag); on a machine without
internet pass --data_file=path/to/hellaswag_val.jsonl. The scorer itself (build-nanogpt's recipe) is in gpt2.py's
evaluation section, where training calls it too: this file imports gpt2, never the reverse.
"""

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    from cli import answer_help

    answer_help(__file__)

import sys
from dataclasses import dataclass

from cli import ANY, NOT_EMPTY, Relation, at_least, check_settings, expand_aliases, one_of, run_cli
from gpt2 import (
    HELLASWAG_URL,
    check_model_path,
    check_torch_version,
    evaluate_hellaswag,
    load_hellaswag,
    load_hf_model,
    load_model,
    make_autocast,
    setup_distributed,
    teardown_distributed,
)

# --- config ---


@dataclass
class Config:
    model: str = ""  # a Hugging Face GPT-2 (gpt2, gpt2-xl, or a saved directory); also -m NAME
    checkpoint: str = ""  # or one of our checkpoints, log/model_XXXXX.pt (exactly one of the two)
    data_file: str = ""  # a local jsonl in HellaSwag's schema; "" = the split's file, downloaded once to cache_dir
    split: str = "val"  # val | train (test has no public labels)
    limit: int = 0  # score only the first N examples; 0 = all
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (CUDA: bfloat16, or float16 on GPUs without it; else float32) | float32 | bfloat16 | float16
    batch_size: int = 16  # examples per forward pass (each is one row: the context once, then its 4 endings)
    cache_dir: str = ""  # where downloads are kept; "" = $HELLASWAG_CACHE, else ~/.cache/gpt2-fineweb/hellaswag
    data_url: str = HELLASWAG_URL  # where hellaswag_{split}.jsonl is downloaded from
    debug: bool = False  # show tracebacks instead of one-line errors


RULES = {  # what each setting accepts, checked before any work (see cli.check_settings)
    "model": ANY,  # checked when it is loaded, before the data is downloaded
    "checkpoint": ANY,
    "data_file": ANY,
    "split": one_of("val", "train"),
    "limit": at_least(0),
    "device": one_of("auto", "cpu", "cuda", "mps"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "batch_size": at_least(1),
    "cache_dir": ANY,
    "data_url": NOT_EMPTY,
    "debug": ANY,
}
RELATIONS = [
    Relation(("model", "checkpoint"), lambda c: bool(c.model) != bool(c.checkpoint),
             lambda c: "pass exactly one of -m NAME (a Hugging Face model such as gpt2, or its directory) and "
                       "--checkpoint=PATH (a model_XXXXX.pt written by gpt2.py)", {"model": "gpt2", "checkpoint": "x.pt"}),
]


# --- command line ---


def main(cfg, overridden):
    check_torch_version()
    check_settings(cfg, RULES, RELATIONS)
    if cfg.model:
        check_model_path(cfg.model)
    d = setup_distributed(cfg.device)
    try:
        say = print if d.is_master else (lambda *args, **kwargs: None)
        device = d.device
        autocast, dtype = make_autocast(cfg.dtype, device)
        # the model first: a wrong name or path stops the run before the data is downloaded
        model = load_hf_model(cfg.model, device) if cfg.model else load_model(cfg.checkpoint, device)
        examples = load_hellaswag(cfg.split, cfg.data_file or None, is_master=d.is_master, cache_dir=cfg.cache_dir or None,
                                  url=cfg.data_url, limit=cfg.limit, setting="--data_file")
        say(f"hellaswag {cfg.split}: {len(examples)} examples | {cfg.model or cfg.checkpoint} | {device} | "
            f"{str(dtype).removeprefix('torch.')} | {d.world_size} rank(s)", flush=True)
        result = evaluate_hellaswag(model, examples, device, autocast, d.rank, d.world_size, cfg.batch_size,
                                    progress=d.is_master)
        say(f"{result['n']} acc: {result['acc']:.4f} acc_norm: {result['acc_norm']:.4f}", flush=True)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    run_cli(main, Config(), expand_aliases(sys.argv[1:]))
