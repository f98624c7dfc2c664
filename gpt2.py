"""
GPT-2 from scratch in one file: the model, the data loader and the training loop.

Reproduce GPT-2 124M on FineWeb-Edu 10B tokens (after `python fineweb.py`):
    python gpt2.py                                          # one GPU, or CPU/MPS
    torchrun --standalone --nproc_per_node=8 gpt2.py        # 8 GPUs on one node
    torchrun --standalone --nproc_per_node=8 gpt2.py --fsdp=1 --activation_checkpointing=1 --n_layer=48 --n_head=25 --n_embd=1600
                                                            # GPT-2 1.5B: weights, gradients, AdamW sharded (FSDP2)
Every setting in `Config` below can be overridden as --name=value:
    python gpt2.py --n_layer=4 --n_embd=256 --max_steps=100 --compile=0
Continue the newest checkpoint in log_dir (safe to pass always): --init_from=resume
Fine-tune OpenAI's GPT-2 (a hub name, or a directory saved by transformers): --init_from=gpt2
Sample from a checkpoint or a Hugging Face GPT-2, or export a checkpoint for transformers:
    python gpt2.py --mode=sample --init_from=log/model_19073.pt --prompt="The meaning of life is" --top_k=50
    python gpt2.py --mode=export --init_from=log/model_19073.pt --export_dir=gpt2-ours

Read it top to bottom, in the order the data flows: config, model, the memory-saving loss, data, training (the
loop and what it calls), evaluation (validation loss, HellaSwag) and sampling, checkpoints, Hugging Face interop,
and the command line. hellaswag.py is the command line for HellaSwag alone; it imports this file, never the reverse.
"""

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    from cli import answer_help

    answer_help(__file__)

import dataclasses
import datetime
import functools
import glob
import http.client
import io
import json
import math
import os
import pickle
import pickletools
import random
import re
import sys
import tempfile
import time
import urllib.request
import warnings
import weakref
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import (
    ANY,
    NOT_EMPTY,
    Progress,
    Relation,
    Rule,
    UserError,
    above,
    at_least,
    between,
    check_settings,
    one_of,
    run_cli,
)
from faults import (
    LESS_MEMORY,
    OOM_FILE,
    PREEMPTED,
    OutOfMemoryInCollective,
    Preempted,
    StopRequest,
    fit_below,
    leave_after_oom,
    memory_fingerprint,
    memory_limits,
    oom_limit,
    read_text,
    smaller_micro_batch,
)
from muon import MuonAdamW, is_dtensor, step_bytes

# --- config ---


@dataclass
class Config:
    # data and output
    data_dir: str = "edu_fineweb10B"  # the uint16 .npy shards written by fineweb.py
    log_dir: str = "log"  # log.txt, log.png and the model_XXXXX.pt checkpoints
    init_from: str = "scratch"  # scratch | resume (newest in log_dir) | model_XXXXX.pt path | gpt2[-medium|-large|-xl] | HF dir
    mode: str = "train"  # train | sample (print samples from init_from) | export (init_from to a Hugging Face directory)
    export_dir: str = ""  # where --mode=export writes config.json, model.safetensors and the tokenizer files
    # model (GPT-2 124M)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    block_size: int = 1024  # context length, and the length of every training sequence
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128, for faster matmuls
    # batch
    total_batch_size: int = 524288  # tokens per optimizer step over all ranks and micro-steps (2**19, ~0.5M)
    micro_batch_size: int | str = "auto"  # sequences per forward pass per rank; auto = the most that fits (estimate)
    shuffle: bool = False  # each epoch reads the train stream's block_size windows in a new order, seeded by seed
    # optimizer and learning-rate schedule
    max_lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # where the decay ends: 10% of max_lr
    warmup_steps: int = 715  # linear warmup (375M tokens, as GPT-3)
    max_steps: int = 19073  # optimizer steps: 19073 * 524288 = 10B tokens, one epoch of sample-10BT
    lr_schedule: str = "cosine"  # cosine (after warmup) | wsd (warmup, max_lr constant, then a warmdown to min_lr)
    lr_decay_steps: int = 0  # cosine length after warmup; 0 = until max_steps; after it lr stays at min_lr
    warmdown_steps: int = 0  # wsd: the last N steps decay to min_lr (1 - sqrt); 0 = the last 20% of max_steps
    weight_decay: float = 0.1  # on matmul and embedding weights only
    beta1: float = 0.9  # AdamW betas and eps, as GPT-3
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    optimizer: str = "adamw"  # adamw (GPT-2's recipe) | muon: Muon for the 2-D weights in the blocks, AdamW (above) the rest
    muon_lr: float = 0.02  # Muon's peak lr, scheduled as max_lr is; these 3 are Keller Jordan's Muon recipe (docs/muon.md)
    muon_momentum: float = 0.95  # Nesterov momentum
    muon_weight_decay: float = 0.0  # decoupled: each step multiplies the weights by 1 - scheduled muon_lr * this
    seed: int = 1337  # model init, sampling and the shuffled order
    # system
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (CUDA: bfloat16, or float16 on GPUs without it; else float32) | float32 | bfloat16 | float16
    compile: bool = True  # torch.compile the model for training (under FSDP each block, for validation too)
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2), not copy them (DDP)
    activation_checkpointing: bool = False  # keep each block's input only, recompute the rest in backward (~1/3 more compute)
    loss_impl: str = "auto"  # auto (plain on CUDA, else chunked) | chunked (keeps no logits) | plain (lm_head, F.cross_entropy)
    dist_timeout_min: int = 60  # how long a rank waits in a collective (as for rank 0 writing a 1.5B checkpoint) before it fails
    # evaluation, sampling and checkpoints (every N optimizer steps; 0 disables)
    val_every: int = 250  # validation loss...
    val_tokens: int = 10_485_760  # ...over the first N tokens of the val split, the same for any number of ranks
    hellaswag_every: int = 250  # HellaSwag acc_norm on the val split
    hellaswag_file: str = ""  # a local hellaswag_val.jsonl; "" = download it once to the cache
    sample_every: int = 250  # print a few samples from the prompt below
    checkpoint_every: int = 5000  # also at the end of training
    keep_checkpoints: int = 0  # keep only the newest K checkpoints; 0 keeps all
    skip_nonfinite: bool = False  # skip an optimizer step whose loss is NaN/inf instead of stopping
    # loss spikes: roll back and skip the data that caused them (PaLM's recipe; see SpikeGuard and docs/reliability.md)
    spike_guard: bool = False  # on a spike, roll every rank back to a snapshot in host memory and skip that data
    spike_window: int = 100  # a spike: a loss above the median of the last N steps' losses...
    spike_k: float = 10.0  # ...by more than k median absolute deviations of them...
    spike_min_rise: float = 0.5  # ...and by more than this many nats (the MAD of a flat loss is ~0)...
    spike_patience: int = 5  # ...on N steps in a row (a blip that the next steps recover from is no spike); or a NaN/inf
    spike_snapshot_every: int = 100  # the state rolled back to is copied to host memory every N steps (and at checkpoints)
    spike_skip_steps: int = 200  # data skipped: from the rollback point to N steps' worth past the spike's batches
    spike_max_rollbacks: int = 3  # a spike after this many rollbacks within spike_rollback_window steps stops the run:
    spike_rollback_window: int = 1000  # spikes that close together are divergence, not bad data
    skip_tokens: str = ""  # train-stream token ranges never read, "A-B,C-D" (as a rollback line prints them)
    wandb_log: bool = False  # also send the metrics to Weights & Biases (rank 0; needs pip install wandb)
    wandb_project: str = "gpt2"
    wandb_run_name: str = ""  # "" = wandb picks one
    # sampling: --mode=sample and the periodic samples during training
    prompt: str = "Hello, I'm a language model,"  # "" = start from <|endoftext|>
    num_samples: int = 4
    max_new_tokens: int = 32  # prompt + max_new_tokens must fit block_size; longer prompts keep their end
    top_k: int = 50  # sample among the k most likely tokens; 1 = greedy
    temperature: float = 1.0  # <1 sharper, >1 flatter
    samples_file: str = ""  # --mode=sample also writes one JSON line per sample here
    debug: bool = False  # show tracebacks instead of one-line errors


# what each setting accepts, checked before any work (and again on the settings a resumed checkpoint brings)
RULES = {
    # data and output
    "data_dir": NOT_EMPTY,
    "log_dir": NOT_EMPTY,
    "init_from": NOT_EMPTY,  # the file or model it names is checked when it is loaded
    "mode": one_of("train", "sample", "export"),
    "export_dir": ANY,
    # model
    "n_layer": at_least(1),
    "n_head": at_least(1),
    "n_embd": at_least(1),
    "block_size": at_least(1),
    "vocab_size": at_least(1),
    # batch
    "total_batch_size": at_least(1),
    "micro_batch_size": Rule(lambda v: v == "auto" or isinstance(v, int) and v >= 1, "expected auto or a number >= 1",
                             "auto", (0, -1, "big")),
    "shuffle": ANY,
    # optimizer and learning-rate schedule
    "max_lr": above(0),
    "min_lr": at_least(0),
    "warmup_steps": at_least(0),
    "max_steps": at_least(1),
    "lr_schedule": one_of("cosine", "wsd"),
    "lr_decay_steps": at_least(0),
    "warmdown_steps": at_least(0),
    "weight_decay": at_least(0),
    "beta1": between(0, 1, 0.9),
    "beta2": between(0, 1, 0.95),
    "eps": above(0),
    "grad_clip": at_least(0),
    "optimizer": one_of("adamw", "muon"),
    "muon_lr": above(0),
    "muon_momentum": between(0, 1, 0.95),
    "muon_weight_decay": at_least(0),
    "seed": between(0, 2**32, 1337),  # numpy's seeds are 32-bit
    # system
    "device": one_of("auto", "cpu", "cuda", "mps"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "compile": ANY,
    "fsdp": ANY,
    "activation_checkpointing": ANY,
    "loss_impl": one_of("auto", "chunked", "plain"),
    "dist_timeout_min": at_least(1),
    # evaluation, sampling and checkpoints
    "val_every": at_least(0),
    "val_tokens": at_least(1),
    "hellaswag_every": at_least(0),
    "hellaswag_file": ANY,
    "sample_every": at_least(0),
    "checkpoint_every": at_least(0),
    "keep_checkpoints": at_least(0),
    "skip_nonfinite": ANY,
    # loss spikes
    "spike_guard": ANY,
    "spike_window": at_least(1),
    "spike_k": above(0),
    "spike_min_rise": at_least(0),
    "spike_patience": at_least(1),
    "spike_snapshot_every": at_least(1),
    "spike_skip_steps": at_least(0),
    "spike_max_rollbacks": at_least(0),
    "spike_rollback_window": at_least(1),
    "skip_tokens": Rule(lambda v: token_ranges(v) is not None, "expected token ranges START-END[,START-END...] with "
                        "0 <= START < END, as a rollback line prints them", None, ("9-3", "x")),
    "wandb_log": ANY,
    "wandb_project": NOT_EMPTY,
    "wandb_run_name": ANY,
    # sampling
    "prompt": ANY,  # a prompt too long for block_size keeps its end
    "num_samples": at_least(1),
    "max_new_tokens": at_least(1),
    "top_k": at_least(1),
    "temperature": Rule(lambda v: v > 0, "must be > 0 (for greedy decoding pass --top_k=1)", None, (0.0, -1.0)),
    "samples_file": ANY,
    "debug": ANY,
}


def token_ranges(text):
    """--skip_tokens as a list of [start, end] token positions, or None if it is not "A-B,C-D" with 0 <= A < B."""
    ranges = []
    for part in filter(None, text.replace(" ", "").split(",")):
        start, sep, end = part.partition("-")
        if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
            return None
        ranges.append([int(start), int(end)])
    return ranges


def heads_error(c):
    divisors = [h for h in range(1, c.n_embd + 1) if c.n_embd % h == 0][:12]
    return f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}: choose n_head among {divisors}"


def batch_error(c):
    per_micro_step = c.micro_batch_size * c.block_size
    nearest = max(1, round(c.total_batch_size / per_micro_step)) * per_micro_step
    return (f"total_batch_size={c.total_batch_size} is not divisible by micro_batch_size*block_size = {c.micro_batch_size}"
            f"*{c.block_size} = {per_micro_step}: use a multiple of it such as --total_batch_size={nearest}")


RELATIONS = [  # between settings; the checks that need the world size, the machine or files come later
    Relation(("n_embd", "n_head"), lambda c: c.n_embd % c.n_head == 0, heads_error, {"n_embd": 30, "n_head": 4}),
    Relation(("total_batch_size", "micro_batch_size", "block_size"),
             lambda c: c.micro_batch_size == "auto" or c.total_batch_size % (c.micro_batch_size * c.block_size) == 0,
             batch_error,
             {"total_batch_size": 100, "micro_batch_size": 4, "block_size": 16}),
    Relation(("min_lr", "max_lr"), lambda c: c.min_lr <= c.max_lr,
             lambda c: f"--min_lr={c.min_lr} is above --max_lr={c.max_lr}: the schedule ends at min_lr, so pass "
                       f"--min_lr={c.max_lr / 10:g} (10% of max_lr) or less", {"min_lr": 1.0, "max_lr": 0.1}),
    Relation(("lr_decay_steps", "warmup_steps", "max_steps"),
             lambda c: c.warmup_steps + c.lr_decay_steps <= c.max_steps or not c.lr_decay_steps,
             lambda c: f"--lr_decay_steps={c.lr_decay_steps} after --warmup_steps={c.warmup_steps} is longer than the run "
                       f"(--max_steps={c.max_steps}): pass --lr_decay_steps={max(c.max_steps - c.warmup_steps, 0)} or "
                       f"less (0 = decay until max_steps)", {"lr_decay_steps": 100, "warmup_steps": 10, "max_steps": 50}),
    Relation(("max_new_tokens", "block_size"),
             lambda c: c.max_new_tokens < c.block_size or c.mode != "train" or not c.sample_every,
             lambda c: f"--max_new_tokens={c.max_new_tokens} leaves no room for the prompt in block_size={c.block_size}: "
                       f"pass --max_new_tokens={max(c.block_size // 2, 1)} or less, or --sample_every=0",
             {"max_new_tokens": 16, "block_size": 16}),
    Relation(("export_dir", "mode"), lambda c: c.export_dir or c.mode != "export",
             lambda c: "--mode=export needs --export_dir=DIR, the directory to write the Hugging Face model to",
             {"mode": "export", "export_dir": ""}),
    Relation(("spike_guard", "mode"), lambda c: not c.spike_guard or c.mode == "train",
             lambda c: f"--spike_guard=1 guards training, and --mode={c.mode} trains nothing: drop --spike_guard",
             {"spike_guard": True, "mode": "sample"}),
    Relation(("dtype", "fsdp"), lambda c: c.dtype != "float16" or not c.fsdp,
             lambda c: "--dtype=float16 with --fsdp=1: float16 needs a GradScaler, and its overflow check would see only "
                       "this rank's shard of the gradients; use --dtype=bfloat16 or float32 with FSDP, or DDP (--fsdp=0)",
             {"dtype": "float16", "fsdp": True}),
    Relation(("warmdown_steps", "warmup_steps", "max_steps", "lr_schedule"),
             lambda c: c.lr_schedule != "wsd" or c.warmup_steps + (c.warmdown_steps or c.max_steps // 5) <= c.max_steps,
             lambda c: (f"--warmdown_steps={c.warmdown_steps}" if c.warmdown_steps else
                        f"the warmdown ({c.max_steps // 5} steps, 20% of max_steps)") + f" and --warmup_steps="
                       f"{c.warmup_steps} are longer than the run (--max_steps={c.max_steps}): lower them or raise max_steps",
             {"lr_schedule": "wsd", "warmdown_steps": 100, "warmup_steps": 10, "max_steps": 50}),
]


def check_config(cfg):
    check_settings(cfg, RULES, RELATIONS)


def check_command_line(cfg):
    """Before any work: every value, and the relations between them unless training continues a checkpoint, whose
    settings fill in those the command line leaves out (starting_point checks that merged config)."""
    continues = cfg.mode == "train" and cfg.init_from != "scratch" and not is_hf_model(cfg.init_from)
    check_settings(cfg, RULES, () if continues else RELATIONS)


MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the Config fields that shape the model


# --- model ---


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50257 = 50000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise UserError(f"{name}={value}: must be at least 1")
        if self.n_embd % self.n_head:
            raise UserError(heads_error(self))


def model_config(cfg):
    return GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})


