"""A first run fits its machine: --micro_batch_size=auto from the memory estimate, and an out-of-memory step that
halves the micro batch and goes on with the same tokens."""

import dataclasses
import os
import sys

import pytest
import torch
from conftest import ROOT, TINY, read_log, run_gpt2

import gpt2

GB = 1e9
TINY_ANY_BATCH = [a for a in TINY if not a.startswith("--micro_batch_size=")]  # each run gives its own (a resume none)


def cfg_124m(**kw):
    return dataclasses.replace(gpt2.Config(), **kw)


def estimate(cfg, world_size=1, loss_impl="plain"):
    return gpt2.estimate_memory(cfg, world_size, torch.bfloat16, loss_impl)["total"]


def free_for(usable):
    """The free bytes whose usable part (after the reserve and the fraction) is `usable`."""
    return usable / gpt2.MEMORY_FRACTION + gpt2.MEMORY_RESERVE


def test_auto_takes_the_largest_micro_batch_whose_estimate_fits():
    cfg = cfg_124m()  # 524288 tokens per step: 512 sequences of 1024 on one rank
    for free_gb in (16, 24, 40, 80):
        chosen, line = gpt2.choose_micro_batch(cfg, 1, torch.bfloat16, "plain", free_gb * GB)
        b, usable = chosen.micro_batch_size, gpt2.usable_memory(free_gb * GB)
        assert 512 % b == 0 and chosen.loss_impl == "auto" and not chosen.activation_checkpointing
        # the estimate of the choice fits; the next larger micro batch that divides the step would not
        assert estimate(dataclasses.replace(cfg, micro_batch_size=b)) <= usable
        assert estimate(dataclasses.replace(cfg, micro_batch_size=2 * b)) > usable
        assert line.startswith(f"micro_batch_size=auto: {b} ({512 // b} micro-steps per rank)")
    # 80 GB: about 51 GB at 64 (bf16, plain loss), as docs/scaling.md's table says; 16 GB cannot hold 16 (about 14 GB)
    assert gpt2.choose_micro_batch(cfg, 1, torch.bfloat16, "plain", 80 * GB)[0].micro_batch_size == 64
    assert gpt2.choose_micro_batch(cfg, 1, torch.bfloat16, "plain", 16 * GB)[0].micro_batch_size == 8


def test_auto_falls_back_to_the_chunked_loss_then_recompute_then_stops():
    cfg = dataclasses.replace(cfg_124m(), micro_batch_size=1)
    plain_one, chunked_one = estimate(cfg), estimate(cfg, loss_impl="chunked")  # 124M: the logits outweigh a chunk
    assert chunked_one < plain_one
    free = free_for((chunked_one + plain_one) / 2)
    chosen, line = gpt2.choose_micro_batch(cfg, 1, torch.bfloat16, "plain", free)
    assert (chosen.loss_impl, chosen.activation_checkpointing) == ("chunked", False)
    assert line.startswith(f"micro_batch_size=auto: {chosen.micro_batch_size}, the chunked loss (")
    assert estimate(chosen, loss_impl="chunked") <= gpt2.usable_memory(free)
    big = cfg_124m(n_layer=48, n_head=25, n_embd=1600, micro_batch_size=1)  # GPT-2 1.5B
    kept = estimate(big, loss_impl="chunked")
    recompute_one = estimate(dataclasses.replace(big, activation_checkpointing=True), loss_impl="chunked")
    free = free_for((recompute_one + kept) / 2)
    chosen, line = gpt2.choose_micro_batch(big, 1, torch.bfloat16, "plain", free)
    assert chosen.activation_checkpointing and "activation_checkpointing" in line
    assert estimate(chosen, loss_impl="chunked") <= gpt2.usable_memory(free)
    # 1.5B's weights, gradients and AdamW state alone are ~25 GB: a 16 GB GPU cannot train it without sharding
    with pytest.raises(gpt2.UserError, match=r"^--micro_batch_size=auto: even 1 sequence .* --fsdp=1 over \d+ GPUs"):
        gpt2.choose_micro_batch(big, 1, torch.bfloat16, "plain", 16 * GB)


def test_auto_needs_a_step_that_whole_sequences_divide():
    cfg = cfg_124m(total_batch_size=1000, block_size=64)
    with pytest.raises(gpt2.UserError, match=r"total_batch_size=1000 is not a multiple of block_size\*world_size = "
                                             r"64\*2, .* --total_batch_size=1024"):
        gpt2.choose_micro_batch(cfg, 2, torch.bfloat16, "plain", 80 * GB)


@pytest.mark.parametrize("value", ["0", "-2", "big"])
def test_bad_micro_batch_sizes_are_one_line_errors(value):
    proc = run_gpt2(f"--micro_batch_size={value}", check=False, in_process=True)
    assert proc.returncode == 1
    assert proc.stderr == f"error: --micro_batch_size={value}: expected auto or a number >= 1, e.g. --micro_batch_size=auto\n"


