"""--optimizer=muon under --fsdp=1 (muon.ShardedMuon) against torch.optim.Muon in one process: the same updates, the
state sharded, whole matrices only on their owner, and checkpoints that move between 1, 2 and 4 ranks, FSDP and DDP.

The first test runs this file as a worker on 4 gloo ranks (torchrun tests/test_muon_fsdp.py): each rank holds, beside
the sharded model, the whole model with torch's own optimizers, and both take the same steps on the same gradients.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_log, run_gpt2
from test_train import assert_logs_close

import gpt2
import muon

# rows of 33, 99 and 132 over 4 ranks: 9/9/9/6, 25/25/25/24 and 33 each, so the shards are uneven and c_attn's q, k and
# v (33 rows each) straddle them
SHAPE = dict(n_layer=2, n_head=3, n_embd=33, block_size=16, vocab_size=128)
ADAMW = dict(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
WORLD = 4


def test_matrices_are_owned_by_size_and_extra_ranks_own_none():
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)]
    # 4096 to rank 0, 4096 to rank 1, then 3072 to the lower of two equal loads and 1024 to the lighter: 7168 | 5120
    assert muon.balance([r * c for r, c in shapes], 2) == [0, 1, 0, 1]
    assert muon.rounds(shapes, 2) == [[2, 3], [0, 1]]  # each rank its largest first
    assert muon.rounds(shapes, 6) == [[2, 3, 0, 1, None, None]]  # more ranks than matrices: some own none


def test_muon_with_float16_under_fsdp_is_refused_in_one_line():
    with pytest.raises(gpt2.UserError, match=r"^--dtype=float16 with --fsdp=1: .*use --dtype=bfloat16 or float32"):
        gpt2.check_config(gpt2.Config(optimizer="muon", fsdp=True, dtype="float16"))
    gpt2.check_config(gpt2.Config(optimizer="muon", fsdp=True, dtype="bfloat16"))  # what it says to use works


def worker():
    """One of WORLD gloo ranks: 4 steps of ShardedMuon (with AdamW for the rest) and of torch's optimizers on the whole
    model, on the same random gradients; prints RESULT and a JSON record per rank on rank 0."""
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.optim import _muon

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_memory

    d = gpt2.setup_distributed("cpu")
    torch.set_num_threads(1)
    cfg = gpt2.Config(**SHAPE, optimizer="muon", muon_weight_decay=0.01)

    def build(sharded):
        torch.manual_seed(0)
        model = gpt2.GPT(gpt2.model_config(cfg))
        if sharded:
            gpt2.shard_model(model, d)
        return model, model.configure_optimizers(**ADAMW, muon=gpt2.muon_settings(cfg))

    ref, ref_opt = build(False)  # torch.optim.Muon (q, k and v apart) and AdamW, on the whole model
    model, opt = build(True)
    assert isinstance(opt.muon, muon.ShardedMuon)
    names = {p: n for n, p in model.named_parameters()}
    matrices = [n for n, p in ref.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]

    # what this rank orthogonalizes (torch's function, wrapped) and what arrives at it through the all-to-alls
    orthogonalized, arrived = [], []
    newton_schulz, all_to_all = _muon._zeropower_via_newtonschulz, dist.all_to_all_single

    def counted_newton_schulz(g, *args):
        orthogonalized.append(list(g.shape))
        return newton_schulz(g, *args)

    def counted_all_to_all(output, *args, **kwargs):
        arrived.append(output.numel() * output.element_size())
        return all_to_all(output, *args, **kwargs)

    def step(optimizer, model, seed, track=False):
        gen = torch.Generator().manual_seed(seed)
        for p in ref.parameters():  # the same gradients for both: whole here, this rank's rows there
            p.grad = torch.randn(p.shape, generator=gen)
        if model is not ref:
            for name, p in model.named_parameters():
                p.grad = gpt2.local_slice(dict(ref.named_parameters())[name].grad, p)
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * group.get("lr_scale", 1)
        if model is ref:
            optimizer.step()
            return None
        optimizer.adamw.step()
        _muon._zeropower_via_newtonschulz, dist.all_to_all_single = counted_newton_schulz, counted_all_to_all
        try:
            return bench_memory.muon_step_bytes(model, optimizer)  # torch's MemTracker, as the benchmark counts it
        finally:
            _muon._zeropower_via_newtonschulz, dist.all_to_all_single = newton_schulz, all_to_all

    for seed in range(3):
        step(ref_opt, ref, seed)
        if seed == 2:
            orthogonalized.clear()
            arrived.clear()
        transient = step(opt, model, seed)  # the last step's: the momentum exists already

    def differs(a, b):
        return [n for n, p in a.named_parameters() if not torch.equal(p.full_tensor(), dict(b.named_parameters())[n])]

    def worst(a, b):
        return max(((p.full_tensor() - q).norm() / q.norm()).item()
                   for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True))

    local_bytes = lambda opt: sum(v.to_local().nbytes if gpt2.is_dtensor(v) else v.nbytes
                                  for o in (opt.adamw, opt.muon) for s in o.state.values() for k, v in s.items()
                                  if k != "step")
    owned = [names[p] for batch in opt.muon.rounds for rank, p in enumerate(batch) if p is not None and rank == d.rank]
    largest = max((dict(model.named_parameters())[n] for n in owned), key=lambda p: p.numel(), default=None)
    newton_schulz_bytes = 0
    if largest is not None:  # torch's iteration alone, on this rank's largest piece: its working set
        piece = torch.randn(largest.shape[0] // opt.muon.pieces[largest], largest.shape[1]).bfloat16()
        tracker = MemTracker()
        tracker.track_external(piece)
        with tracker:
            before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
            newton_schulz(piece, (3.4445, -4.7750, 2.0315), 5, 1e-7)  # what ShardedMuon does: in place, on its input
        newton_schulz_bytes = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before
    record = {"rank": d.rank, "differs": differs(model, ref), "worst": worst(model, ref), "owned": owned,
              "owned_shapes": [list(dict(model.named_parameters())[n].shape) for n in owned],
              "orthogonalized": list(orthogonalized), "arrived": list(arrived), "transient": transient,
              "newton_schulz_bytes": newton_schulz_bytes, "state": local_bytes(opt), "state_one": local_bytes(ref_opt)}

    # the checkpoint: one process's numbering and tensors; and one process's state (a DDP checkpoint) loaded here
    _, state = gpt2.full_state_dicts(model, opt, d.is_master)
    if d.is_master:
        expected = ref_opt.state_dict()
        record["groups_match"] = [g["params"] for g in state["param_groups"]] == [g["params"] for g in
                                                                                 expected["param_groups"]]
        record["state_differs"] = [(i, k) for i, s in expected["state"].items() for k in s
                                   if not torch.allclose(state["state"][i][k], s[k], rtol=1e-6, atol=1e-9)]
        record["momentum_equal"] = all(torch.equal(state["state"][i]["momentum_buffer"], s["momentum_buffer"])
                                       for i, s in expected["state"].items() if "momentum_buffer" in s)
    resumed, resumed_opt = build(True)
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.to_local().copy_(gpt2.local_slice(dict(ref.named_parameters())[name].detach(), p).to_local())
    resumed_opt.load_state_dict(gpt2.optimizer_state_for(resumed_opt, ref_opt.state_dict()))
    step(ref_opt, ref, 3)
    step(resumed_opt, resumed, 3)
    record["resumed_differs"] = differs(resumed, ref)

    records = [None] * d.world_size
    dist.all_gather_object(records, record)
    if d.is_master:
        print("RESULT " + json.dumps({"records": records, "matrices": matrices}), flush=True)
    gpt2.teardown_distributed()


def test_sharded_muon_is_torch_muon_with_sharded_state_and_whole_matrices_only_on_owners():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                          os.path.abspath(__file__)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    records, matrices = result["records"], result["matrices"]
    pieces = {n: 3 if "c_attn" in n else 1 for n in matrices}
    for r in records:
        # every block matrix is bit for bit what torch.optim.Muon made of it whole (q, k, v apart), after 3 steps and
        # after a 4th from one process's optimizer state; AdamW's fused kernel rounds a few shard ends differently
        assert not [n for n in r["differs"] if n in matrices] and not [n for n in r["resumed_differs"] if n in matrices]
        assert r["worst"] < 1e-6
    # each matrix is owned, and orthogonalized (as its pieces), by one rank: each once in the step
    owned = [n for r in records for n in r["owned"]]
    assert sorted(owned) == sorted(matrices)
    for r in records:
        assert len(r["orthogonalized"]) == sum(pieces[n] for n in r["owned"])
        # what arrives at a rank to be orthogonalized is one matrix at a time, the one it owns (bf16, padded rows)
        to_owner = r["arrived"][0::2]  # the rounds' first all-to-all; the second returns each rank its own rows
        whole = [2 * WORLD * -(-rows // WORLD) * cols for rows, cols in r["owned_shapes"]]
        assert sorted(b for b in to_owner if b) == sorted(whole)
        # all it holds at once beyond its state: that matrix, torch's Newton-Schulz working set for it, and its rows of
        # the round's matrices (2 bytes each); counted by torch's MemTracker
        rows_sent = max(r["arrived"][1::2])
        assert max(whole) <= r["transient"] <= max(whole) + r["newton_schulz_bytes"] + rows_sent
    # balanced by size: the most loaded rank has at most the mean plus one matrix
    sizes = {n: rows * cols for r in records for n, (rows, cols) in zip(r["owned"], r["owned_shapes"], strict=True)}
    load = [sum(sizes[n] for n in r["owned"]) for r in records]
    assert max(load) <= sum(sizes.values()) / WORLD + max(sizes.values())
    # the optimizer state (AdamW's moments and Muon's momentum): every element on exactly one rank, about a quarter each
    one = records[0]["state_one"]
    assert sum(r["state"] for r in records) == one
    assert max(r["state"] for r in records) <= 1.05 * one / WORLD
    # its checkpoint: one process's numbering, Muon's momentum bit for bit (q, k and v apart)
    assert records[0]["groups_match"] and records[0]["momentum_equal"] and records[0]["state_differs"] == []


T = 16
# 2 layers, 32 wide: every tensor splits evenly into whole vectors of floats, so that an elementwise kernel does the
# same arithmetic on a shard as on the whole. A constant rate after warmup (min_lr = max_lr), so that a run stopped at
# step 10 is the first part of a longer one. grad_clip=0: FSDP sums the norm's squares over the shards in another
# order, and a last-bit difference in the clip's factor would reach Newton-Schulz. muon_lr a tenth of the default:
# where 4 ranks differ (the order of their gradients' sum), Newton-Schulz's bfloat16 roundings spread the difference
# over the whole update, and at 0.02 that moves the losses by ~5e-5 in 20 steps, as it does torch.optim.Muon's under DDP.
# No validation: the train losses are compared, and each evaluation redraws log.png (seconds of matplotlib per run).
RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=128", "--compile=0", "--device=cpu",
       "--hellaswag_every=0", "--sample_every=0", "--val_every=0", "--warmup_steps=2", "--max_steps=30",
       "--checkpoint_every=10", "--max_lr=3e-3", "--min_lr=3e-3", "--optimizer=muon", "--muon_lr=0.002",
       "--muon_weight_decay=0.01", "--grad_clip=0", "--micro_batch_size=2", f"--total_batch_size={4 * T}"]


def run(shards, log_dir, *extra, ranks=0):
    """gpt2.py on `ranks` torchrun ranks; with none, through its command line in this process (conftest.gpt2_here)."""
    return run_gpt2(*RUN, f"--data_dir={shards}", f"--log_dir={log_dir}", *extra, torchrun_ranks=ranks,
                    in_process=not ranks).stdout


def checkpoint(log_dir, step=30):
    return gpt2.load_checkpoint(log_dir / f"model_{step:05d}.pt")


def assert_checkpoints_equal(a, b):
    """The same weights and the same optimizer state, numbered alike, bit for bit."""
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items() for k, v in s.items())


def relative_l2(a, b):
    """The largest relative L2 distance between two state dicts' tensors."""
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm()).item() for k in b)