def muon_settings(cfg):
    """configure_optimizers' muon argument: Muon's settings under --optimizer=muon, else None (AdamW alone)."""
    if cfg.optimizer != "muon":
        return None
    return {"lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay}


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for fast generation."""

    def __init__(self, config, batch_size, max_len):
        hs = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = self.v = None  # made at the first update, in the dtype the model computes in
        self.pos = 0  # tokens cached so far; GPT.forward advances it

    def update(self, layer, k, v):
        """Stores k, v (B, nh, T, hs) after the cached tokens; returns all keys and values so far."""
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each token sees only itself and the tokens before it.

    Every head looks at the whole sequence through its own slice of q, k and v (hs = n_embd / n_head wide), so the
    heads can attend to different things; their outputs sit side by side and c_proj mixes them. With a KVCache
    (generation) the keys and values of earlier tokens are read back instead of recomputed.
    """

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # see GPT._init_weights

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # a prompt (nothing cached yet) needs the causal mask; one new token may see everything cached
        is_causal = kv_cache is None or kv_cache.pos == 0
        if kv_cache is not None:
            if kv_cache.pos > 0 and T != 1:
                raise ValueError("with a non-empty KV cache, feed one token at a time")
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, pos + T, hs)
        if attn_mask is not None:  # (B, 1, T, T), True where a query may attend: replaces the causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, 4C) inside


class Block(nn.Module):
    """One transformer layer, pre-LayerNorm as in GPT-2: attention (tokens exchange information), then an MLP (each
    token on its own). Both add to the residual stream x rather than replace it, so gradients reach every layer."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.recompute = False  # activation_checkpointing: set by the training setup
        self.compiled = None  # torch.compile(self.layers), under FSDP with --compile=1: set by shard_model

    def forward(self, x, kv_cache=None, attn_mask=None):
        # the compiled layers take the fixed shapes of training and validation; generation and HellaSwag run eager
        layers = self.compiled if self.compiled is not None and kv_cache is None and attn_mask is None else self.layers
        if self.recompute and torch.is_grad_enabled():
            # keeps only x for the backward pass, which runs the block again to get what it needs: memory for compute.
            # Inside the block, so that under FSDP the recomputation runs while the block's weights are gathered
            return checkpoint(layers, x, kv_cache, attn_mask, use_reentrant=False)
        return layers(x, kv_cache, attn_mask)

    def layers(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token and position embeddings, n_layer Blocks, a final LayerNorm and the vocabulary projection lm_head,
    whose weight is the token embedding's (tied). The shapes and names are OpenAI's, so Hugging Face's GPT-2 weights
    load into it one to one (see load_hf_model)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.loss_impl = "chunked"  # or "plain": see forward; the training setup picks it (--loss_impl)
        self.loss_memory = {}  # log_softmax_chunks' buffer, kept from step to step (see there)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2's init: std 0.02, and the projections that add into the residual stream scaled
        # by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        """(logits (B, T, vocab_size), None) without targets; last_only: logits (B, 1, vocab_size) of the last
        position only, all that generation needs. With targets: (None, the mean loss). loss_impl "plain" computes
        it from the logits; "chunked" by LinearCrossEntropy, which never holds the whole (B, T, vocab_size) logits
        (the vocabulary matmul is the largest one): less memory, and faster on a CPU; on a GPU, torch.compile fuses
        the plain path into fewer passes over memory."""
        x = self.hidden_states(idx, kv_cache=kv_cache)  # (B, T, C)
        if targets is not None:
            if self.loss_impl == "plain":
                logits = self.lm_head(x)  # (B, T, vocab_size)
                return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
            return None, self.chunked_loss(x.view(-1, x.size(-1)), targets.reshape(-1))
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        return self.lm_head(x), None  # (B, T, vocab_size)

    def chunked_loss(self, x, targets):
        """The same loss as the plain path in forward, chunk by chunk (LinearCrossEntropy). compile_model keeps it out
        of torch.compile's graph."""
        return LinearCrossEntropy.apply(x, self.lm_head.weight, targets, self.loss_memory)

    def hidden_states(self, idx, kv_cache=None, pos=None, attn_mask=None):
        """The final LayerNorm's output (B, T, C), before the vocabulary projection.

        By default token t sits at position t (after any cached tokens) and sees tokens 0..t. `pos` (B, T) and
        `attn_mask` (B, 1, T, T) replace both, so several sequences can share one row (HellaSwag's pack_examples
        puts a context and its four endings in one row).
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def crop_block_size(self, block_size):
        """Keeps the first block_size position embeddings, to use a pretrained model with a shorter context."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def num_params(self):
        # the position embeddings do no matmul work, so they are left out of the FLOP count
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def flops_per_token(self, T):
        """Training FLOPs per token: 6N for the matmuls, plus attention's scores and values (PaLM, app. B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, muon=None):
        """AdamW for every parameter (GPT-2's recipe); or, given muon (a dict of Muon's lr, momentum and weight_decay),
        a MuonAdamW: Muon for the 2-D weights inside the blocks, this same AdamW for the rest."""
        params = [p for p in self.parameters() if p.requires_grad]
        matrices = [(p, 3 if p is block.attn.c_attn.weight else 1) for block in self.transformer.h
                    for p in block.parameters() if p.requires_grad and p.dim() == 2] if muon else []  # (matrix, pieces)
        params = [p for p in params if not any(p is m for m, _ in matrices)]
        # decay the matmul and embedding weights (dim >= 2), not biases and LayerNorm gains
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")  # one kernel for the whole update, not one per parameter
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
        return MuonAdamW(adamw, matrices, lr_scale=muon["lr"] / learning_rate, **muon) if muon else adamw


# --- the memory-saving loss ---


LOSS_CHUNK_ELEMENTS = 2**27  # logits log_softmax_chunks computes at once: 512 MB in float32


def log_softmax_chunks(x, weight, keep=None, vocab=None):
    """log_softmax(x @ weight.T) a chunk of rows at a time, never all (N, vocab) logits at once: yields (rows, logp,
    dtype) with logp the chunk's (r, weight rows) float32 log-probabilities and dtype the matmul's (autocast's if
    on). logp is computed in place in one buffer, which the next chunk overwrites. vocab: only the first vocab
    tokens count, the rest (padding) get probability 0; slicing the weight instead would make the matmul's width
    odd, and it much slower.

    keep: a dict in which, on a CPU without autocast, the buffer stays from call to call. Memory freed by one
    training step comes back to the next as fresh pages that the kernel faults in and zeroes, about a tenth of a
    small model's step; a GPU's caching allocator already reuses it.
    """
    n, width = x.size(0), weight.size(0)
    step = max(1, LOSS_CHUNK_ELEMENTS // width)
    reuse = keep is not None and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if reuse:
        buffer = keep.get("logits")
        if buffer is None or buffer.numel() < min(n, step) * width or buffer.dtype != weight.dtype:
            keep["logits"] = buffer = torch.empty(min(n, step) * width, dtype=weight.dtype)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        if reuse:
            logits = torch.mm(x[rows], weight.t(), out=buffer[:(rows.stop - start) * width].view(-1, width))
        else:
            logits = x[rows] @ weight.t()  # (r, width)
        logp = logits.float()  # the same tensor if it is float32 already
        if vocab is not None:
            logp[:, vocab:] = float("-inf")
        yield rows, torch.log_softmax(logp, dim=1, out=logp), logits.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1: ignored), without keeping the logits.

    The plain path (lm_head, then F.cross_entropy) allocates the (N, vocab) logits, their log-softmax and two
    gradients of that size: with a 50304-token vocabulary they dominate memory and, on a CPU, time. The loss
    is the network's last operation, so its gradient is already known in the forward pass. For each chunk of
    rows from log_softmax_chunks: the targets' log-probabilities read off, then softmax - one_hot in place,
    multiplied out into that chunk's share of dx and dweight. Backward only scales them by the incoming gradient.
    Under autocast the matmuls run in its dtype and the softmax in float32, as with F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, keep=None):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # a target of -1 is ignored (F.cross_entropy's ignore_index=-1): validation pads with them; the mean is over
        # the rest, so all rows ignored gives 0/0 = nan, as there. Multiplying by `valid` costs (N, C), not (N, vocab)
        valid = (targets >= 0).unsqueeze(1)  # (N, 1)
        count = valid.sum().float()
        loss = torch.zeros((), device=x.device)
        dx = torch.empty_like(x) if need_grad else None
        dweight = None  # float32 while it accumulates over chunks
        for rows, logp, dtype in log_softmax_chunks(x, weight, keep):
            tc, vc = targets[rows, None].clamp(min=0), valid[rows]  # (r, 1)
            loss -= (logp.gather(1, tc) * vc).sum()
            if need_grad:
                # d(sum of the chunk's losses)/d(logits) = softmax - one_hot(targets), back in the matmul's dtype
                grad = logp.exp_().scatter_add_(1, tc, torch.full(tc.shape, -1.0, device=x.device)).to(dtype)
                dx[rows] = (grad @ weight) * vc
                part = grad.t() @ (x[rows] * vc)  # (vocab, C)
                dweight = part.float() if dweight is None else dweight.add_(part)
        if need_grad:
            ctx.save_for_backward(dx, dweight.to(weight.dtype), count)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dweight, count = ctx.saved_tensors
        scale = grad_loss / count  # the mean over rows, and whatever came after the loss
        # in place: a second backward through this graph would raise (saved tensors modified), not go wrong
        return dx.mul_(scale), dweight.mul_(scale), None, None


# --- data ---


# GPT-2's tokenizer. tiktoken's "r50k_base" is the very BPE of its "gpt2" (same merges, split pattern and
# <|endoftext|> = 50256) but loads from one file, which PyPI also carries (demo.py uses that)
TOKENIZER = "r50k_base"
GPT2_VOCAB = 50257  # the tokenizer's size; our vocab_size may be padded beyond it


def get_tokenizer():
    import tiktoken  # only the scripts that turn text into tokens need it

    return tiktoken.get_encoding(TOKENIZER)


def find_shards(data_dir, split):
    """The shard files of one split ("train" or "val"), in sorted name order."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir}/ does not exist: run python fineweb.py to write the shards "
                        f"(or pass --data_dir=PATH)")
    names = sorted(n for n in os.listdir(data_dir) if f"_{split}_" in n and n.endswith(".npy"))
    if not names:
        raise UserError(f"no {split} shards (*_{split}_*.npy) in {data_dir}/: run python fineweb.py first")
    return [os.path.join(data_dir, n) for n in names]


def open_shard(path):
    """Memory-maps one shard, checking that it is a 1-d uint16 .npy with at least one token."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"cannot read shard {path} ({e}): it is truncated or not a .npy file; "
                        f"delete it and run python fineweb.py again") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected 1-d uint16 tokens: "
                        f"rewrite it with python fineweb.py")
    if len(tokens) == 0:
        raise UserError(f"shard {path} is empty: delete it and run python fineweb.py again")
    return tokens


class TokenStream:
    """The shards of one split, in sorted name order, as one memory-mapped token stream that wraps around at its end.

    A read that runs past one shard continues into the next, and past the last shard into the first, so no token is
    wasted at a shard end. Token ids are checked against vocab_size when a shard is first read.
    """

    def __init__(self, data_dir, split, vocab_size=50304):
        self.vocab_size = vocab_size
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.arrays = [None] * len(self.shards)  # plain views of the shards (cheaper to slice), once their ids are checked
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # where each shard starts in the stream
        self.total = int(self.offsets[-1])

    def _read(self, start, n):
        """n tokens of the stream from `start`, across shard ends and around the end of the stream."""
        start %= self.total
        pieces = []
        while n > 0:
            i = int(np.searchsorted(self.offsets, start, side="right")) - 1
            lo = start - int(self.offsets[i])
            take = min(n, len(self.shards[i]) - lo)
            pieces.append(self._shard(i)[lo:lo + take])
            n -= take
            start = (start + take) % self.total
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _shard(self, i):
        if self.arrays[i] is None:
            top = int(self.shards[i].max())
            if top >= self.vocab_size:
                raise UserError(f"shard {self.paths[i]} holds token id {top} >= vocab_size={self.vocab_size}: "
                                f"it was not written by python fineweb.py with the GPT-2 tokenizer; rewrite it")
            self.arrays[i] = np.asarray(self.shards[i])  # still memory-mapped
        return self.arrays[i]


FEISTEL_ROUNDS = 6  # Luby and Rackoff: 4 rounds of a pseudorandom function already give a pseudorandom permutation


def mix64(x):
    """splitmix64's finalizer: uint64 array -> uint64 array, every input bit spread over every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled_windows(slots, n, seed, epoch):
    """Where each slot of an epoch's order takes its window from: a bijection of range(n) for each (seed, epoch).

    Computed for the slots asked (an int array) and never stored, so it costs no memory however long the stream. A
    Feistel network permutes the k-bit numbers (k = the bits of n - 1): each round XORs one part of the bits with a
    keyed hash of the other part (multiply-add-shift, a universal hash) and the parts swap; a round is undone by
    repeating it, so each is a bijection. A result >= n goes through again until it lands below n (cycle walking:
    a bijection of range(n), < 2 passes on average since 2**k < 2n).
    """
    k = (n - 1).bit_length()
    width = [k - k // 2, k // 2]  # of the high and the low part; they alternate, as the parts swap
    base = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03) % 2**64
    keys = mix64(np.arange(2 * FEISTEL_ROUNDS, dtype=np.uint64) + np.uint64(base))  # wraps around, as it should
    out = np.asarray(slots, dtype=np.uint64).copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        high, low = out[todo] >> np.uint64(width[1]), out[todo] & np.uint64((1 << width[1]) - 1)
        for r in range(FEISTEL_ROUNDS):
            mask = np.uint64((1 << width[r % 2]) - 1)  # the high part's width, which the low part takes over
            hashed = (low * (keys[2 * r] | np.uint64(1)) + keys[2 * r + 1]) >> np.uint64(32)
            high, low = low, high ^ (hashed & mask)
        out[todo] = (high << np.uint64(width[1 - FEISTEL_ROUNDS % 2])) | low
        todo &= out >= n
    return out.astype(np.int64)