# the test's own fault: a forward pass over more than LIMIT sequences raises torch's out-of-memory error, on one rank
FAULTY = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import gpt2
from cli import run_cli

limit, rank = int(sys.argv[1]), sys.argv[2]
forward = gpt2.GPT.forward


def faulty(self, idx, *args, **kwargs):
    if self.training and idx.size(0) > limit and rank in ("all", os.environ.get("RANK", "0")):
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected above micro batch {{limit}})")
    return forward(self, idx, *args, **kwargs)


gpt2.GPT.forward = faulty
run_cli(gpt2.main, gpt2.Config(), sys.argv[3:])
"""


def run_faulty(tmp_path, limit, rank, *args, ranks=0):
    import subprocess

    script = tmp_path / "faulty.py"
    script.write_text(FAULTY.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks \
        else [sys.executable]
    proc = subprocess.run([*launcher, str(script), str(limit), str(rank), *TINY_ANY_BATCH, *args], capture_output=True,
                          text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train_losses(log_dir):
    return {step: v for (step, kind), v in read_log(log_dir).items() if kind == "train"}


def test_an_out_of_memory_step_halves_the_micro_batch_and_equals_a_run_started_there(shards, tmp_path):
    common = [f"--data_dir={shards}", "--max_steps=6", "--val_every=0", "--checkpoint_every=3", "--total_batch_size=128"]
    faulty_dir, plain_dir = str(tmp_path / "faulty"), str(tmp_path / "plain")
    proc = run_faulty(tmp_path, 2, 0, *common, f"--log_dir={faulty_dir}", "--micro_batch_size=8")
    assert proc.stdout.count("out of memory at micro_batch_size=8: the step again with 4 (2 micro-steps)") == 1
    assert proc.stdout.count("out of memory at micro_batch_size=4: the step again with 2 (4 micro-steps)") == 1
    run_gpt2(*TINY_ANY_BATCH, *common, f"--log_dir={plain_dir}", "--micro_batch_size=2", in_process=True)
    ours, theirs = train_losses(faulty_dir), train_losses(plain_dir)
    assert sorted(ours) == list(range(6))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-6), step
    # the checkpoint records the micro batch in use: a resume starts there and never meets the fault again
    assert torch.load(gpt2.checkpoint_path(faulty_dir, 3), weights_only=True)["config"]["micro_batch_size"] == 2
    os.remove(gpt2.checkpoint_path(faulty_dir, 6))
    again = run_faulty(tmp_path, 2, 0, *common, f"--log_dir={faulty_dir}", "--init_from=resume")
    assert "(step 3)" in again.stdout and "out of memory" not in again.stdout
    assert train_losses(faulty_dir) == ours  # bit-identical from the checkpoint, at the micro batch it recorded


@pytest.mark.slow
def test_one_ranks_out_of_memory_halves_every_ranks_micro_batch(shards, tmp_path):
    # DDP: rank 1 alone fails in its forward, where no collective is in flight: at 4 sequences in the step's one
    # micro-step, then at 2 in the first of two (it skips the second, and the ranks agree before the last backward).
    # Under FSDP every forward and backward may be inside a collective: the rank leaves and a restart halves
    # (tests/test_faults.py)
    common = [f"--data_dir={shards}", "--max_steps=4", "--val_every=0", "--checkpoint_every=0", "--total_batch_size=128"]
    faulty_dir, plain_dir = str(tmp_path / "faulty"), str(tmp_path / "plain")
    proc = run_faulty(tmp_path, 1, "1", *common, f"--log_dir={faulty_dir}", "--micro_batch_size=4", ranks=2)
    # 128 tokens of 16 per step over 2 ranks: 4 sequences each
    assert proc.stdout.count("out of memory at micro_batch_size=4: the step again with 2 (2 micro-steps)") == 1
    assert proc.stdout.count("out of memory at micro_batch_size=2: the step again with 1 (4 micro-steps)") == 1
    run_gpt2(*TINY_ANY_BATCH, *common, f"--log_dir={plain_dir}", "--micro_batch_size=1", torchrun_ranks=2)
    ours, theirs = train_losses(faulty_dir), train_losses(plain_dir)
    assert sorted(ours) == list(range(4))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-6), step


def test_free_memory_on_the_cpu_is_the_available_ram_shared_by_the_ranks(tmp_path):
    # a machine of 32 GiB with 16 available and no cgroup limit; the limits, and this machine's own RAM, are
    # tests/test_machine_limits.py's
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       33554432 kB\nMemAvailable:   16777216 kB\n")
    cpu = torch.device("cpu")
    assert gpt2.free_memory(cpu, root=str(tmp_path)) == 16 * 2**30
    assert gpt2.free_memory(cpu, local_world_size=2, root=str(tmp_path)) == 8 * 2**30
