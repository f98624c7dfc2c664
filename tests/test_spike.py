"""--spike_guard: a loss spike rolls the run back and skips the data that caused it (PaLM's recipe), exactly and resumably.

The bad data is a region of random token ids inside a learnable stream (each token 7 x the one before plus 0-3, mod 64,
so a tiny model's loss falls towards ln 4 while random ids cost it several nats each). The runs are compared with runs
on the same stream without the region, with runs told the skipped range from the start, and with two gloo ranks.
Single-process runs go through gpt2.py's command line in the test process (conftest.gpt2_here); ranks under torchrun.
"""

import math
import os
import shutil
import statistics

import numpy as np
import pytest
import torch
from conftest import run_gpt2

import cli
import gpt2
import plot

STEP = 256  # tokens per optimizer step
BAD_START, BAD_LEN = 70 * STEP + 100, 2000  # the bad region: steps 70 to 78 read it
RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=64", "--micro_batch_size=8",
       f"--total_batch_size={STEP}", "--compile=0", "--device=cpu", "--hellaswag_every=0", "--sample_every=0",
       "--max_steps=120", "--val_every=0", "--val_tokens=1024", "--warmup_steps=10", "--max_lr=1e-2", "--min_lr=1e-3",
       "--checkpoint_every=50"]
GUARD = ["--spike_guard=1", "--spike_window=30", "--spike_snapshot_every=20", "--spike_skip_steps=5", "--val_every=60"]


def pattern(n, rng):
    tokens = [int(rng.integers(0, 64))]
    for step in rng.integers(0, 4, n - 1).tolist():
        tokens.append((7 * tokens[-1] + step) % 64)
    return np.array(tokens, dtype=np.uint16)


def write_data(data_dir, bad):
    os.makedirs(data_dir)
    train = pattern(40_000, np.random.default_rng(0))
    if bad:
        noise = np.random.default_rng(1).integers(0, 64, BAD_LEN).astype(np.uint16)
        train = np.concatenate([train[:BAD_START], noise, train[BAD_START:]])
    np.save(os.path.join(data_dir, "x_train_000001.npy"), train)
    np.save(os.path.join(data_dir, "x_val_000000.npy"), pattern(4000, np.random.default_rng(2)))
    return str(data_dir)


def run_here(*args, check=True):
    return run_gpt2(*args, check=check, in_process=True)


def kept(log_dir):
    """plot.read_log's kept run as {(step, kind): value}, the rollbacks left out."""
    series = plot.read_log(os.path.join(log_dir, "log.txt"))
    return {(s, kind): v for kind, (steps, values) in series.items() if kind != "rollback"
            for s, v in zip(steps, values, strict=True)}


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """{"clean": data_dir, "bad": data_dir}: the stream without and with the bad region."""
    tmp = tmp_path_factory.mktemp("streams")
    return {"clean": write_data(tmp / "clean", False), "bad": write_data(tmp / "bad", True)}


@pytest.fixture(scope="module")
def runs(streams, tmp_path_factory):
    """The same model on the clean stream and on the stream with the bad region: with the guard, and without it."""
    tmp = tmp_path_factory.mktemp("spike")
    clean, bad = streams["clean"], streams["bad"]
    out = {"tmp": tmp, "bad": bad}
    out["clean_stdout"] = run_here(*RUN, *GUARD, f"--data_dir={clean}", f"--log_dir={tmp / 'clean_log'}").stdout
    run_here(*RUN, f"--data_dir={bad}", f"--log_dir={tmp / 'unguarded'}", "--checkpoint_every=0")  # no val either
    out["stdout"] = run_here(*RUN, *GUARD, f"--data_dir={bad}", f"--log_dir={tmp / 'guarded'}").stdout
    return out


def rollback_line(stdout):
    lines = [line for line in stdout.splitlines() if "rolled back" in line]
    assert len(lines) == 1, stdout
    return lines[0]


def skipped_range(stdout):
    start, end = rollback_line(stdout).split("skipping train tokens ")[1].split()[0].split("-")
    return int(start), int(end)


# --- the spike test and the loader ---