class DataLoaderLite(TokenStream):
    """B x T windows of tokens from the shards of one split, for one rank.

    The shards form one stream (TokenStream) and each epoch reads all of it. Each batch, rank r reads the B*T+1
    tokens starting at position + r*B*T (targets are inputs shifted by one) and then every rank moves position on by
    B*T*world_size. So `position` is the loader's whole state: the same on every rank and meaningful for any world size.

    With shuffle, position counts along a shuffled stream instead: epoch e (position // total) is the stream cut into
    windows of T tokens, the full ones in the order shuffled_windows(seed, e), then the short rest if there is one.
    Every token is still read once per epoch, each epoch in another order, and the state is position and seed.

    skipped: ranges [start, end) of positions never read (a SpikeGuard rollback's, --skip_tokens): a batch that would
    start inside one starts at its end. Positions count along the (shuffled) stream, so every world size skips the same
    tokens; the ranges are part of the state.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, vocab_size=50304, shuffle=False, seed=0):
        super().__init__(data_dir, split, vocab_size)
        self.B, self.T = B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        needed = B * T * world_size + 1
        if self.total < needed:
            raise UserError(f"the {split} shards in {data_dir}/ hold {self.total} tokens, fewer than one batch needs "
                            f"(micro_batch_size*block_size*world_size+1 = {needed}): lower those settings "
                            f"or write more data with python fineweb.py")
        self.position = 0
        self.skipped = []  # [start, end] position ranges

    def reset(self):
        self.position = 0

    def state_dict(self):
        state = {"position": self.position, "seed": self.seed} if self.shuffle else {"position": self.position}
        return {**state, "skipped": [list(r) for r in self.skipped]} if self.skipped else state

    def load_state_dict(self, state):
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))  # the order a shuffled run started with, whatever --seed is now
        saved = [[int(a), int(b)] for a, b in state.get("skipped", [])]  # none in checkpoints from before skipping
        self.skipped = saved + [r for r in self.skipped if r not in saved]  # and those given now (--skip_tokens)

    def next_batch(self):
        while inside := [end for start, end in self.skipped if start <= self.position < end]:
            self.position = max(inside)
        B, T = self.B, self.T
        read = self._read_shuffled if self.shuffle else self._read
        buf = read(self.position + self.rank * B * T, B * T + 1)
        buf = torch.from_numpy(buf.astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets
        self.position += B * T * self.world_size
        return x, y

    def _read_shuffled(self, start, n):
        """n tokens of the shuffled stream from `start`: a piece of each window it crosses, read where the window is."""
        T, full = self.T, self.total // self.T * self.T  # the tokens in full windows
        starts, ends = [], []  # the pieces, where they are in the stream
        while n > 0:
            epoch, offset = divmod(start, self.total)
            end = min(offset + n, self.total)  # the part of the read in this epoch
            if offset < full:
                slots = np.arange(offset // T, (min(end, full) - 1) // T + 1)
                lo, hi = np.maximum(slots * T, offset), np.minimum((slots + 1) * T, end)  # what is read of each slot
                moved = shuffled_windows(slots, full // T, self.seed, epoch) * T + lo - slots * T
                starts.append(moved)
                ends.append(moved + hi - lo)
            if end > full:  # the rest, in place, at the end of every epoch
                starts.append(np.array([max(offset, full)]))
                ends.append(np.array([end]))
            n -= end - offset
            start += end - offset
        starts, ends = np.concatenate(starts), np.concatenate(ends)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        inside = ends <= self.offsets[shard + 1]  # most pieces lie in one shard: sliced at once, without _read's loop
        pieces = [self._shard(i)[a - o:b - o] if one else self._read(a, b - a)
                  for i, o, a, b, one in zip(shard.tolist(), self.offsets[shard].tolist(), starts.tolist(), ends.tolist(),
                                             inside.tolist(), strict=True)]
        return np.concatenate(pieces)


class ValLoader(TokenStream):
    """The first n_tokens targets of the val split (all there are, if fewer), for one rank: the same tokens, so the
    same token-weighted mean loss, for any number of ranks and any micro batch.

    The targets are cut into sequences of T (the last may be shorter); rank r takes the r-th of world_size contiguous
    ranges of them, B sequences per batch. Every rank yields the same number of batches, since a sharded model needs
    every rank in every forward pass: rows past a rank's share, and past the last target, have target -1 (ignored).
    """

    def __init__(self, data_dir, n_tokens, B, T, rank=0, world_size=1, vocab_size=50304):
        super().__init__(data_dir, "val", vocab_size)
        if self.total < 2:
            raise UserError(f"the val shards in {data_dir}/ hold {self.total} token, too few to predict one: write more "
                            f"data with python fineweb.py --val_tokens=..., or pass --val_every=0")
        self.B, self.T = B, T
        self.rank, self.world_size = rank, world_size
        self.n_tokens = min(n_tokens, self.total - 1)  # a target needs a token before it; the stream never wraps here
        sequences = -(-self.n_tokens // T)
        self.per_rank = -(-sequences // world_size)

    def batches(self):
        """Yields (x, y), each (B, T): the inputs (0 where padded) and their targets (-1 where padded)."""
        B, T = self.B, self.T
        first = self.rank * self.per_rank  # this rank's first sequence
        for b in range(0, self.per_rank, B):
            seq = first + b
            stop = min(seq + B, first + self.per_rank)  # the sequences of this batch
            count = min(stop * T, self.n_tokens) - seq * T  # its targets, a few or none at the end
            x = torch.zeros(B * T, dtype=torch.long)
            y = torch.full((B * T,), -1, dtype=torch.long)
            if count > 0:
                buf = torch.from_numpy(self._read(seq * T, count + 1).astype(np.int64))
                x[:count], y[:count] = buf[:-1], buf[1:]
            yield x.view(B, T), y.view(B, T)


# --- training ---


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self):
        return self.rank == 0


def local_gpu(local_rank, count):
    """The index of this rank's GPU among the count that torch sees: LOCAL_RANK modulo count. torchrun shows each of
    its processes all the machine's GPUs, so rank r takes GPU r. A launcher that gives each process its own GPUs
    (srun --gpus-per-task=1, or any per-process CUDA_VISIBLE_DEVICES) shows each only those, renumbered from 0, so
    LOCAL_RANK runs up to 7 while each process sees just cuda:0; modulo gives it that one (torch.distributed.checkpoint
    picks its default device by the same rule). More ranks than GPUs would share one, which NCCL refuses ("Duplicate
    GPU detected")."""
    if count < 1:
        raise UserError(f"--device=cuda but torch sees no CUDA GPU for LOCAL_RANK={local_rank} (is CUDA_VISIBLE_DEVICES "
                        f"empty?): use --device=cpu or --device=auto")
    return local_rank % count


def resolve_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name}: expected auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but torch sees no CUDA GPU: use --device=cpu or --device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available: use --device=cpu or --device=auto")
    return torch.device("cuda", local_gpu(local_rank, torch.cuda.device_count())) if name == "cuda" else torch.device(name)


def setup_distributed(device_name, timeout_min=60):
    """Reads torchrun's environment (if any), joins the process group and picks this rank's device. A collective that
    waits longer than timeout_min minutes fails (NCCL's watchdog, gloo's timeout) rather than hang."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, resolve_device(device_name))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun --max-restarts keeps one key-value store across restarts; without a prefix of their own, the
    # restarted ranks read the dead ranks' addresses and gloo hangs connecting to them
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=timeout_min))
    return Dist(rank, local_rank, world_size, device)


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name, device):
    """The compute dtype for --dtype: auto = bfloat16 on a CUDA GPU that has it natively, float16 (with a GradScaler)
    on one that does not (T4, V100), float32 elsewhere."""
    if name not in ("auto", *DTYPES):
        raise UserError(f"--dtype={name}: expected auto, float32, bfloat16 or float16")
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def make_autocast(dtype, device, fsdp_casts=False):
    """(a function returning the context forward passes run in, the compute dtype as torch.dtype) for --dtype.

    Autocast runs matmuls in bfloat16/float16 and keeps float32 weights and residual stream. Under FSDP with a
    16-bit dtype (fsdp_casts) the MixedPrecisionPolicy casts the gathered weights and each unit's inputs instead, as
    torchtitan does, and autocast stays off: the residual stream is then 16-bit, so bf16 FSDP and bf16 DDP differ
    numerically (docs/scaling.md)."""
    dtype = resolve_dtype(dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any matmul left in float32
        torch.backends.cudnn.allow_tf32 = True
    enabled = dtype != torch.float32 and not fsdp_casts

    def autocast():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)

    return autocast, dtype


def resolve_loss_impl(name, device):
    """The loss path GPT.forward takes: auto = plain on CUDA (what torch.compile fuses), chunked elsewhere."""
    if name not in ("auto", "chunked", "plain"):
        raise UserError(f"--loss_impl={name}: expected auto, chunked or plain")
    if name == "auto":
        return "plain" if device.type == "cuda" else "chunked"
    return name


def to_device(batch, device):
    """A batch (x, y) on device; on CUDA through pinned memory, so that the copy runs beside the computation."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def synchronize(device):
    """Waits until the device has done the work queued so far, so that a step's time is its real time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# dense 16-bit (bf16, or fp16 where a GPU has no bf16) tensor-core peak FLOP/s from NVIDIA's data sheets, for MFU.
# Keyed by the exact name torch.cuda.get_device_name gives: "NVIDIA L40" is not an L4, nor "H100 NVL" an SXM card
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "Tesla V100-SXM2-16GB": 125e12,  # float16
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12,
    "Tesla V100-PCIE-32GB": 112e12,
    "Tesla T4": 65e12,
}


def peak_flops(device):
    """The GPU's peak from PEAK_FLOPS, or None (MFU is then shown as "-") for a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device))


def get_lr(step, cfg):
    """Linear warmup to max_lr, then by lr_schedule:
    cosine: a cosine decay to min_lr over lr_decay_steps (default: until max_steps), then min_lr;
    wsd: max_lr until the last warmdown_steps, over which lr falls as 1 - sqrt(progress) to reach min_lr at the
    last step (Hägele et al. 2024, as llm.c: it ends lower in loss than a linear warmdown). The stable part does not
    depend on max_steps, so a run can be extended (resume with a larger --max_steps) before its warmdown starts."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "wsd":
        warmdown = cfg.warmdown_steps or cfg.max_steps // 5
        progress = (step + 1 - (cfg.max_steps - warmdown)) / max(warmdown, 1)  # 1 at the last step, as warmup
        return cfg.max_lr if progress <= 0 else cfg.min_lr + (1 - math.sqrt(min(progress, 1))) * (cfg.max_lr - cfg.min_lr)
    decay_steps = cfg.lr_decay_steps or cfg.max_steps - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(decay_steps, 1)
    if progress >= 1:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def estimate_memory(cfg, world_size, dtype, loss_impl):
    """Bytes per rank that training with cfg in compute dtype `dtype` (a torch.dtype) needs, from the config alone:
    a dict of the parts (see docs/scaling.md).

    Weights, gradients and AdamW's two moments are float32: 4 + 4 + 8 bytes per parameter (Muon keeps one moment for
    the blocks' matrices: 4 bytes for those under --optimizer=muon; under FSDP its step adds muon_step, each owner's
    whole matrix at a time, muon.step_bytes, after backward has freed the activations), split over the ranks
    under FSDP, which also holds the weights and gradients of a few whole units at a time ("gathered"; the root, with
    the embeddings, is the largest). Activations are for one micro-batch: each block keeps about 16 numbers per token
    and channel for its backward pass (counted with torch.autograd.graph.saved_tensors_hooks), in the compute dtype;
    with recompute only its input, the residual stream (float32 under autocast, 16-bit where FSDP's mixed precision
    casts it; ln_f keeps one more), plus one block's worth while it is recomputed. The loss adds its logits (plain)
    or one chunk of them and its gradients (chunked). Left out: the CUDA context, allocator slack, NCCL buffers.
    """
    V, C, L, T, B = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.micro_batch_size
    block, root = 12 * C * C + 13 * C, V * C + T * C + 2 * C  # parameters per Block, and outside the Blocks
    n = L * block + root  # the tied embedding counted once
    muon = L * 12 * C * C if cfg.optimizer == "muon" else 0  # the blocks' matrices, whose one moment Muon keeps
    sharded = cfg.fsdp and world_size > 1
    shards = world_size if sharded else 1
    act = dtype.itemsize  # bytes per activation
    residual = act if sharded else 4  # a block's input: FSDP casts it, autocast leaves it float32
    tokens = B * T
    if loss_impl == "plain":
        loss = tokens * V * (act + 4 + 4)  # the logits, in float32, and their log-softmax
    else:
        loss = tokens * C * 4 + V * C * 4 + min(tokens, LOSS_CHUNK_ELEMENTS // V) * V * 4  # dx, dweight, one chunk
    parts = {"weights": 4 * n / shards, "gradients": 4 * n / shards, "optimizer": (8 * n - 4 * muon) / shards,
             # FSDP: whole weights (in the compute dtype), gradients and their reduce-scatter buffer (float32) of the
             # root and 2 blocks (one computing, the next prefetched); DDP under autocast: its 16-bit weight copies
             "gathered": (act + 8) * (root + 2 * block) if sharded else act * n if act < 4 else 0,
             "loss": loss, "activations_kept": tokens * L * 16 * C * act + loss,
             "activations_recompute": tokens * C * ((L + 1) * residual + 16 * act) + loss}  # +1: ln_f's input
    parts["activations"] = parts["activations_recompute" if cfg.activation_checkpointing else "activations_kept"]
    parts["total"] = sum(parts[k] for k in ("weights", "gradients", "optimizer", "gathered", "activations"))
    if muon and sharded:  # Muon's step under FSDP: each owner's whole matrix and Newton-Schulz, once backward is done
        parts["muon_step"] = step_bytes([(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L, [3, 1, 1, 1] * L, world_size)
        parts["total"] += max(0, parts["muon_step"] - parts["gathered"] - parts["activations"])
    return parts


def describe_memory(parts, recompute):
    """The estimate as one line, in GB."""
    gb = lambda key: f"{parts[key] / 1e9:.2f}"
    other = "activations_kept" if recompute else "activations_recompute"
    return (f"memory per rank (estimate, GB): weights {gb('weights')} + gradients {gb('gradients')} + optimizer "
            f"{gb('optimizer')} + gathered/16-bit copies {gb('gathered')} + activations {gb('activations')} per micro-batch "
            f"({gb(other)} {'without' if recompute else 'with'} activation_checkpointing) = {gb('total')}"
            + (f" (Muon's step {gb('muon_step')}, once the activations are freed)" if "muon_step" in parts else ""))


def grad_accum_steps(cfg, world_size):
    per_micro_step = cfg.micro_batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_micro_step:
        nearest = max(1, round(cfg.total_batch_size / per_micro_step)) * per_micro_step
        raise UserError(f"total_batch_size={cfg.total_batch_size} is not divisible by micro_batch_size*block_size*world_size"
                        f" = {cfg.micro_batch_size}*{cfg.block_size}*{world_size} = {per_micro_step}: use a multiple of "
                        f"{per_micro_step} such as --total_batch_size={nearest}, or change micro_batch_size")
    return cfg.total_batch_size // per_micro_step


# The estimate leaves out the CUDA context, the allocator's cached and fragmented blocks, NCCL's buffers and
# torch.compile's autotuning; measured against it (bench/bench_memory.py, docs/performance.md), the peak was up to 1/0.82 of the
# estimate. So auto keeps the estimate within MEMORY_FRACTION of the free memory, after MEMORY_RESERVE bytes.
MEMORY_FRACTION = 0.8
MEMORY_RESERVE = 2**30


def free_memory(device, local_world_size=1, root="/"):
    """Bytes this rank may still use on device: the CUDA GPU's free memory (torch.cuda.mem_get_info), MPS's
    recommended working set less what the driver holds, or on the CPU the least of the available RAM (MemAvailable)
    and what each memory cgroup holding this process still allows (memory_limits), shared by the ranks on this machine.
    On the CPU the files are read under root, so that a test can point it at a tree of its own."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    free = [limit - usage for _, limit, usage in memory_limits(root)]
    if available := re.search(r"^MemAvailable:\s+(\d+) kB", read_text(os.path.join(root, "proc/meminfo")) or "", re.M):
        free.append(int(available[1]) * 1024)
    if not free:  # neither is known (macOS, Windows): assume a laptop's 8 GB
        free = [8 * 2**30]
    return max(0, min(free)) // local_world_size  # v2's usage may pass memory.high, which throttles rather than stops it


