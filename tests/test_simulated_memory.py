"""estimate_memory's per-rank weights, gradients and AdamW state against gpt2.shard_model (FSDP2) at 8 ranks, simulated.

bench/bench_memory.py's simulate_rank (--run=simulate) joins torch's fake process group as one rank of 8, builds the
model as fake tensors, shards it with the real FSDP2 code, takes one fake step and counts that rank's bytes. The count
is FSDP2's, not ours, so it can disagree with the estimate. The process group is destroyed before it returns.
"""

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

import gpt2

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_memory  # noqa: E402

WORLD = 8
# every dim 0 divides by 8 except the vocabulary's 100 rows: FSDP2 gives ranks 0-6 13 rows of wte and rank 7 the last 9
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16, micro_batch_size=2)


def test_simulated_fsdp_shards_match_the_estimate():
    cfg = gpt2.Config(**SHAPE, fsdp=True)
    simulated = {rank: bench_memory.simulate_rank(cfg, rank, WORLD) for rank in (0, WORLD - 1)}
    assert not dist.is_initialized()
    estimate = gpt2.estimate_memory(cfg, WORLD, torch.float32, "plain")  # float32 state, as on a GPU
    # the whole model, counted here from its parameters, and what FSDP2 allocates per rank for it: dim 0 split with ceil
    params = list(gpt2.GPT(gpt2.model_config(cfg)).parameters())
    whole = 4 * sum(p.numel() for p in params)
    padded = 4 * sum(math.ceil(p.shape[0] / WORLD) * p[0].numel() for p in params)
    first, last = simulated[0], simulated[WORLD - 1]
    assert first["weights_padded"] == last["weights_padded"] == padded
    assert first["weights"] == padded  # the first ranks' shards are full, the last one's is cut
    assert first["weights"] * (WORLD - 1) + last["weights"] == whole  # every parameter once over the 8 ranks (1-6 as 0)
    for rank in (first, last):
        assert rank["gradients"] == rank["weights"]  # float32 gradient shards, the parameters' shapes
        assert rank["optimizer"] == 2 * rank["weights"]  # AdamW's two moments, float32
    # the estimate is the unpadded 1/8; FSDP2's rank 0 holds at most one more row of each parameter: within 2% here
    for part in ("weights", "gradients", "optimizer"):
        assert first[part] == pytest.approx(estimate[part], rel=0.02), part
        assert first[part] >= estimate[part]


@pytest.mark.parametrize("world", [8, 64])
def test_simulated_fsdp_muon_state_and_step_match_the_estimate(world):
    # every dim 0 divides by 64 here, so each rank's shards are exactly 1/world; 8 matrices, so at 64 ranks most own none
    cfg = gpt2.Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, block_size=64, fsdp=True, optimizer="muon",
                      micro_batch_size=2)
    estimate = gpt2.estimate_memory(cfg, world, torch.float32, "plain")
    first, last = (bench_memory.simulate_rank(cfg, rank, world) for rank in (0, world - 1))
    for rank in (first, last):
        assert rank["optimizer"] == estimate["optimizer"]  # AdamW's moments and Muon's momentum, sharded as the weights
    # the step's memory beyond the state, counted by torch's MemTracker on the real step: rank 0 orthogonalizes the
    # largest matrix, which is the estimate's (the most loaded rank); the last rank owns less, or nothing at 64
    assert first["muon_step"] == estimate["muon_step"]
    C, L = cfg.n_embd, cfg.n_layer
    shapes, pieces = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L, [3, 1, 1, 1] * L
    assert last["muon_step"] == gpt2.step_bytes(shapes, pieces, world, rank=world - 1) < estimate["muon_step"]