def after(step, log):
    return {k: v for k, v in log.items() if k[0] >= step}


@pytest.mark.slow
def test_fsdp_muon_logs_one_process_and_its_checkpoints_resume_anywhere(shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(shards, one)  # 2 micro-steps
    # 2 FSDP ranks, 1 micro-step each, stopped at step 10 and resumed on 2 ranks: both it and one process sum the same
    # two gradients (a + b, in either order), so Newton-Schulz sees the same bits: equal to one process throughout
    assert "(Muon's step" in run(shards, two, "--fsdp=1", "--max_steps=10", ranks=2)  # estimate_memory counts it
    assert_checkpoints_equal(checkpoint(one, 10), checkpoint(two, 10))  # q, k and v's momenta apart, as one process's
    run(shards, two, f"--init_from={two / 'model_00010.pt'}", ranks=2)
    assert (two / "log.txt").read_text() == (one / "log.txt").read_text()
    assert_checkpoints_equal(checkpoint(one), checkpoint(two))
    weights = checkpoint(one)["model"]

    # two's step-10 checkpoint on 1 process, under DDP, and on 4 FSDP ranks of one sequence each with activation
    # checkpointing for 20 steps: 4 ranks sum the gradients in another order (see RUN)
    start = f"--init_from={two / 'model_00010.pt'}"
    one_again, ddp, four = tmp_path / "one_again", tmp_path / "ddp", tmp_path / "four"
    run(shards, one_again, start)
    run(shards, ddp, start, "--fsdp=0", "--checkpoint_every=5", ranks=2)
    run(shards, four, start, "--micro_batch_size=1", "--activation_checkpointing=1", ranks=4)
    for log_dir, limit in ((one_again, 1e-5), (ddp, 1e-5), (four, 1e-2)):  # four: bfloat16's rounding, ~2e-3 measured
        assert_logs_close(after(10, read_log(one)), read_log(log_dir), atol=1e-5)
        assert relative_l2(checkpoint(log_dir)["model"], weights) < limit, log_dir.name
    # and DDP's step-15 checkpoint under FSDP
    ddp_to_fsdp = tmp_path / "ddp_to_fsdp"
    run(shards, ddp_to_fsdp, f"--init_from={ddp / 'model_00015.pt'}", "--fsdp=1", ranks=2)
    assert_logs_close(after(15, read_log(one)), read_log(ddp_to_fsdp), atol=1e-5)
    assert relative_l2(checkpoint(ddp_to_fsdp)["model"], weights) < 1e-5


if __name__ == "__main__":
    worker()