def usable_memory(free):
    return max(0.0, (free - MEMORY_RESERVE) * MEMORY_FRACTION)


def choose_micro_batch(cfg, world_size, dtype, loss_impl, free, below=None):
    """--micro_batch_size=auto: (a cfg with micro_batch_size, loss_impl and activation_checkpointing set, one line
    saying why), for `free` bytes on the rank with the least.

    The largest micro batch that divides this rank's sequences per step and whose estimate fits usable_memory(free),
    with the loss and recompute as configured; if none fits, with the chunked loss; if none fits even then, with
    recompute. If nothing fits, a UserError with the numbers and what would."""
    T, usable = cfg.block_size, usable_memory(free)
    per_rank, rest = divmod(cfg.total_batch_size, T * world_size)
    if rest or not per_rank:
        nearest = max(1, round(cfg.total_batch_size / (T * world_size))) * T * world_size
        raise UserError(f"--micro_batch_size=auto: total_batch_size={cfg.total_batch_size} is not a multiple of "
                        f"block_size*world_size = {T}*{world_size}, so no micro batch divides it: pass "
                        f"--total_batch_size={nearest}")
    sizes = [b for b in range(min(per_rank, (below or per_rank + 1) - 1), 0, -1) if per_rank % b == 0]
    stages = [(loss_impl, cfg.activation_checkpointing)]  # as configured, then each fallback
    if loss_impl == "plain":
        stages.append(("chunked", cfg.activation_checkpointing))
    if not cfg.activation_checkpointing:
        stages.append(("chunked", True))

    def need(b, impl, recompute, fsdp=cfg.fsdp, ranks=world_size):  # the estimate's bytes per rank
        c = dataclasses.replace(cfg, micro_batch_size=b, activation_checkpointing=recompute, fsdp=fsdp)
        return estimate_memory(c, ranks, dtype, impl)["total"]

    for impl, recompute in stages:
        b = next((b for b in sizes if need(b, impl, recompute) <= usable), None)
        if b is None:
            continue
        how = ("" if impl == loss_impl else f", the {impl} loss") + \
              ("" if recompute == cfg.activation_checkpointing else ", activation_checkpointing")
        bigger = [s for s in sizes if s > b]
        why = f"; {bigger[-1]} would need {need(bigger[-1], impl, recompute) / 1e9:.1f} GB" if bigger and not how else ""
        why += f"; not {below} or more, which ran out of memory in this log_dir" if below else ""
        chosen = dataclasses.replace(cfg, micro_batch_size=b, activation_checkpointing=recompute,
                                     loss_impl=cfg.loss_impl if impl == loss_impl else impl)
        return chosen, (f"micro_batch_size=auto: {b}{how} ({per_rank // b} micro-steps per rank): estimate "
                        f"{need(b, impl, recompute) / 1e9:.1f} GB of {usable / 1e9:.1f} GB usable ({free / 1e9:.1f} GB "
                        f"free, less {MEMORY_RESERVE / 2**30:g} GiB, x {MEMORY_FRACTION}){why}")
    ranks = next((n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                  if need(1, "chunked", True, fsdp=True, ranks=n) <= usable), None)
    shard = f"shard it with --fsdp=1 over {ranks} GPUs or more, or " if ranks and not cfg.fsdp else ""
    raise UserError(f"--micro_batch_size=auto: even 1 sequence with the chunked loss and activation_checkpointing needs "
                    f"{need(1, 'chunked', True) / 1e9:.1f} GB per rank by the estimate, and {usable / 1e9:.1f} GB are "
                    f"usable ({free / 1e9:.1f} GB free): {shard}train a smaller model (fewer --n_layer or --n_embd)")


def resolve_micro_batch(cfg, d, dtype, say):
    """cfg as it will train: an explicit micro_batch_size as it is; auto chosen by choose_micro_batch for the least
    free memory over the ranks, so that every rank makes the same choice. Either stays below a micro batch that ran out
    of memory in this log_dir under the same settings (faults.oom_limit: a rank that left mid-collective recorded it)."""
    limit = oom_limit(cfg.log_dir, memory_fingerprint(cfg, d.world_size), say)
    if limit is not None:
        per_rank = cfg.total_batch_size // (cfg.block_size * d.world_size)
        b = fit_below(cfg.micro_batch_size, limit, per_rank, os.path.join(cfg.log_dir, OOM_FILE), say)
        if b != "auto":
            return dataclasses.replace(cfg, micro_batch_size=b)
    elif cfg.micro_batch_size != "auto":
        return cfg
    free = torch.tensor(float(free_memory(d.device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))), dtype=torch.float64)
    if dist.is_initialized():
        free = free.to(d.device)
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    cfg, line = choose_micro_batch(cfg, d.world_size, dtype, resolve_loss_impl(cfg.loss_impl, d.device), free.item(),
                                   below=limit)
    say(line)
    return cfg


def is_due(every, step, last):
    return every > 0 and (step % every == 0 or last)


# where and how to run, never taken from a checkpoint
LOCAL_KEYS = ("data_dir", "log_dir", "init_from", "device", "dist_timeout_min", "debug")


def resume_config(cfg, overridden, saved, path):
    """The checkpoint's settings with this command line's overrides on top. The model's shape and the optimizer cannot
    change."""
    for k in MODEL_KEYS + ("optimizer",):  # the weights fit one shape, the optimizer state one optimizer
        theirs = saved.get(k, getattr(Config, k))  # checkpoints from before --optimizer are AdamW's
        if k in overridden and getattr(cfg, k) != theirs:
            raise UserError(f"--{k}={getattr(cfg, k)} conflicts with checkpoint {path}, which has {k}={theirs}: "
                            f"drop --{k}, or start a new run with another --log_dir")
    known = {f.name for f in dataclasses.fields(Config)}
    merged = Config(**{k: v for k, v in saved.items() if k in known})
    for k in set(overridden) | set(LOCAL_KEYS):
        setattr(merged, k, getattr(cfg, k))
    return merged


def hf_config(cfg, overridden, model, name):
    """cfg with the model fields of a Hugging Face GPT-2 (`model`, already loaded as ours).

    Overrides may only repeat them, except a shorter --block_size, which keeps the first
    position embeddings (fine-tuning with a shorter context).
    """
    theirs = dataclasses.asdict(model.config)
    for k in MODEL_KEYS:
        if k in overridden and getattr(cfg, k) != theirs[k] and not (k == "block_size" and cfg.block_size < theirs[k]):
            raise UserError(f"--{k}={getattr(cfg, k)} conflicts with {name}, which has {k}={theirs[k]}: drop --{k}")
    if cfg.block_size < theirs["block_size"] and "block_size" in overridden:
        model.crop_block_size(cfg.block_size)
    return dataclasses.replace(cfg, **{k: getattr(model.config, k) for k in MODEL_KEYS})


def prepare_log_dir(log_dir, start_step):
    """Makes log_dir and cuts log.txt back to the steps before start_step (they are logged again)."""
    log_file = os.path.join(log_dir, "log.txt")
    try:
        os.makedirs(log_dir, exist_ok=True)
        for leftover in glob.glob(os.path.join(log_dir, "*.tmp")):
            os.remove(leftover)  # a checkpoint or log whose writer was killed
        lines = []
        if os.path.exists(log_file):
            with open(log_file) as f:
                lines = [line for line in f if line.endswith("\n") and line.split(" ", 1)[0].isdigit()
                         and int(line.split(" ", 1)[0]) < start_step]  # a line cut short by a kill is dropped
        with open(log_file + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(log_file + ".tmp", log_file)
    except OSError as e:
        raise UserError(f"cannot write to log_dir {log_dir}/ ({e.strerror}): "
                        f"fix its permissions or pass --log_dir=PATH") from None
    return log_file


def make_plotter(log_file, out_file):
    """A function that redraws out_file from log_file. A failure is reported once and never stops training."""
    failed = False

    def refresh():
        nonlocal failed
        if failed:
            return
        try:
            import plot  # matplotlib is imported only here, and only on rank 0
            plot.plot_log(log_file, out_file)
        except Exception as e:
            failed = True
            print(f"warning: cannot draw {out_file} ({type(e).__name__}: {e}); training goes on without the plot")

    return refresh


def start_wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_log=1 but wandb is not installed: pip install wandb (then wandb login), "
                        "or pass --wandb_log=0") from None
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg))


def train(cfg, overridden):
    """--mode=train: joins torchrun's process group (if any), trains, and leaves the group however training ends.
    SIGTERM and SIGUSR1 from here on ask for a stop at the next step boundary (faults.StopRequest)."""
    stop = StopRequest()
    try:
        d = setup_distributed(cfg.device, cfg.dist_timeout_min)
        try:
            run_training(cfg, overridden, d, stop)
        finally:
            teardown_distributed()
    except Preempted as e:
        sys.stdout.flush()
        if e.is_master:
            sys.stderr.write(f"preempted: {e}\n")
            sys.stderr.flush()
        sys.exit(PREEMPTED)
    finally:
        stop.restore()


def starting_point(cfg, overridden, d, say):
    """Where training starts: (the run's config, a checkpoint or None, a Hugging Face model or None).

    resume takes the newest readable checkpoint in log_dir (none: from scratch); a model_XXXXX.pt path, that checkpoint;
    both continue with the checkpoint's settings under this command line's overrides, checked again. A Hugging Face
    GPT-2 gives its weights and shape, trained from step 0 with a fresh optimizer. scratch and a Hugging Face start
    refuse a log_dir that holds checkpoints, rather than overwrite them. Every rank of d must start from the same one.
    """
    path = ckpt = hf_model = None
    if cfg.init_from == "resume":
        path, ckpt = newest_readable_checkpoint(cfg.log_dir, d.is_master, say)
        if path is None:
            say(f"init_from=resume: no checkpoint in {cfg.log_dir}/, starting from scratch")
    elif cfg.init_from == "scratch" or is_hf_model(cfg.init_from):
        found = list_checkpoints(cfg.log_dir)
        if found:
            raise UserError(f"log_dir {cfg.log_dir}/ already holds checkpoints (newest {found[-1][1]}): "
                            f"pass --init_from=resume to continue that run, or another --log_dir")
        if cfg.init_from != "scratch":
            hf_model = load_hf_model(cfg.init_from)
            cfg = hf_config(cfg, overridden, hf_model, cfg.init_from)
            say(f"fine-tuning {cfg.init_from}: its weights, from step 0 with a fresh optimizer")
    else:
        path = cfg.init_from
        ckpt = load_checkpoint(path)
    ranks_agree_on(path, d)
    if ckpt:
        cfg = resume_config(cfg, overridden, ckpt["config"], path)
        say(f"resuming from {path} (step {ckpt['step']}) with its settings, overridden by: {sorted(overridden) or 'nothing'}")
    check_config(cfg)
    if ckpt and ckpt["step"] > cfg.max_steps:
        raise UserError(f"--max_steps={cfg.max_steps} is before checkpoint {path}, at step {ckpt['step']}: nothing to "
                        f"train; pass --max_steps={ckpt['step']} or more")
    return cfg, ckpt, hf_model


def build_model(cfg, d, ckpt, hf_model, train_loader, say, dtype):
    """The model on d.device (sharded over the ranks with --fsdp=1), its optimizer and its GradScaler (float16 only):
    fresh, a Hugging Face GPT-2's, or a checkpoint's complete state (the optimizer, the scaler, the loader's position
    and this rank's random states too). Returns (model, optimizer, scaler, start_step)."""
    sharded = cfg.fsdp and dist.is_initialized()
    if ckpt and sharded:
        # no whole model in this rank's memory: its shape on the meta device, then the checkpoint's tensors (mapped from
        # the file, see load_checkpoint) put in as they are; sharding copies out only this rank's slice of each
        with torch.device("meta"):
            model = GPT(model_config(cfg))
        model.load_state_dict(ckpt["model"], assign=True)
        model.transformer.wte.weight = model.lm_head.weight  # assign made the tied weight two parameters again
    else:
        model = hf_model if hf_model is not None else GPT(model_config(cfg))
        if ckpt:
            model.load_state_dict(ckpt["model"])
    model.loss_impl = resolve_loss_impl(cfg.loss_impl, d.device)
    for block in model.transformer.h:
        block.recompute = cfg.activation_checkpointing
    if sharded:
        shard_model(model, d, dtype, compile_blocks=cfg.compile)
    else:
        if cfg.fsdp:
            say("fsdp=1 with one process: nothing to shard, training as without it")
        model.to(d.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, d.device.type,
                                           muon_settings(cfg))
    # float16's narrow range: the loss is scaled up before backward and the gradients down before the step, and a
    # step whose gradients overflowed is skipped while the scale comes down (bfloat16 has float32's range: no need)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    if not ckpt:
        return model, optimizer, scaler, 0
    optimizer.load_state_dict(optimizer_state_for(optimizer, ckpt["optimizer"]))
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    train_loader.load_state_dict(ckpt["loader"])
    if ckpt["world_size"] == d.world_size:
        set_rng_state(ckpt["rng"][d.rank], d.device)
    else:
        say(f"checkpoint was written by {ckpt['world_size']} ranks, now {d.world_size}: "
            f"the loader continues at the same token, random states start from the seed")
    return model, optimizer, scaler, ckpt["step"]