def test_spike_test_waits_out_a_blip_and_catches_what_stays_up():
    cfg = gpt2.Config(spike_window=20, spike_k=10, spike_min_rise=0.5, spike_patience=3)
    window = [3 + 0.01 * math.sin(i) for i in range(20)]
    bound = statistics.median(window) + max(10 * statistics.median(abs(x - statistics.median(window)) for x in window), 0.5)
    assert gpt2.spike_test(window, 0, bound - 1e-6, cfg)[0] == "ok"
    assert gpt2.spike_test(window, 0, bound + 1e-6, cfg)[0] == "above"  # one step: maybe a blip
    assert gpt2.spike_test(window, 1, bound + 1e-6, cfg)[0] == "above"
    verdict, why = gpt2.spike_test(window, 2, bound + 1e-6, cfg)  # the third in a row
    assert verdict == "spike" and f"above {bound:.4f}" in why
    assert gpt2.spike_test(window, 0, math.nan, cfg) == ("spike", "not finite")
    assert gpt2.spike_test(window[:19], 0, 100.0, cfg)[0] == "ok"  # the window is not full: the loss may be falling
    assert gpt2.spike_test(window[:19], 0, math.inf, cfg)[0] == "spike"


def test_skipped_ranges_are_read_alike_by_any_world_size_and_kept_in_the_state(tmp_path):
    stream = np.arange(20_000, dtype=np.uint16)  # each token is its own position
    os.makedirs(tmp_path / "d")
    np.save(tmp_path / "d" / "n_train_000001.npy", stream)
    T, per_step = 16, 128
    skip = [[640, 1280], [1280, 1536], [4096, 4224]]  # on step edges, as a rollback makes them; two touch

    def read(world, B, steps, shuffle=False, state=None):
        loaders = [gpt2.DataLoaderLite(str(tmp_path / "d"), "train", B, T, r, world, 65536, shuffle, seed=3)
                   for r in range(world)]
        for loader in loaders:
            loader.skipped = [list(r) for r in skip]
            if state:
                loader.load_state_dict(state)
        tokens = []
        for _ in range(steps * per_step // (B * T * world)):
            tokens += [t for loader in loaders for t in loader.next_batch()[0].flatten().tolist()]
        return tokens, loaders[0].state_dict()

    expected = [t for t in range(20_000) if not (640 <= t < 1536 or 4096 <= t < 4224)][:40 * per_step]
    one, state = read(1, 8, 40)  # one rank, 8 sequences a batch
    two, state_two = read(2, 2, 40)  # two ranks of 2 sequences
    assert one == two == expected
    assert state == state_two == {"position": expected[-1] + 1, "skipped": skip}
    assert read(1, 8, 40, shuffle=True)[0] == read(2, 2, 40, shuffle=True)[0]
    # the ranges travel in the state; a checkpoint from before them (a position only) loads, adding none
    resumed, _ = read(2, 4, 10, state={"position": 30 * per_step})
    assert resumed == expected[30 * per_step - 896:][:10 * per_step]
    loader = gpt2.DataLoaderLite(str(tmp_path / "d"), "train", 8, T)
    loader.skipped = [[9, 10]]  # given by --skip_tokens: joined by those of the checkpoint
    loader.load_state_dict(state)
    assert loader.skipped == skip + [[9, 10]]


# --- a spike rolls the run back and skips the bad data ---


def test_bad_data_rolls_the_run_back_and_is_skipped(runs):
    tmp, stdout = runs["tmp"], runs["stdout"]
    unguarded, guarded, clean = (kept(tmp / name) for name in ("unguarded", "guarded", "clean_log"))
    before = statistics.median(unguarded[(s, "train")] for s in range(60, 70))
    assert min(unguarded[(s, "train")] for s in range(70, 78)) > before + 1  # the region: the loss jumps by > 1 nat
    line = rollback_line(stdout)
    assert "steps 70-74 |" in line and "rolled back 15 steps to step 60" in line and "rollback 1," in line
    start, end = skipped_range(stdout)
    assert start <= BAD_START and BAD_START + BAD_LEN <= end  # from the rollback point to past the region
    with open(tmp / "guarded" / "log.txt") as f:
        assert "74 rollback 60\n" in f.read()
    # the kept run: every step once, its losses never near the region's, and it ends where the clean run ends
    assert sorted(s for s, kind in guarded if kind == "train") == list(range(120))
    assert max(guarded[(s, "train")] for s in range(60, 120)) < before + 0.5
    assert guarded[(120, "val")] == pytest.approx(clean[(120, "val")], abs=0.05)
    assert clean[(120, "val")] < math.log(64) - 2  # both learned the stream
    assert "rolled back" not in runs["clean_stdout"]  # a healthy run never rolls back
    # the steps before the spike are those of the run without the guard: it changes nothing until it acts
    assert all(guarded[(s, "train")] == unguarded[(s, "train")] for s in range(60))
    plot.plot_log(str(tmp / "guarded" / "log.txt"), str(tmp / "guarded" / "log.png"))


def test_the_same_ranges_skipped_from_the_start_give_the_same_run(runs):
    start, end = skipped_range(runs["stdout"])
    given = runs["tmp"] / "given"
    run_here(*RUN, f"--data_dir={runs['bad']}", f"--log_dir={given}", f"--skip_tokens={start}-{end}")
    guarded = kept(runs["tmp"] / "guarded")
    assert kept(given) == {k: v for k, v in guarded.items() if k[1] == "train"}  # to 6 decimals; the weights bit for bit:
    a, b = (gpt2.load_checkpoint(str(d / "model_00120.pt")) for d in (given, runs["tmp"] / "guarded"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"] == {"position": 120 * STEP + end - start, "skipped": [[start, end]]}


@pytest.mark.parametrize("kept_checkpoint", [50, 100])  # from before the spike (met again), after it (holds the range)
def test_a_run_killed_after_a_rollback_resumes_to_the_same_losses(runs, kept_checkpoint):
    guarded, killed = runs["tmp"] / "guarded", runs["tmp"] / f"killed_{kept_checkpoint}"
    shutil.copytree(guarded, killed)
    for step in (50, 100, 120):
        if step > kept_checkpoint:  # as if killed after the rollback, before these were written
            os.remove(killed / f"model_{step:05d}.pt")
    out = run_here(*RUN, *GUARD, f"--data_dir={runs['bad']}", f"--log_dir={killed}", "--init_from=resume").stdout
    assert f"model_{kept_checkpoint:05d}.pt" in out
    with open(guarded / "log.txt") as a, open(killed / "log.txt") as b:
        assert a.read() == b.read()  # the discarded steps, the rollback and the kept run, bit for bit
    a, b = (gpt2.load_checkpoint(str(d / "model_00120.pt")) for d in (guarded, killed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"] and a["spike_guard"] == b["spike_guard"]
    assert a["spike_guard"]["rollbacks"] == [74]


@pytest.mark.slow
def test_two_ranks_roll_back_and_skip_as_one_process(runs):
    guarded, two = runs["tmp"] / "guarded", runs["tmp"] / "two"
    os.makedirs(two)
    shutil.copy(guarded / "model_00050.pt", two)  # one process's checkpoint from before the spike, resumed on two
    out = run_gpt2(*RUN, *GUARD, f"--data_dir={runs['bad']}", f"--log_dir={two}", "--micro_batch_size=4",
                   "--init_from=resume", torchrun_ranks=2).stdout
    assert skipped_range(out) == skipped_range(runs["stdout"])  # the same steps, the same tokens
    one_log, two_log = kept(guarded), kept(two)
    assert two_log.keys() == {k for k in one_log if k[0] >= 50}
    assert all(two_log[k] == pytest.approx(one_log[k], abs=1e-5) for k in two_log)
    a, b = (gpt2.load_checkpoint(str(d / "model_00120.pt")) for d in (guarded, two))
    assert a["loader"] == b["loader"]


@pytest.mark.slow
def test_fsdp_muon_rolls_back_to_the_run_told_the_range(streams, tmp_path):
    # Muon's momentum under FSDP lives in ShardedMuon's sharded state: the rollback must put it back, or the run after
    # it would differ from one that skipped the same tokens from the start
    muon = ["--optimizer=muon", "--fsdp=1", "--micro_batch_size=4", "--checkpoint_every=0"]
    out = run_gpt2(*RUN, *GUARD, *muon, f"--data_dir={streams['bad']}", f"--log_dir={tmp_path / 'muon_guarded'}",
                   torchrun_ranks=2).stdout
    start, end = skipped_range(out)
    assert start <= BAD_START and BAD_START + BAD_LEN <= end
    run_gpt2(*RUN, *muon, f"--data_dir={streams['bad']}", f"--log_dir={tmp_path / 'muon_given'}",
             f"--skip_tokens={start}-{end}", "--val_every=60", torchrun_ranks=2)
    guarded, given = kept(tmp_path / "muon_guarded"), kept(tmp_path / "muon_given")
    assert guarded.keys() == given.keys() and sorted(s for s, kind in given if kind == "train") == list(range(120))
    assert all(guarded[k] == pytest.approx(given[k], abs=1e-6) for k in given), [
        (k, guarded[k], given[k]) for k in sorted(given) if guarded[k] != pytest.approx(given[k], abs=1e-6)][:3]


# --- divergence, and bad settings ---


def one_line_error(*args):
    proc = run_here(*args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return proc.stdout, lines[0]


def test_spike_after_spike_stops_the_run_and_keeps_the_last_checkpoint(streams, tmp_path):
    # a learning rate this large makes every step after the first one NaN: diverging, whatever data is skipped
    stdout, err = one_line_error(*RUN, *GUARD, f"--data_dir={streams['bad']}", f"--log_dir={tmp_path}", "--max_lr=1e30",
                                 "--checkpoint_every=1", "--spike_max_rollbacks=2", "--val_every=0")
    assert "loss nan not finite, a spike after 2 rollbacks within 1000 steps (--spike_max_rollbacks=2)" in err
    assert "diverging, not meeting bad data" in err and "last checkpoint" in err
    assert stdout.count("rolled back") == 2
    assert [s for s, _ in gpt2.list_checkpoints(tmp_path)] == [1]  # written after step 0, never after a spike
    assert all(torch.isfinite(t).all() for t in gpt2.load_checkpoint(str(tmp_path / "model_00001.pt"))["model"].values())


def test_bad_spike_settings(streams):
    for args in ("--spike_window=0", "--spike_window=-5", "--spike_k=0", "--spike_k=-1", "--spike_patience=0",
                 "--spike_guard=1 --mode=sample", "--skip_tokens=9-3", "--skip_tokens=1-2,x"):
        cfg = gpt2.Config()
        cli.apply_overrides(cfg, args.split())
        with pytest.raises(cli.UserError, match=args.split()[0].split("=")[0].removeprefix("--")):
            gpt2.check_config(cfg)
    cfg = gpt2.Config(total_batch_size=STEP, spike_skip_steps=1000)
    loader = gpt2.DataLoaderLite(streams["bad"], "train", 8, 32)
    parts = gpt2.StepParts(None, None, None, None, loader, None, 1, 0.0, 0.0, None, None)
    with pytest.raises(cli.UserError, match="--spike_skip_steps=1000 skips 256,000 tokens past a spike, more than the "
                                            "train split's 42,000: pass a smaller one, at most --spike_skip_steps=164"):
        gpt2.SpikeGuard(cfg, gpt2.Dist(0, 0, 1, torch.device("cpu")), parts, 0, None)


def test_healthy_runs_never_roll_back(streams, tmp_path):
    # the clean run (AdamW, cosine) in the fixture; here Muon, WSD and float16 at the default spike test, checked from
    # step 20 on rather than 100; bench/bench_spike.py replays longer and real runs (docs/reliability.md)
    out = run_here(*RUN, *GUARD, "--spike_window=20", "--optimizer=muon", "--lr_schedule=wsd", "--dtype=float16",
                   "--val_every=0", "--checkpoint_every=0", f"--data_dir={streams['clean']}",
                   f"--log_dir={tmp_path / 'healthy'}").stdout
    assert "rolled back" not in out and "step    119/120 (100.0%) | loss" in out