def shard_model(model, d, dtype=torch.float32, compile_blocks=False):
    """FSDP2: each Block is a unit, and the root the rest (embeddings, ln_f and lm_head: the tied weight is one
    parameter, in one unit). Each rank keeps 1/world_size of every parameter; a unit all-gathers its weights for its
    forward and backward and frees them after, and its gradients are reduce-scattered into shards. With a 16-bit dtype
    the gathered weights and each unit's inputs are cast to it and the gradients reduced in float32 (make_autocast
    then leaves autocast off). compile_blocks: each block's layers are compiled before sharding, as torchtitan does, so
    that FSDP's hooks stay outside the graphs (compiling the root would break its graph at every hook). The shards
    move to d.device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
        MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile_blocks:
            block.compiled = torch.compile(block.layers)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # the root gathers its weights in forward only: HellaSwag's scorer calls hidden_states, then reads lm_head.weight
    register_fsdp_forward_method(model, "hidden_states")
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def clip_gradients(model, max_norm):
    """Scales the gradients down to a global norm of max_norm (0: never); returns the norm before, a plain tensor.
    Under FSDP each rank holds a shard of each gradient and torch sums the squares over the ranks: the same norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


def write_checkpoint(cfg, d, model, optimizer, scaler, train_loader, step, say, spike_guard=None):
    """log_dir/model_SSSSS.pt: the state after `step` optimizer steps. Every rank hands in its random states and rank 0
    writes; the others wait for the write to finish (up to --dist_timeout_min) and stop with rank 0 if it failed. Then
    only the newest keep_checkpoints are kept."""
    rng = [None] * d.world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, rng_state(d.device))
    else:
        rng = [rng_state(d.device)]
    model_state, optimizer_state = full_state_dicts(model, optimizer, d.is_master)  # every rank takes part under FSDP
    error = None
    if d.is_master:
        state = {"model": clean_state_dict(model_state), "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                 "step": step, "config": dataclasses.asdict(cfg), "loader": train_loader.state_dict(),
                 "world_size": d.world_size, "rng": rng}
        if spike_guard is not None:
            state["spike_guard"] = spike_guard  # SpikeGuard.state_dict()
        del model_state, optimizer_state
        path = checkpoint_path(cfg.log_dir, step)
        try:
            save_checkpoint(path, state)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError after the OSError
            cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else e
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
            error = (f"cannot write checkpoint {path} ({reason}): free space in {cfg.log_dir}/ or pass another "
                     f"--log_dir; the checkpoints already there are intact, so --init_from=resume continues from the newest")
        del state
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)  # every rank waits here for rank 0's write
        error = box[0]
    if error:
        raise UserError(error)
    say(f"saved {checkpoint_path(cfg.log_dir, step)}")
    if d.is_master and cfg.keep_checkpoints:
        for _, old in list_checkpoints(cfg.log_dir)[:-cfg.keep_checkpoints]:
            os.remove(old)


class RunLog:
    """Rank 0's record of a run: the console, log_dir/log.txt lines `<step> <kind> <value>` (what plot.py draws),
    log.png redrawn after each evaluation, and Weights & Biases if asked. On the other ranks it does nothing."""

    def __init__(self, cfg, is_master, start_step):
        self.is_master = is_master
        self.file = prepare_log_dir(cfg.log_dir, start_step) if is_master else None
        self.wandb = start_wandb(cfg) if cfg.wandb_log and is_master else None
        self.refresh_plot = make_plotter(self.file, os.path.join(cfg.log_dir, "log.png")) if self.file else (lambda: None)

    def print(self, text):
        if self.is_master:
            print(text)

    def record(self, step, kind, value, text, **metrics):
        """Prints `text` (if any), appends `<step> <kind> <value>` to log.txt and sends metrics (if any) to wandb."""
        if text:
            self.print(text)
        if self.file:
            with open(self.file, "a") as f:
                f.write(f"{step} {kind} {value}\n")
        if self.wandb and metrics:
            self.wandb.log(metrics, step=step)

    def finish(self):
        if self.wandb:
            self.wandb.finish()


def compile_model(model):
    """torch.compile(model), with the chunked loss left out of the graph: it is fused by hand already, and traced its
    in-place steps would become copies. (Marked here rather than where it is defined: torch.compiler.disable imports
    torch._dynamo, over a second that every run without --compile would pay.)"""
    model.chunked_loss = torch.compiler.disable(model.chunked_loss)
    return torch.compile(model)


def wrap_model(cfg, raw_model, d):
    """The model that training steps call: torch.compile'd if asked (fixed shapes; validation, sampling and HellaSwag
    run raw_model; under FSDP shard_model compiled each block instead), and inside DDP when several ranks hold whole
    copies (not under FSDP, sharded already).
    DDP's gradients are views into its all-reduce buckets, rather than a second copy of them all."""
    sharded = is_sharded(raw_model)
    model = compile_model(raw_model) if cfg.compile and not sharded else raw_model  # FSDP: its blocks are compiled
    if dist.is_initialized() and not sharded:
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    return model


@dataclass
class StepParts:
    """What a training step works with, made once by run_training."""
    model: nn.Module  # what the step calls: raw_model, compiled and/or inside DDP (wrap_model)
    raw_model: nn.Module  # the GPT itself (sharded under FSDP): the clip and the checkpoints use it
    optimizer: object
    scaler: torch.amp.GradScaler
    loader: DataLoaderLite
    autocast: object  # a function giving the step's autocast context (make_autocast)
    grad_accum: int  # micro-steps per optimizer step
    flops_per_token: float
    peak: float  # the device's peak FLOP/s (0: unknown), for MFU
    stop: StopRequest  # SIGTERM/SIGUSR1 received: the ranks agree to stop after this step (train_step)
    progress: Progress  # steps done of max_steps, elapsed and ETA, for the step's line


def forward_backward(parts, d):
    """The micro-steps of one optimizer step: each reads the loader's next micro batch and adds its gradients.
    Returns this rank's mean loss over them (a tensor on d.device), or None when the step must run again at a smaller
    micro batch.

    An out-of-memory error is taken back only where no collective can be in flight: with one process anywhere; under
    DDP in any forward and in the backward of a no_sync micro-step. The DDP ranks learn of it in one small all-reduce
    per step, before the last micro-step's backward (a rank that failed earlier skips its micro-steps until then), and
    all return None. Where a collective may be in flight (DDP's last backward, where the gradients are all-reduced;
    every FSDP forward and backward, with their gathers and reduce-scatters) it is raised as OutOfMemoryInCollective:
    this rank must enter no further collective, and train_step leaves (faults.leave_after_oom)."""
    ddp = isinstance(parts.model, nn.parallel.DistributedDataParallel)
    alone = d.world_size == 1
    loss_accum = torch.zeros((), device=d.device)
    failed = False
    for micro_step in range(parts.grad_accum):
        x, y = to_device(parts.loader.next_batch(), d.device)
        # DDP all-reduces gradients only in the last micro-step's backward; FSDP reduce-scatters in each (docs/scaling.md)
        is_last_micro = micro_step == parts.grad_accum - 1
        with parts.model.no_sync() if ddp and not is_last_micro else nullcontext():
            if not failed:
                try:
                    with parts.autocast():
                        _, loss = parts.model(x, y)
                except torch.OutOfMemoryError as e:
                    if not (alone or ddp):
                        raise OutOfMemoryInCollective("forward pass", parts.loader.B) from e
                    failed = True
            if failed and alone:
                return None
            if ddp and is_last_micro and any_rank(failed, d):
                return None
            if failed:
                continue  # DDP: no collective before the last micro-step, where every rank learns of it
            loss = loss / parts.grad_accum  # the gradient of the mean over the whole batch
            loss_accum += loss.detach()
            try:
                parts.scaler.scale(loss).backward()  # float16: scaled up so that small gradients stay in its range
            except torch.OutOfMemoryError as e:
                if not (alone or ddp and not is_last_micro):
                    raise OutOfMemoryInCollective("backward pass", parts.loader.B) from e
                failed = True
                if alone:
                    return None
            del loss
    return loss_accum


def any_rank(flag, d):
    """True on every rank when flag is True on any (one small all-reduce with several ranks)."""
    if d.world_size == 1:
        return flag
    flag = torch.tensor(float(flag), device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def halve_micro_batch(cfg, d, parts, step, say):
    """After an out-of-memory micro-step that forward_backward took back: the step's gradients are dropped, the loader
    is set back to where the step began and reads micro batches of about half the size (the largest that divides the
    step), in twice the micro-steps: the step's tokens stay the same. cfg.micro_batch_size follows, so a checkpoint
    records it."""
    parts.optimizer.zero_grad(set_to_none=True)
    if isinstance(parts.model, nn.parallel.DistributedDataParallel):
        # the ranks whose forward ran had DDP expect its backward, which never came: DDP's own reset (as its
        # _update_process_group does), or the next backward would all-reduce on those ranks only
        parts.model.reducer._reset_state()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    per_rank = parts.loader.B * parts.grad_accum
    smaller = smaller_micro_batch(per_rank, parts.loader.B)
    if smaller is None:
        raise UserError(f"step {step}: out of memory with micro_batch_size=1; the last checkpoint in {cfg.log_dir}/ is "
                        f"intact: resume with {LESS_MEMORY}")
    say(f"step {step:6d} | out of memory at micro_batch_size={parts.loader.B}: the step again with {smaller} "
        f"({per_rank // smaller} micro-steps), as every later step")
    parts.loader.B, parts.grad_accum = smaller, per_rank // smaller
    cfg.micro_batch_size = smaller


def train_step(cfg, d, parts, step, run_log):
    """One optimizer step at `step`: the micro-steps, the gradient clip, the scheduled learning rate, the update
    (skipped by float16's GradScaler on overflow, or by --skip_nonfinite) and the step's line in the log.
    Returns (the step's loss, the mean over every rank; whether any rank was asked to stop), the same on every rank:
    the stop request rides on the all-reduce of the loss, which the step makes anyway."""
    device, optimizer, scaler = d.device, parts.optimizer, parts.scaler
    t0 = time.time()
    start = parts.loader.state_dict()
    optimizer.zero_grad(set_to_none=True)
    try:
        while (loss_accum := forward_backward(parts, d)) is None:
            halve_micro_batch(cfg, d, parts, step, run_log.print)
            parts.loader.load_state_dict(start)
    except OutOfMemoryInCollective as e:
        leave_after_oom(cfg.log_dir, e, {"step": step, "rank": d.rank, "settings": memory_fingerprint(cfg, d.world_size)},
                        parts.loader.B * parts.grad_accum, resumes=cfg.init_from == "resume")
    stop = loss_accum.new_full((), float(parts.stop.requested))  # filled on the device: no copy, no wait for it
    loss_accum, stop = all_reduce_sum(torch.stack([loss_accum / d.world_size, stop]))
    scaler.unscale_(optimizer)  # the true gradients again, for the norm and the clip
    norm = clip_gradients(parts.raw_model, cfg.grad_clip)
    lr = get_lr(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1)  # Muon's groups: muon_lr / max_lr
    lrs = "/".join(dict.fromkeys(f"{group['lr']:.4e}" for group in optimizer.param_groups))  # AdamW's[/Muon's]
    loss_value, norm_value, stop = torch.stack([loss_accum, norm.float(), stop]).tolist()  # one host sync
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    # float16 gradients that overflowed the scale: the scaler skips this step and halves the scale (not a failure)
    overflow = scaler.is_enabled() and math.isfinite(loss_value) and not finite
    if finite or overflow:
        scaler.step(optimizer)  # optimizer.step(), unless the gradients overflowed
    elif not (cfg.skip_nonfinite or cfg.spike_guard):  # the guard rolls back instead
        raise UserError(f"step {step}: loss {loss_value}, grad norm {norm_value}; stopped, and the last checkpoint "
                        f"in {cfg.log_dir}/ is intact: resume with a lower --max_lr, or pass --skip_nonfinite=1")
    scaler.update()
    synchronize(device)
    dt = time.time() - t0
    parts.progress.update(step + 1, seconds=dt)
    tokens_per_sec = cfg.total_batch_size / dt
    mfu = f"{100 * parts.flops_per_token * tokens_per_sec / (parts.peak * d.world_size):5.1f}%" if parts.peak else "    -"
    mem = f" | mem {torch.cuda.max_memory_allocated(device) / 1e9:5.1f}GB (reserved " \
          f"{torch.cuda.max_memory_reserved(device) / 1e9:.1f})" if device.type == "cuda" else ""
    if finite or overflow:
        skipped = f" | gradients overflowed float16: step skipped, loss scale now {scaler.get_scale():g}" if overflow else ""
        run_log.record(step, "train", f"{loss_value:.6f}", f"step {step:6d}/{cfg.max_steps} "
                       f"({100 * (step + 1) / cfg.max_steps:.1f}%) | loss {loss_value:.6f} | lr {lrs} | norm "
                       f"{norm_value:7.4f} | dt {1000 * dt:8.2f}ms | tok/s {tokens_per_sec:10.0f} | mfu {mfu}{mem} | "
                       f"{parts.progress.times()}{skipped}",
                       **{"train/loss": loss_value, "lr": lr, "grad_norm": norm_value, "tokens_per_sec": tokens_per_sec})
    else:
        why = "--spike_guard=1 rolls back" if cfg.spike_guard else "--skip_nonfinite=1"
        run_log.print(f"step {step:6d} | loss {loss_value} | non-finite, step skipped ({why})")
    return loss_value, stop > 0


class Evals(NamedTuple):
    """What the run evaluates with, None where its setting is 0."""
    val_loader: object  # ValLoader
    hellaswag: list  # HellaSwagExample items
    enc: object  # the tokenizer, for the samples (under DDP on rank 0 only)


def evaluate_when_due(cfg, d, raw_model, evals, autocast, run_log, step, last):
    """Before the step `step` (and after the last): validation loss, HellaSwag and samples, each when due."""
    evaluated = False
    if evals.val_loader and is_due(cfg.val_every, step, last):
        val_loss, val_bpb = evaluate_loss(raw_model, evals.val_loader, d.device, autocast)
        run_log.record(step, "val", f"{val_loss:.6f}", f"step {step:6d} | val loss {val_loss:.4f} | bpb {val_bpb:.4f}",
                       **{"val/loss": val_loss, "val/bpb": val_bpb})
        run_log.record(step, "bpb", f"{val_bpb:.6f}", None)
        evaluated = True
    if evals.hellaswag and is_due(cfg.hellaswag_every, step, last):
        result = evaluate_hellaswag(raw_model, evals.hellaswag, d.device, autocast=autocast, rank=d.rank,
                                    world_size=d.world_size)
        run_log.record(step, "hella", f"{result['acc_norm']:.4f}", f"step {step:6d} | hellaswag acc_norm "
                       f"{result['acc_norm']:.4f} ({result['n']} examples)", **{"hellaswag/acc_norm": result["acc_norm"]})
        evaluated = True
    if evaluated:
        run_log.refresh_plot()
    if evals.enc and is_due(cfg.sample_every, step, last):
        print_samples(raw_model, evals.enc, d.device, autocast, cfg, is_master=d.is_master)


# --- the spike guard: roll back past a loss spike and skip its data ---


def spike_test(losses, above, loss, cfg):
    """The spike test of one step's loss, given `losses`, the window of the last spike_window kept losses, and `above`,
    how many steps just before this one were above its bound. Returns (verdict, why): "ok" (the loss joins the window),
    "above" (above the bound: wait, a blip that the next steps recover from is no spike) or "spike".

    The bound is the window's median plus the larger of spike_k median absolute deviations and spike_min_rise nats: the
    median and the MAD are robust, one odd step in the window moves neither as it would a mean and a standard deviation.
    Until the window is full (the loss still falling fast) only a NaN/inf loss is a spike."""
    bound = median = mad = math.inf
    if len(losses) >= cfg.spike_window:
        median = float(np.median(losses))
        mad = float(np.median(np.abs(np.asarray(losses) - median)))
        bound = median + max(cfg.spike_k * mad, cfg.spike_min_rise)
    if math.isfinite(loss) and loss <= bound:
        return "ok", ""
    if not math.isfinite(loss):
        return "spike", "not finite"
    why = f"above {bound:.4f} = median {median:.4f} + max({cfg.spike_k:g} x MAD {mad:.4f}, {cfg.spike_min_rise:g})"
    return ("above" if above + 1 < cfg.spike_patience else "spike"), why


HOST_ALIGN = 64  # bytes: each host copy starts on a cache line of its own


def host_copies(tensors, pin):
    """(buffer, copies, pinned): one flat host buffer of uint8 sized to the tensors' bytes, and for each tensor an
    uninitialised copy of its shape and dtype that is a view into the buffer, starting on a HOST_ALIGN-byte boundary.

    pin (for tensors on a CUDA GPU) page-locks the buffer, so that copies to and from the GPU run at the bus's speed;
    pinned says whether it is. Not with pin_memory=True: torch's pinned allocator (CachingHostAllocator) rounds each
    request up to a power of two, so the copies would take up to twice the state's bytes. Here the driver locks the
    buffer once, at its own size (page_lock)."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(-(-end // HOST_ALIGN) * HOST_ALIGN)
        end = offsets[-1] + t.numel() * t.element_size()
    raw = np.empty(end + HOST_ALIGN, dtype=np.uint8)  # numpy's, so that page_lock can tell when its memory is freed
    skip = -raw.ctypes.data % HOST_ALIGN
    buffer = torch.from_numpy(raw)[skip:skip + end]  # (end,); it and each view hold raw
    copies = [buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
              for o, t in zip(offsets, tensors, strict=True)]
    return buffer, copies, bool(pin and end and page_lock(raw, buffer))


def page_lock(raw, buffer):
    """Page-locks buffer's memory (which the numpy array raw holds) with the CUDA driver, once, at its own size:
    cudaHostRegister as torch.cuda._pin_memory_utils calls it, 0 being success; and unlocks it (cudaHostUnregister)
    just before raw's memory is freed, when the last view of it goes. True if locked; False, with a warning, where the
    driver refuses (ulimit -l, say): the memory stays pageable and the copies run slower."""
    try:
        cudart = torch.cuda.cudart()
        code = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0))
        why = f"cudaHostRegister returned error {code}" if code else ""
    except (AssertionError, AttributeError, RuntimeError) as e:  # torch without CUDA
        why = f"{type(e).__name__}: {e}"
    if why:
        print(f"warning: cannot page-lock {buffer.nbytes / 1e9:.2f} GB of host memory ({why}); it stays pageable, and "
              f"copies between it and the GPU are slower")
        return False
    weakref.finalize(raw, cudart.cudaHostUnregister, buffer.data_ptr()).atexit = False  # at exit the driver frees all
    return True


class SpikeGuard:
    """PaLM's answer to loss spikes (Chowdhery et al. 2022, section 5.1): go back to a state from before the spike and
    skip the data it was trained on, "roughly 200-500 data batches, which cover the batches that were seen before and
    during the spike". --spike_guard=1 does it on its own, on every rank.

    The flow: run_training calls check(step, loss) after each step, with the step's loss (the mean over the ranks, so
    every rank decides alike). spike_test says whether it is a spike: a NaN/inf loss, or spike_patience steps in a row
    above a robust bound on the last spike_window losses. A loss below the bound joins the window and, before a step
    that is a multiple of spike_snapshot_every or a checkpoint's (and at the start), the state is copied to host
    memory: the parameters and the optimizer's state (this rank's shards under FSDP), the GradScaler, the RNG states,
    the loader's position and the loss window. On a spike the copy is put back in place, the loader skips from the
    copy's position to spike_skip_steps steps' worth past the spike's batches, and check returns the copy's step, from
    which the run goes on. No copy is made while steps are above the bound, and a checkpoint due then ends the wait
    as a spike, so a checkpoint is always a copy and a rollback never goes back past one: a run killed after a
    rollback resumes from a checkpoint that holds the skipped range, or from one before the spike, where it meets
    the same spike and makes the same rollback.
    """

    def __init__(self, cfg, d, parts, start_step, run_log, state=None):
        self.cfg, self.d, self.parts, self.run_log = cfg, d, parts, run_log
        state = state or {}  # a checkpoint's: the window, and the steps that rolled back (spike_max_rollbacks)
        self.losses = [float(x) for x in state.get("losses", [])]
        self.rollbacks = [int(s) for s in state.get("rollbacks", [])]
        self.above = []  # the steps just before, in a row, whose losses were above the bound
        margin = cfg.spike_skip_steps * cfg.total_batch_size
        if margin > parts.loader.total:
            raise UserError(f"--spike_skip_steps={cfg.spike_skip_steps} skips {margin:,} tokens past a spike, more than the "
                            f"train split's {parts.loader.total:,}: pass a smaller one, at most --spike_skip_steps="
                            f"{parts.loader.total // cfg.total_batch_size}")
        self.saved = None
        self.snapshot(start_step)
        run_log.print(f"spike guard: the state is copied to host memory every {cfg.spike_snapshot_every} steps and at "
                      f"checkpoints: {self.held}")

    def state_dict(self):
        return {"losses": list(self.losses), "rollbacks": list(self.rollbacks)}

    def check(self, step, loss):
        """After step `step`, whose loss was `loss`: None, or after a spike the step that the run rolled back to."""
        cfg = self.cfg
        verdict, why = spike_test(self.losses, len(self.above), loss, cfg)
        checkpoint = is_due(cfg.checkpoint_every, step + 1, step + 1 == cfg.max_steps)  # run_training's condition
        if verdict == "ok":
            self.above = []
            self.losses = (self.losses + [loss])[-cfg.spike_window:]
            if (step + 1) % cfg.spike_snapshot_every == 0 or checkpoint:
                self.snapshot(step + 1)
            return None
        self.above.append(step)
        if verdict == "above" and not checkpoint:
            return None
        recent = [s for s in self.rollbacks if abs(step - s) < cfg.spike_rollback_window]
        steps = f"steps {self.above[0]}-{step}" if len(self.above) > 1 else f"step {step}"
        if len(recent) >= cfg.spike_max_rollbacks:
            raise UserError(f"{steps}: loss {loss:.4f} {why}, a spike after {len(recent)} rollbacks within "
                            f"{cfg.spike_rollback_window} steps (--spike_max_rollbacks={cfg.spike_max_rollbacks}): the run "
                            f"is diverging, not meeting bad data; stopped, and the last checkpoint in {cfg.log_dir}/ is "
                            f"intact: resume from it with a lower --max_lr")
        back, skip = self.saved["step"], [self.saved["position"], self.parts.loader.position + cfg.spike_skip_steps *
                                          cfg.total_batch_size]
        self.restore()
        self.parts.loader.skipped.append(skip)
        self.rollbacks.append(step)
        self.above = []
        self.run_log.record(step, "rollback", back, f"{steps:>11} | loss {loss:.6f} {why} | rolled back {step + 1 - back} "
                            f"steps to step {back}, skipping train tokens {skip[0]}-{skip[1]} ({skip[1] - skip[0]:,}) | "
                            f"rollback {len(self.rollbacks)}, {len(recent) + 1} within {cfg.spike_rollback_window} steps")
        return back

    def tensors(self):
        """The state's tensors, this rank's own part of each, in a fixed order: the parameters, then the optimizer's
        state (which is all tensors for AdamW and Muon), live: writing them writes the state. And the optimizer's keys."""
        state = self.parts.optimizer.state_dict()["state"]  # torch's keeps the live tensors; so does MuonAdamW's
        keys = [(i, k) for i in sorted(state) for k in sorted(state[i])]
        live = [*self.parts.raw_model.parameters(), *(state[i][k] for i, k in keys)]
        return [t.detach().to_local() if is_dtensor(t) else t.detach() for t in live], keys

    @torch.no_grad()
    def snapshot(self, step):
        live, keys = self.tensors()
        copies = self.saved["tensors"] if self.saved else []
        if [(c.shape, c.dtype) for c in copies] != [(t.shape, t.dtype) for t in live]:  # else reuse the memory
            first = self.saved is None
            self.saved = self.buffer = copies = None  # the old copy is freed before the new one is made
            self.buffer, copies, pinned = host_copies(live, pin=self.d.device.type == "cuda")
            what = "and the optimizer's state" if keys else "(the optimizer's state joins them at the next copy)"
            self.held = (f"{self.buffer.nbytes / 1e9:.2f} GB of host memory per rank "
                         f"({'page-locked' if pinned else 'pageable'}) for the parameters {what}")
            if not first:  # the optimizer's state has come
                self.run_log.print(f"spike guard: the copy now takes {self.held}")
        for copy, t in zip(copies, live, strict=True):
            copy.copy_(t, non_blocking=True)
        synchronize(self.d.device)
        self.saved = {"step": step, "tensors": copies, "keys": keys, "scaler": self.parts.scaler.state_dict(),
                      "rng": rng_state(self.d.device), "position": self.parts.loader.position, "losses": list(self.losses)}

    @torch.no_grad()
    def restore(self):
        saved, optimizer = self.saved, self.parts.optimizer
        if not saved["keys"]:  # copied before the first step: no optimizer state yet
            optimizer.load_state_dict({"state": {}, "param_groups": optimizer.state_dict()["param_groups"]})
        live, keys = self.tensors()
        assert keys == saved["keys"], "the optimizer's state changed its layout since the snapshot"
        for t, copy in zip(live, saved["tensors"], strict=True):
            t.copy_(copy, non_blocking=True)
        synchronize(self.d.device)
        if self.parts.scaler.is_enabled():
            self.parts.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"], self.d.device)
        self.parts.loader.position = saved["position"]
        self.losses = list(saved["losses"])


def run_training(cfg, overridden, d, stop):
    """Trains from cfg.init_from until max_steps on every rank of d (a Dist; rank 0 prints and writes).

    Each optimizer step reads total_batch_size tokens, split over the ranks and grad_accum micro-steps of
    micro_batch_size x block_size, and takes one optimizer step with the scheduled learning rate. Before a step, when due:
    validation loss, HellaSwag and samples; after it, when due, a checkpoint. When a rank has received a stop signal
    (`stop`, a faults.StopRequest), every rank stops after the same step with a checkpoint: Preempted.
    """
    say = print if d.is_master else (lambda *args, **kwargs: None)
    cfg, ckpt, hf_model = starting_point(cfg, overridden, d, say)
    say("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = d.device
    sharded = cfg.fsdp and dist.is_initialized()
    autocast, dtype = make_autocast(cfg.dtype, device, fsdp_casts=sharded)
    if dtype == torch.float16 and sharded:
        raise UserError("--dtype=auto picked float16 (this GPU has no native bfloat16), which FSDP cannot train with: its "
                        "GradScaler would check only this rank's shard for overflows; pass --dtype=float32 or --fsdp=0")
    cfg = resolve_micro_batch(cfg, d, dtype, say)
    B, T = cfg.micro_batch_size, cfg.block_size
    grad_accum = grad_accum_steps(cfg, d.world_size)
    train_loader = DataLoaderLite(cfg.data_dir, "train", B, T, d.rank, d.world_size, cfg.vocab_size, cfg.shuffle, cfg.seed)
    evals = Evals(open_val_loader(cfg, d, say) if cfg.val_every else None,
                  load_hellaswag("val", cfg.hellaswag_file or None, is_master=d.is_master) if cfg.hellaswag_every else None,
                  get_tokenizer() if cfg.sample_every and (d.is_master or cfg.fsdp) else None)  # FSDP: every rank samples
    train_loader.skipped = token_ranges(cfg.skip_tokens)  # a checkpoint's ranges join them in build_model
    raw_model, optimizer, scaler, start_step = build_model(cfg, d, ckpt, hf_model, train_loader, say, dtype)
    spike_state = ckpt.get("spike_guard") if ckpt else None
    del ckpt, hf_model  # the model holds the weights now
    parts = StepParts(wrap_model(cfg, raw_model, d), raw_model, optimizer, scaler, train_loader, autocast, grad_accum,
                      raw_model.flops_per_token(T), peak_flops(device), stop, Progress(cfg.max_steps, done=start_step))
    run_log = RunLog(cfg, d.is_master, start_step)
    say(f"{raw_model.num_params():,} parameters | {grad_accum} micro-steps of {B}x{T} x {d.world_size} ranks "
        f"= {cfg.total_batch_size:,} tokens per step | {device} | {str(dtype).removeprefix('torch.')}"
        f"{' (FSDP mixed precision)' if sharded and dtype != torch.float32 else ''}"
        f"{' with a GradScaler' if scaler.is_enabled() else ''}")
    say(describe_memory(estimate_memory(cfg, d.world_size, dtype, raw_model.loss_impl), cfg.activation_checkpointing))

    guard = SpikeGuard(cfg, d, parts, start_step, run_log, spike_state) if cfg.spike_guard else None

    step = start_step
    while True:
        last = step == cfg.max_steps
        evaluate_when_due(cfg, d, raw_model, evals, autocast, run_log, step, last)
        if last:
            break

        loss, stopping = train_step(cfg, d, parts, step, run_log)
        if guard and (back := guard.check(step, loss)) is not None:
            step = back  # a spike: the state of step `back` is back, and the data from there to past the spike skipped
            continue
        if stopping or is_due(cfg.checkpoint_every, step + 1, step + 1 == cfg.max_steps):
            write_checkpoint(cfg, d, raw_model, optimizer, scaler, train_loader, step + 1, say,
                             guard.state_dict() if guard else None)
        if stopping:
            run_log.finish()
            raise Preempted(f"{' then '.join(stop.received) or 'a stop signal on another rank'} received: stopped "
                            f"after step {step} of {cfg.max_steps} with {checkpoint_path(cfg.log_dir, step + 1)} "
                            f"written; continue with --init_from=resume (the same command otherwise)", d.is_master)
        step += 1
    run_log.finish()


# --- evaluation and sampling ---


def open_val_loader(cfg, d, say):
    loader = ValLoader(cfg.data_dir, cfg.val_tokens, cfg.micro_batch_size, cfg.block_size, d.rank, d.world_size,
                       cfg.vocab_size)
    if loader.n_tokens < cfg.val_tokens:
        say(f"the val split holds {loader.total:,} tokens, fewer than val_tokens={cfg.val_tokens:,}: "
            f"validation reads all of it once, {loader.n_tokens:,} targets")
    return loader


@functools.cache
def token_bytes(vocab_size):
    """(vocab_size,) int64: how many UTF-8 bytes each token id stands for in GPT-2's tokenizer; 0 for <|endoftext|> and
    for the padding ids past the tokenizer's vocabulary, which stand for no text. Built once per process."""
    enc = get_tokenizer()
    lengths = [len(enc.decode_single_token_bytes(i)) if i < enc.n_vocab and i != enc.eot_token else 0
               for i in range(vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def evaluate_loss(model, loader, device, autocast):
    """(loss, bpb) over all ranks' batches of a ValLoader, each summed in float64 on every rank and all-reduced, so
    neither depends on how the tokens were split.

    loss: the mean loss per target token, in nats. bpb, bits per byte as nanochat defines it: over the targets that are
    not <|endoftext|>, the summed loss divided by ln 2 times the UTF-8 bytes of those targets. A loss per token depends
    on how much text a token holds; bits per byte does not, so runs with other tokenizers compare.

    The per-token losses come from the final hidden states, a chunk of rows at a time (as HellaSwag's scorer): one
    forward pass gives both numbers and the (tokens x vocabulary) logits are never held at once.
    """
    nbytes = token_bytes(model.config.vocab_size).to(device)
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, targets, loss sum over text tokens, bytes
    keep = {}  # log_softmax_chunks' buffer, from batch to batch
    for x, y in loader.batches():
        x, y = x.to(device), y.flatten().to(device)  # y (B*T,): -1 where padded
        with autocast():
            h = model.hidden_states(x).flatten(0, 1)  # (B*T, C)
            losses = torch.cat([-logp.gather(1, y[rows, None].clamp(min=0))[:, 0]
                                for rows, logp, _ in log_softmax_chunks(h, model.lm_head.weight, keep)]).double()  # (B*T,)
        counted = (y >= 0).double()  # a batch of padding only still runs, so that every rank joins every forward pass
        text = nbytes[y.clamp(min=0)].double() * counted  # (B*T,) bytes of each target, 0 for <|endoftext|> and padding
        totals += torch.stack([(losses * counted).sum(), counted.sum(), (losses * (text > 0)).sum(), text.sum()])
    all_reduce_sum(totals)
    loss_sum, count, text_loss_sum, byte_count = totals.tolist()
    return loss_sum / count, text_loss_sum / (math.log(2) * byte_count) if byte_count else float("nan")


# HellaSwag: pick the most likely of 4 endings for a context. build-nanogpt's recipe: the context tokens, then each
# ending encoded as " " + ending; the model's cross-entropy on the ending tokens; acc picks the ending with the
# lowest summed loss, acc_norm the lowest mean loss per token (the number GPT-3's paper and build-nanogpt report).
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"  # the authors' copy, as build-nanogpt uses


class HellaSwagExample(NamedTuple):
    context: list  # token ids of ctx
    endings: list  # 4 lists of token ids, each encoding " " + ending
    label: int  # index of the true ending


def hellaswag_cache_dir():
    return os.environ.get("HELLASWAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-fineweb", "hellaswag")


def download_hellaswag(split, cache_dir, url=HELLASWAG_URL, is_master=True, setting="--hellaswag_file"):
    """The path of hellaswag_{split}.jsonl in cache_dir, downloaded first if it is not there yet.

    Every rank may call this at once: each writes its own temporary file and renames it into
    place, so a reader sees either no file or a complete one. `setting` is the calling command's own name for a local
    copy (hellaswag.py's --data_file, gpt2.py's and evaluate.py's --hellaswag_file), which its errors tell the user to pass.
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
        raise UserError(f"cannot download {source} ({reason}): pass {setting}=PATH with a local copy of "
                        f"hellaswag_{split}.jsonl") from None
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
        where = "set HELLASWAG_CACHE to" if cache_dir == hellaswag_cache_dir() else f"make {cache_dir}/"
        raise UserError(f"cannot write {path} ({e.strerror}): {where} a writable directory, or pass {setting}=PATH "
                        f"with a local copy of hellaswag_{split}.jsonl") from None
    return path


def check_hellaswag_row(row):
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


def read_hellaswag_jsonl(path, fix):
    """The examples of a HellaSwag jsonl file as dicts; a bad line is a UserError naming it, ending with `fix`."""
    rows = []
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line number too
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                check_hellaswag_row(row)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                problem = str(e).splitlines()[0]
                raise UserError(f"{path} line {number} is not a HellaSwag example ({problem}): {fix}") from None
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no examples: {fix}")
    return rows


def render_example(row, enc):
    """One example as tokens: the context, and each ending with the space that joins it to the context."""
    context = enc.encode_ordinary(row["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in row["endings"]]
    return HellaSwagExample(context, endings, int(row["label"]))


def load_hellaswag(split="val", data_file=None, *, is_master=True, cache_dir=None, url=HELLASWAG_URL, limit=0,
                   setting="--hellaswag_file"):
    """The examples of one split as token ids: read from data_file if given, else from the download cache. `setting`
    names data_file as the calling command spells it, for its errors (see download_hellaswag)."""
    if data_file:
        if not os.path.isfile(data_file):
            raise UserError(f"{setting}={data_file} does not exist: pass the path of a local hellaswag_{split}.jsonl, "
                            f"or leave {setting} empty to download the split")
        path, fix = data_file, "fix that line, or pass a file in HellaSwag's jsonl schema"
    else:
        if split not in ("val", "train"):
            raise UserError(f"--split={split}: expected val or train")
        path = download_hellaswag(split, cache_dir or hellaswag_cache_dir(), url, is_master, setting)
        fix = f"delete {path} to download it again"
    rows = read_hellaswag_jsonl(path, fix)
    if limit > 0:
        rows = rows[:limit]
    enc = get_tokenizer()
    return [render_example(row, enc) for row in rows]


def fit_example(example, block_size):
    """The context and endings cut to fit block_size positions: endings to block_size tokens, then the context from
    the left. An ending's last token is only predicted, never read, so context + ending takes one position less than
    its length, and at least one context token is kept to predict the first. GPT-2's 1024 fits them all."""
    endings = [e[:block_size] for e in example.endings]
    keep = block_size + 1 - max(len(e) for e in endings)
    return example.context[-keep:], endings


def pack_examples(examples, block_size, device):
    """One row per example, the context once and then its 4 endings, each ending seeing only the
    context and itself (positions restart after the context for each). Shares the context's work
    4 ways; the scores equal those of 4 separate rows context + ending.

    Returns idx, pos (B, T); mask (B, 1, T, T), True where a token may attend; and for each ending
    token: the flat row*T + position whose output predicts it, the token, and its (example, ending)
    index ex*4 + i.
    """
    fitted = [fit_example(example, block_size) for example in examples]
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
def score_endings(model, examples, device, autocast=nullcontext, batch_size=16, progress=False):
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
            idx, pos, mask, sources, targets, owners = pack_examples(batch, model.config.block_size, device)
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


def evaluate_hellaswag(model, examples, device, autocast=nullcontext, rank=0, world_size=1, batch_size=16, progress=False):
    """acc and acc_norm over all examples: rank r scores examples r, r + world_size, ...; the counts
    are summed over ranks, so any number of ranks gives the numbers of one. Every rank scores as many examples
    (a rank with one fewer repeats its first and drops the result), so all run the same forwards, as FSDP needs."""
    mine = examples[rank::world_size]
    share = -(-len(examples) // world_size)  # ceil
    sums, counts = score_endings(model, mine + examples[:1] * (share - len(mine)), device, autocast, batch_size, progress)
    sums, counts = sums[:len(mine)], counts[:len(mine)]
    labels = torch.tensor([ex.label for ex in mine], dtype=torch.long)
    totals = torch.tensor([len(mine),
                           (sums.argmin(1) == labels).sum().item(),  # lowest total loss
                           ((sums / counts).argmin(1) == labels).sum().item()],  # lowest loss per token
                          dtype=torch.long, device=device)
    n, correct, correct_norm = all_reduce_sum(totals).tolist()
    return {"n": n, "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}


@torch.no_grad()
def generate(model, prompt, num_samples, max_new_tokens, *, top_k=50, temperature=1.0,
             generator=None, vocab_limit=None, use_cache=True, autocast=nullcontext, stop=None):
    """Samples num_samples continuations of the token list `prompt`.

    Returns (tokens, logprobs): the new tokens (num_samples, max_new_tokens) and the
    log-probability of each under the temperature-scaled distribution over the whole
    vocabulary (before the top-k cut). top_k=1 is greedy: the argmax, as transformers'
    do_sample=False. `vocab_limit` keeps the padded vocabulary rows (ids >= it) from ever
    being sampled. With use_cache, each new token costs one position's forward pass; without,
    the whole sequence is recomputed every step (the same tokens, much slower). `stop`, for one sample: a function of
    the list of new tokens that ends generation early when it returns True (a stop sequence has appeared).
    """
    device = next(model.parameters()).device
    if not prompt:
        raise ValueError("empty prompt: give at least one token (GPT-2 starts unconditional text with <|endoftext|>)")
    if len(prompt) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {len(prompt)} + {max_new_tokens} new tokens exceeds block_size={model.config.block_size}")
    idx = torch.tensor(prompt, dtype=torch.long, device=device).repeat(num_samples, 1)  # (N, T0)
    cache = KVCache(model.config, num_samples, len(prompt) + max_new_tokens) if use_cache else None
    new_tokens, logprobs = [], []
    step_input = idx
    for _ in range(max_new_tokens):
        with autocast():
            logits, _ = model(step_input if use_cache else idx, kv_cache=cache, last_only=True)
        logits = logits[:, -1, :vocab_limit].float() / max(temperature, 1e-8)  # (N, V)
        log_probs = F.log_softmax(logits, dim=-1)
        if top_k == 1:
            token = log_probs.argmax(dim=-1, keepdim=True)  # (N, 1); no random draw, ties go to the lowest id
        else:
            top_logp, top_ids = torch.topk(log_probs, min(top_k, log_probs.size(-1)), dim=-1)  # (N, k)
            choice = torch.multinomial(top_logp.exp(), 1, generator=generator)  # (N, 1)
            token = torch.gather(top_ids, -1, choice)  # (N, 1)
        new_tokens.append(token)
        logprobs.append(torch.gather(log_probs, -1, token))
        if stop is not None and stop(torch.cat(new_tokens, dim=1)[0].tolist()):
            break
        idx = torch.cat((idx, token), dim=1)
        step_input = token
    return torch.cat(new_tokens, dim=1), torch.cat(logprobs, dim=1)


def print_samples(model, enc, device, autocast, cfg, is_master=True):
    """Prints cfg.num_samples samples of cfg.prompt, seeded with cfg.seed so they can be compared across steps.
    Under FSDP every rank calls it (each forward needs them all): the same seed gives each the same tokens, and
    only is_master prints.

    The training loop's periodic samples and --mode=sample both come from here. Returns one
    record per sample: the prompt, the completion's text and token ids, and the mean
    log-probability and perplexity of the sampled tokens (see generate for which distribution).
    """
    prompt = enc.encode_ordinary(cfg.prompt) or [enc.eot_token]  # GPT-2's unconditional samples start at <|endoftext|>
    room = model.config.block_size - cfg.max_new_tokens
    if room < 1:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for the prompt in the model's block_size="
                        f"{model.config.block_size}: pass --max_new_tokens={model.config.block_size // 2} or less")
    say = print if is_master else (lambda *args: None)
    if len(prompt) > room:
        say(f"warning: the prompt has {len(prompt)} tokens and {cfg.max_new_tokens} new ones must fit in block_size="
            f"{model.config.block_size}: keeping its last {room} tokens")
        prompt = prompt[-room:]
    if max(prompt) >= model.config.vocab_size:
        raise UserError(f"the prompt has token id {max(prompt)} >= the model's vocab_size={model.config.vocab_size}: this "
                        f"model cannot read GPT-2 text (when training it, pass --sample_every=0)")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, logprobs = generate(model, prompt, cfg.num_samples, cfg.max_new_tokens, top_k=cfg.top_k,
                                temperature=cfg.temperature, generator=generator,
                                vocab_limit=min(enc.n_vocab, model.config.vocab_size), autocast=autocast)
    prompt_text = enc.decode(prompt)
    records = []
    for i, (row, row_logprobs) in enumerate(zip(tokens.tolist(), logprobs.tolist(), strict=True)):
        completion = enc.decode(row)
        say(f"sample {i}: {prompt_text + completion!r}")  # repr: one line per sample, whatever the text holds
        mean_logprob = sum(row_logprobs) / len(row_logprobs)
        records.append({"prompt": prompt_text, "completion": completion, "tokens": row,
                        "mean_logprob": mean_logprob, "perplexity": math.exp(-mean_logprob)})
    return records


# --- checkpoints ---


CHECKPOINT_RE = re.compile(r"model_(\d+)\.pt$")


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """The complete checkpoints in log_dir as (step, path), oldest first. Temporary files never match."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), os.path.join(log_dir, n)) for n in os.listdir(log_dir) if (m := CHECKPOINT_RE.fullmatch(n))]
    return sorted(found)


def newest_readable_checkpoint(log_dir, is_master, say):
    """(path, checkpoint) of the newest checkpoint in log_dir that loads, or (None, None) when there is none.

    A newer one that cannot be read (truncated, corrupt, or holding code) is skipped with a warning, and rank 0
    renames it to model_XXXXX.pt.unreadable: kept for a look, and never picked again, so that a torchrun restart loop
    goes on from the one before. When no older checkpoint is left to fall back to, that is an error and nothing is
    renamed: starting over from scratch is for the user to decide.
    """
    found = list_checkpoints(log_dir)
    for i in reversed(range(len(found))):
        path = found[i][1]
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            if i == 0:
                raise
            if is_master:
                os.replace(path, f"{path}.unreadable")
            say(f"warning: skipping {path} (renamed to {os.path.basename(path)}.unreadable): {e}")
    return None, None


def ranks_agree_on(path, d):
    """Stops every rank unless all start from the same checkpoint (the same file name, step and size): ranks that
    each see their own log_dir (node-local disks on several nodes) would otherwise train from different states."""
    if not dist.is_initialized():
        return
    mine = (os.path.basename(path), os.path.getsize(path)) if path else None
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    describe = lambda start: f"{start[0]} ({start[1]:,} bytes)" if start else "no checkpoint"
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise UserError(f"rank 0 starts from {describe(everyone[0])} but rank {rank} from {describe(theirs)}: all "
                            f"ranks must read the same checkpoints, so put --log_dir on a file system that every node shares")


def save_checkpoint(path, state):
    """Writes state to path atomically: a crash leaves either the old file or the complete new one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk: no half-written file left taking the space
        raise
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """Loads a checkpoint on the CPU. weights_only=True: a file that would run code is refused.

    The tensors are mapped from the file (mmap), not read into this process's memory: each is read when it is first
    touched, and the ranks of a node share those pages (the page cache). A resume under FSDP touches only this rank's
    slices, so it costs about the host memory that training does, not a whole copy of the weights and AdamW's moments
    per rank. torch.save's files are zip archives; anything else (which mmap cannot read) is loaded as before, to be
    refused with its own message."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: pass --init_from=scratch, resume, or an existing model_XXXXX.pt")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing a file
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and holds_code(path, e):
            raise UserError(f"refused to load checkpoint {path}: it holds Python objects that could run code, not just "
                            f"tensors and plain data; only load checkpoints written by gpt2.py") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = type(e).__name__ if isinstance(e, pickle.UnpicklingError) or not first else f"{type(e).__name__}: {first}"
        raise UserError(f"cannot load checkpoint {path} ({reason}): it is truncated, corrupt or not one of ours; "
                        f"pass an earlier model_XXXXX.pt or --init_from=scratch") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise UserError(f"cannot load checkpoint {path}: it is not a checkpoint written by gpt2.py (a dict with model, "
                        f"config and step); pass a model_XXXXX.pt or --init_from=scratch")
    return ckpt


def holds_code(path, error):
    """Whether torch refused `path` for a Python global (a callable that would run code on load) rather than for
    being garbage: both are an UnpicklingError. torch names the global for its zip format; a bare pickle is read here
    opcode by opcode, never executed."""
    if zipfile.is_zipfile(path):
        return "unsupported global" in str(error).lower()
    try:
        with open(path, "rb") as f:
            pickletools.dis(f, out=io.StringIO())  # walks the whole pickle checking its stack: garbage fails somewhere
            f.seek(0)
            names = {op.name for op, _, _ in pickletools.genops(f)}
    except Exception:  # not a pickle at all
        return False
    return bool(names & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"})


def clean_state_dict(state_dict):
    """A model state dict without the prefixes torch.compile (_orig_mod.) and DDP (module.) add."""
    return {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in state_dict.items()}


def full_state_dicts(model, optimizer, is_master):
    """(model state dict, optimizer state dict) as one process holds them, on rank 0; (None, None) on the others.

    Under FSDP every parameter and AdamW moment is a DTensor holding this rank's shard: all ranks gather each one in
    turn and only rank 0 keeps it, on the CPU, so its memory holds one full copy of the state and never more. The
    keys, the parameter numbering and the tensors are those of an unsharded run, which loads the result as it is.
    """
    from torch.distributed.tensor import DTensor

    gathered = {}  # by parameter: the tied wte/lm_head weight is gathered and stored once, as without FSDP

    def full(t):
        if not isinstance(t, DTensor):
            return t.detach() if is_master and torch.is_tensor(t) else t
        if id(t) not in gathered:
            whole = t.full_tensor()
            gathered[id(t)] = (t, whole.detach().cpu() if is_master else None)  # t kept alive: its id stays unique
        return gathered[id(t)][1]

    with torch.no_grad():
        model_state = {k: full(v) for k, v in model.state_dict(keep_vars=True).items()}
        opt = optimizer.state_dict()
        opt_state = {i: {k: full(v) for k, v in s.items()} for i, s in opt["state"].items()}
    if not is_master:
        return None, None
    opt = {"state": opt_state, "param_groups": opt["param_groups"]}
    return model_state, optimizer.checkpoint_state(opt) if isinstance(optimizer, MuonAdamW) else opt  # q, k, v apart


def optimizer_state_for(optimizer, state):
    """A checkpoint's optimizer state dict made to fit `optimizer`: each tensor shaped like its parameter is copied
    to the parameter's device; under FSDP (the parameter is a DTensor) only this rank's slice of it is, so each rank
    holds its shard of AdamW's moments and never the whole (the checkpoint's tensors stay in the mapped file)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if isinstance(optimizer, MuonAdamW):
        state = optimizer.own_state(state)  # under FSDP c_attn's momentum is one tensor: q's, k's and v's, stacked in fit

    def fit(v, p):
        if isinstance(v, list):
            v = torch.cat(v)  # one (3C, C) at a time, freed once this rank's slice is copied out
        if not torch.is_tensor(v) or v.shape != p.shape:
            return v  # the step count
        if not is_dtensor(p):
            return v.to(p.device, copy=True)  # a copy even on the CPU: the optimizer owns it, not the mapped file
        return local_slice(v, p)

    return {**state, "state": {i: {k: fit(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}}


def local_slice(whole, like):
    """This rank's part of `whole` (a tensor of DTensor like's global shape, on the CPU) as a DTensor placed as `like`,
    copied to like's device. FSDP2 shards dim 0 over a 1-D mesh in torch.chunk's parts: rank r holds rows
    [r * ceil(n / world), ...), fewer (or none) at the end."""
    from torch.distributed.tensor import DTensor, Shard

    (placement,) = like.placements
    assert isinstance(placement, Shard), f"expected a Shard placement, got {placement}"
    mesh, dim = like.device_mesh, placement.dim
    size = -(-whole.size(dim) // mesh.size())  # ceil
    start = min(mesh.get_local_rank() * size, whole.size(dim))
    part = whole.narrow(dim, start, min(size, whole.size(dim) - start)).to(like.device, copy=True)
    assert part.shape == like.to_local().shape, f"slice {tuple(part.shape)} != shard {tuple(like.to_local().shape)}"
    return DTensor.from_local(part, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def rng_state(device):
    """This process's random states, as tensors and plain numbers (loadable with weights_only=True). On CUDA only this
    rank's own GPU's: a job resumed with fewer GPUs visible to each process (one per task under SLURM) restores it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state, device):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # checkpoints before this one held every visible GPU's state
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def load_model(path, device="cpu"):
    """Our GPT with the weights of checkpoint `path`, or of a Hugging Face GPT-2 (see is_hf_model)."""
    if is_hf_model(path):
        return load_hf_model(path, device)
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**{k: ckpt["config"][k] for k in MODEL_KEYS}))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


# --- Hugging Face interop ---


HF_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four, also as openai-community/NAME
# Hugging Face's GPT-2 stores these four weights as Conv1D (in, out); ours are nn.Linear (out, in)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# tiktoken builds its gpt2 encoding from these two files, which are GPT-2's vocab.json and merges.txt (same bytes);
# the addresses and SHA-256 are those in tiktoken_ext/openai_public.py, so tiktoken's cache serves them offline
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
                "special_tokens_map.json", *GPT2_TOKENIZER_FILES}


def is_hf_model(init_from):
    """True for a hub name of OpenAI's GPT-2 or a directory saved by transformers (it holds config.json)."""
    return init_from.removeprefix("openai-community/") in HF_HUB_NAMES or os.path.isfile(os.path.join(init_from, "config.json"))


def check_model_path(name):
    """A -m that names a local path must be a directory saved by transformers; anything else is a hub name.
    hellaswag.py and evaluate.py call it first, so that a wrong path stops them before any download."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        what = "does not exist" if not os.path.exists(os.path.expanduser(name)) else "holds no config.json"
        raise UserError(f"-m {name}: that directory {what}; pass a directory saved by transformers (save_pretrained, "
                        f"or gpt2.py --mode=export) or a hub name such as gpt2")


def load_hf_model(name_or_dir, device="cpu"):
    """Our GPT with the weights of a Hugging Face GPT-2: a hub name (gpt2, gpt2-xl, ...) or a local directory."""
    from transformers import GPT2LMHeadModel  # heavy, and only needed here

    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)  # copy_ below casts to our float32
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load Hugging Face model {name_or_dir!r} ({str(e).strip().splitlines()[0]}): pass a hub "
                        f"name such as gpt2 (needs the network or the HF cache) or a directory saved by transformers") from None
    c = hf.config
    # our blocks are GPT-2's exactly; a config that changes them would load but compute something else
    unsupported = {"activation_function": (c.activation_function, "gelu_new"), "n_inner": (c.n_inner, None),
                   "layer_norm_epsilon": (c.layer_norm_epsilon, 1e-5), "scale_attn_weights": (c.scale_attn_weights, True),
                   "scale_attn_by_inverse_layer_idx": (c.scale_attn_by_inverse_layer_idx, False),
                   "tie_word_embeddings": (c.tie_word_embeddings, True)}
    for key, (theirs, ours) in unsupported.items():
        if theirs != ours and not (key == "n_inner" and theirs == 4 * c.n_embd):
            raise UserError(f"Hugging Face model {name_or_dir!r} has {key}={theirs!r}; this GPT supports only {ours!r}")
    model = GPT(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                          n_embd=c.n_embd))
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            weight = theirs[name]
            param.copy_(weight.t() if name.endswith(HF_TRANSPOSED) else weight)
    return model.to(device)


def to_hf_model(model):
    """A transformers GPT2LMHeadModel with our model's weights, the vocabulary cut back to GPT-2's 50257 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if c.vocab_size < GPT2_VOCAB:
        raise UserError(f"this model has vocab_size={c.vocab_size} < {GPT2_VOCAB}, GPT-2's tokenizer: it cannot be "
                        f"exported as a GPT-2; train it with the default --vocab_size=50304")
    # no dropout: the model was trained without it, and fine-tuning with transformers should see the same network
    hf_config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=GPT2_VOCAB - 1,
                           eos_token_id=GPT2_VOCAB - 1)
    hf = GPT2LMHeadModel(hf_config)
    ours = clean_state_dict(model.state_dict())
    state = {}
    for name in hf.state_dict():
        weight = ours[name].detach().float().cpu()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            weight = weight[:GPT2_VOCAB]  # the padding rows are never a target, so they carry nothing
        state[name] = weight.t().contiguous() if name.endswith(HF_TRANSPOSED) else weight
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def gpt2_tokenizer_files(model_max_length):
    """{file name: bytes} for GPT-2's tokenizer (as transformers reads it), or None when tiktoken cannot get its files."""
    from tiktoken.load import read_file_cached

    try:
        files = {name: read_file_cached(url, expected_hash) for name, (url, expected_hash) in GPT2_TOKENIZER_FILES.items()}
    except Exception:  # no network and no TIKTOKEN_CACHE_DIR: the weights are still worth writing
        return None
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    files["special_tokens_map.json"] = json.dumps(special, indent=2).encode()
    files["tokenizer_config.json"] = json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                                                 "model_max_length": model_max_length, **special}, indent=2).encode()
    return files


def export_hf(model, export_dir):
    """Writes export_dir so that transformers' from_pretrained loads the model (and AutoTokenizer its tokenizer).

    The directory appears complete or not at all: it is written beside export_dir and renamed into place.
    Returns the names of the files written.
    """
    import shutil

    export_dir = os.path.normpath(export_dir)
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        names = set(os.listdir(export_dir))
        if "config.json" not in names or not names <= EXPORT_FILES:
            raise UserError(f"export_dir {export_dir}/ is not empty and not an earlier export: pass a new --export_dir")
    elif os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UserError(f"export_dir {export_dir} is a file: pass a directory path as --export_dir")
    hf = to_hf_model(model)
    hf.generation_config.pad_token_id = GPT2_VOCAB - 1  # open-ended generation with no padding token, as GPT-2
    tokenizer_files = gpt2_tokenizer_files(model.config.block_size)
    tmp, old = f"{export_dir}.tmp", f"{export_dir}.old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    hf.save_pretrained(tmp, safe_serialization=True)
    for name, data in (tokenizer_files or {}).items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    written = sorted(os.listdir(tmp))
    if os.path.exists(export_dir):
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return written


# --- command line ---


def model_to_use(cfg):
    """The checkpoint or Hugging Face model that --mode=sample and --mode=export read."""
    if cfg.init_from == "scratch":
        raise UserError(f"--mode={cfg.mode} needs a model: pass --init_from=resume (newest checkpoint in --log_dir), "
                        f"a model_XXXXX.pt path, or a Hugging Face GPT-2 such as gpt2")
    if cfg.init_from != "resume":
        return cfg.init_from
    found = list_checkpoints(cfg.log_dir)
    if not found:
        raise UserError(f"--init_from=resume: no checkpoint in {cfg.log_dir}/: pass --log_dir or a model_XXXXX.pt path")
    return found[-1][1]


def sample(cfg):
    """--mode=sample: prints samples of cfg.prompt and, with --samples_file, writes them as JSON lines."""
    device = resolve_device(cfg.device)
    autocast, _ = make_autocast(cfg.dtype, device)
    enc = get_tokenizer()
    source = model_to_use(cfg)
    model = load_model(source, device).eval()
    print(f"sampling from {source}: top_k={cfg.top_k} temperature={cfg.temperature} seed={cfg.seed}")
    records = print_samples(model, enc, device, autocast, cfg)
    if cfg.samples_file:
        tmp = f"{cfg.samples_file}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, cfg.samples_file)
        print(f"wrote {len(records)} samples to {cfg.samples_file}")


def export(cfg):
    """--mode=export: our checkpoint as a directory transformers loads with from_pretrained."""
    source = model_to_use(cfg)
    written = export_hf(load_model(source), cfg.export_dir)
    print(f"exported {source} to {cfg.export_dir}/: {', '.join(written)}")
    if "vocab.json" not in written:
        print("warning: tiktoken could not get GPT-2's tokenizer files (no network, no TIKTOKEN_CACHE_DIR), so none were "
              "written; AutoTokenizer.from_pretrained('gpt2') is the same tokenizer")


# the oldest torch whose APIs this file uses: torch.optim.Muon is new in 2.9 (fully_shard and FSDPModule public from 2.6)
TORCH_MIN = (2, 9)


def check_torch_version(version=torch.__version__):
    """Stops at the start, in one line, on a torch too old for the code paths a run may take hours later."""
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise UserError(f"torch {version} is too old: this code needs torch >= {need}; pip install 'torch>={need}'")


def main(cfg, overridden):
    check_torch_version()
    check_command_line(cfg)
    if cfg.init_from not in ("scratch", "resume") and not os.path.exists(cfg.init_from) and not is_hf_model(cfg.init_from):
        raise UserError(f"--init_from={cfg.init_from}: no such checkpoint; pass scratch, resume, a model_XXXXX.pt path, "
                        f"a Hugging Face GPT-2 name ({', '.join(HF_HUB_NAMES)}) or a directory saved by transformers")
    if cfg.mode == "train":
        find_shards(cfg.data_dir, "train")  # the cheap checks first: before any estimate, model build or download
        train(cfg, overridden)
    elif cfg.mode == "sample":
        sample(cfg)
    else:
        export(cfg)


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
