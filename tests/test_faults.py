"""A cluster's faults, where they strike: one rank out of memory inside a collective (DDP's last backward, an FSDP
forward inside a block, an FSDP backward), preemption by SIGTERM through torchrun's agent and straight to the process,
and the out-of-memory records a restart reads."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, read_log, run_gpt2

import faults
import gpt2
from cli import apply_overrides, merge_settings

TINY_ANY_BATCH = [a for a in TINY if not a.startswith("--micro_batch_size=")]

# the test's own faults, in a script that runs gpt2.py: from the `after`-th training forward pass on, a micro batch of
# more than `limit` sequences raises torch's out-of-memory error on rank `rank` alone, inside the first block's MLP:
# in its forward pass, or in its backward pass (an autograd function whose backward raises)
FAULTY = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import gpt2
from cli import run_cli

where, rank, limit, after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ours = os.environ.get("RANK", "0") == rank
calls = [0]
gpt_forward, mlp_forward = gpt2.GPT.forward, gpt2.MLP.forward


def oom():
    return torch.OutOfMemoryError("CUDA out of memory (injected)")


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise oom()


def counting(self, idx, targets=None, **kwargs):
    if self.training and targets is not None:
        calls[0] += 1
    return gpt_forward(self, idx, targets, **kwargs)


def faulty(self, x):
    armed = ours and self is first_mlp[0] and torch.is_grad_enabled() and x.size(0) > limit and calls[0] > after
    if armed and where == "forward":
        raise oom()
    out = mlp_forward(self, x)
    return FailInBackward.apply(out) if armed and where == "backward" else out


first_mlp = [None]
init = gpt2.GPT.__init__


def remember(self, config):
    init(self, config)
    first_mlp[0] = self.transformer.h[0].mlp


gpt2.GPT.__init__, gpt2.GPT.forward, gpt2.MLP.forward = remember, counting, faulty
run_cli(gpt2.main, gpt2.Config(), sys.argv[5:])
"""

MISMATCH = ("doesn't match", "mismatch")  # gloo's words for a collective paired with another


def launch(tmp_path, fault, args, restarts=None):
    """gpt2.py under torchrun with 2 ranks, through the fault script: (its exit status, its output, and for each line
    of it the seconds since the start when it came)."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *([f"--max-restarts={restarts}"] if restarts is not None else []), str(script), *fault, *merge_settings(args)]
    start, lines = time.time(), []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            lines.append((time.time() - start, line))
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(line for _, line in lines), lines


def first(lines, text):
    """When the first line holding text came, in seconds from the start."""
    return next(t for t, line in lines if text in line)


def train_losses(log_dir):
    return {step: v for (step, kind), v in read_log(log_dir).items() if kind == "train"}


COMMON = [*TINY_ANY_BATCH, "--max_steps=5", "--val_every=0", "--checkpoint_every=2", "--total_batch_size=128",
          "--init_from=resume"]  # 128 tokens of 16 over 2 ranks: 4 sequences per rank and step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process at micro batch 2, from scratch: what every rank-count and micro batch of these runs equals."""
    from conftest import write_shards

    root = tmp_path_factory.mktemp("faults")
    data_dir = str(root / "data")
    write_shards(data_dir, [3000], "val", seed=1)
    write_shards(data_dir, [5000, 777, 4321], "train", seed=2, start_index=1)
    run_gpt2(*COMMON, f"--data_dir={data_dir}", f"--log_dir={root / 'ref'}", "--micro_batch_size=2", in_process=True)
    return data_dir, train_losses(root / "ref")


def assert_equal_losses(ours, theirs):
    """Equal to 1e-6, as log.txt writes them (to 6 decimals: one unit apart in the last is 1e-6 give or take a float's
    rounding, hence the 1e-9)."""
    assert sorted(ours) == sorted(theirs)
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-6 + 1e-9), step


@pytest.mark.slow
@pytest.mark.parametrize("mode, where", [("ddp", "backward"), ("fsdp", "forward"), ("fsdp", "backward")])
def test_one_rank_out_of_memory_inside_a_collective_leaves_and_the_restart_halves(reference, tmp_path, mode, where):
    # rank 1 alone fails at step 3 (after the checkpoint of step 2), with 4 sequences in its micro batch: in DDP's only
    # (so last) backward, where the gradients are all-reduced; in an FSDP forward inside the first block, while rank 0
    # gathers the next block's weights; in an FSDP backward, amid the reduce-scatters
    data_dir, theirs = reference
    log_dir = tmp_path / "run"
    args = [*COMMON, f"--data_dir={data_dir}", f"--log_dir={log_dir}", "--micro_batch_size=4", f"--fsdp={int(mode == 'fsdp')}"]
    status, out, lines = launch(tmp_path, [where, "1", "2", "3"], args, restarts=1)
    assert status == 0, out
    line = f"error: rank 1: out of memory in the {where} pass at micro_batch_size=4 (step 3)"
    assert out.count(line) == 1, out
    assert "torchrun restarts the run from the newest checkpoint at micro_batch_size=2" in out
    assert "micro_batch_size=4: 4 ran out of memory in this run" in out and "resuming from" in out
    assert not [m for m in MISMATCH if m in out], out
    # the failing run has ended, its ranks stopped and the restart started well within a minute of the fault
    assert first(lines, "resuming from") - first(lines, line) < 60, out
    record = json.loads((log_dir / faults.OOM_FILE).read_text())
    assert [(r["micro_batch_size"], r["rank"], r["step"]) for r in record] == [(4, 1, 3)]
    assert_equal_losses(train_losses(log_dir), theirs)


@pytest.mark.slow
def test_without_restarts_the_run_ends_at_once_and_the_line_says_how_to_resume(reference, tmp_path):
    data_dir, _ = reference
    log_dir = tmp_path / "run"
    args = [*COMMON, f"--data_dir={data_dir}", f"--log_dir={log_dir}", "--micro_batch_size=4"]
    status, out, lines = launch(tmp_path, ["backward", "1", "2", "3"], args)
    assert status != 0 and lines[-1][0] - first(lines, "error: rank 1") < 60, out
    assert out.count("error: rank 1: out of memory in the backward pass at micro_batch_size=4 (step 3)") == 1, out
    assert "continue with --init_from=resume (the same command otherwise): it resumes at micro_batch_size=2" in out
    assert not [m for m in MISMATCH if m in out], out
    # the command the line gives (the same, with --init_from=resume) is what a torchrun restart runs: tested above
    assert [(r["micro_batch_size"], r["rank"]) for r in json.loads((log_dir / faults.OOM_FILE).read_text())] == [(4, 1)]


# --- preemption ---


def kill_when_logged(proc, log_dir, step, sig, deadline_s=120):
    """Sends sig to proc once log_dir/log.txt has a train line at `step` or later; returns that step."""
    end = time.time() + deadline_s
    while time.time() < end and proc.poll() is None:
        try:
            steps = [int(line.split()[0]) for line in (log_dir / "log.txt").read_text().splitlines() if " train " in line]
        except (OSError, ValueError):
            steps = []
        if steps and steps[-1] >= step:
            proc.send_signal(sig)
            return steps[-1]
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {step}")


PREEMPT = [*TINY, "--max_steps=60", "--val_every=20", "--val_tokens=128", "--checkpoint_every=50",
           "--total_batch_size=128", "--micro_batch_size=2", "--init_from=resume"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals to torchrun's agent")
def test_sigterm_to_torchrun_checkpoints_after_a_step_and_the_resume_equals_a_run_never_stopped(shards, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_gpt2(*PREEMPT, f"--data_dir={shards}", f"--log_dir={straight}", torchrun_ranks=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "gpt2.py"),
           *merge_settings([*PREEMPT, f"--data_dir={shards}", f"--log_dir={stopped}"])]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = kill_when_logged(agent, stopped, 5, signal.SIGTERM)
        signalled = time.time()
        out, _ = agent.communicate(timeout=60)
        took = time.time() - signalled
    finally:
        if agent.poll() is None:
            agent.kill()
    assert took < 30, took  # torchrun's agent waits 30 s (--shutdown-timeout) before it sends SIGKILL
    assert "forcefully exiting via" not in out, out  # the workers left by themselves
    assert out.count("preempted: SIGTERM received: stopped after step") == 1, out
    saved = [step for step, _ in gpt2.list_checkpoints(stopped)]
    assert saved and saved[-1] > seen and saved[-1] < 60, (saved, seen)
    run_gpt2(*PREEMPT, f"--data_dir={shards}", f"--log_dir={stopped}", torchrun_ranks=2)
    assert (stopped / "log.txt").read_bytes() == (straight / "log.txt").read_bytes()


# a signal straight to the process (SLURM signals every process of a job step) at an awkward moment: sent by the
# process to itself, from inside the function named, and in save_checkpoint a second one once the write is done
def signal_within(monkeypatch, name):
    original = getattr(gpt2, name)
    sent = []

    def signalled(*args, **kwargs):
        if sent:
            return original(*args, **kwargs)
        sent.append(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        result = original(*args, **kwargs)
        if name == "save_checkpoint":
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(gpt2, name, signalled)


SIGNAL_RUN = [*TINY, "--max_steps=8", "--val_every=4", "--val_tokens=128", "--checkpoint_every=3", "--init_from=resume"]


@pytest.fixture(scope="module")
def never_stopped(reference):
    """The log of a run of SIGNAL_RUN that no signal stopped, on the reference's data."""
    data_dir, _ = reference
    log_dir = os.path.join(os.path.dirname(data_dir), "never_stopped")
    run_gpt2(*SIGNAL_RUN, f"--data_dir={data_dir}", f"--log_dir={log_dir}", in_process=True)
    with open(os.path.join(log_dir, "log.txt"), "rb") as f:
        return data_dir, f.read()


@pytest.mark.parametrize("moment, stops_after", [("setup_distributed", 0), ("evaluate_loss", 0),
                                                 ("save_checkpoint", 3)])
def test_a_signal_at_startup_in_evaluation_or_during_a_checkpoint_stops_after_the_next_step(never_stopped, tmp_path,
                                                                                             monkeypatch, moment,
                                                                                             stops_after):
    data_dir, straight = never_stopped
    args = [*SIGNAL_RUN, f"--data_dir={data_dir}"]
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patched:  # this process is the run: gpt2.py's command line in it (conftest)
        signal_within(patched, moment)
        proc = run_gpt2(*args, f"--log_dir={stopped}", check=False, in_process=True)
    assert proc.returncode == faults.PREEMPTED, proc.stdout + proc.stderr
    signals = "SIGTERM then SIGUSR1" if moment == "save_checkpoint" else "SIGTERM"
    said = [line for line in proc.stderr.splitlines() if line.startswith("preempted")]
    assert said == [(f"preempted: {signals} received: stopped after step {stops_after} of 8 with "
                                   f"{gpt2.checkpoint_path(str(stopped), stops_after + 1)} written; continue with "
                                   f"--init_from=resume (the same command otherwise)")], proc.stderr
    kept = [step for step, _ in gpt2.list_checkpoints(stopped)]
    assert kept == ([3, 4] if moment == "save_checkpoint" else [1])  # the one being written when signalled, complete
    for _, path in gpt2.list_checkpoints(stopped):
        gpt2.load_checkpoint(path)
    run_gpt2(*args, f"--log_dir={stopped}", in_process=True)
    assert (stopped / "log.txt").read_bytes() == straight


# --- the records a restart reads ---


def test_oom_records_halve_an_explicit_micro_batch_and_bound_auto(tmp_path):
    cfg = gpt2.Config(micro_batch_size=8, total_batch_size=16 * 1024, block_size=1024)
    fingerprint = faults.memory_fingerprint(cfg, 1)
    lines = []
    assert faults.oom_limit(str(tmp_path), fingerprint, lines.append) is None and not lines
    faults.record_oom(str(tmp_path), {"micro_batch_size": 8, "settings": fingerprint, "step": 3, "rank": 0})
    faults.record_oom(str(tmp_path), {"micro_batch_size": 4, "settings": fingerprint, "step": 9, "rank": 1})
    assert faults.oom_limit(str(tmp_path), fingerprint, lines.append) == 4
    # 16 sequences per rank: 8 -> 4 -> 2, below the smallest that failed; auto is left to choose below it
    assert faults.fit_below(8, 4, 16, "oom.json", lines.append) == 2 and "so 2 (8 micro-steps per rank)" in lines[-1]
    assert faults.fit_below(2, 4, 16, "oom.json", lines.append) == 2
    assert faults.fit_below("auto", 4, 16, "oom.json", lines.append) == "auto"
    free = 10 * 2**40  # room for the whole step: auto would take 16
    chosen, line = gpt2.choose_micro_batch(gpt2.Config(total_batch_size=16 * 1024), 1, torch.float32, "plain", free,
                                           below=4)
    assert chosen.micro_batch_size == 2 and "not 4 or more" in line
    # 12 sequences: halving 3 gives 1 (the largest divisor at most half)
    assert faults.fit_below(3, 3, 12, "oom.json", lines.append) == 1
    with pytest.raises(gpt2.UserError, match="nothing smaller to halve to"):
        faults.fit_below(1, 1, 16, "oom.json", lines.append)
    with pytest.raises(gpt2.UserError, match="nothing smaller to halve to"):
        faults.fit_below("auto", 1, 16, "oom.json", lines.append)


def test_an_unreadable_record_or_one_from_other_settings_is_named_and_ignored(tmp_path):
    cfg = gpt2.Config(micro_batch_size=8)
    path = tmp_path / faults.OOM_FILE
    path.write_text('[{"micro_batch_size": 8, "sett')  # cut short
    lines = []
    assert faults.oom_limit(str(tmp_path), faults.memory_fingerprint(cfg, 1), lines.append) is None
    assert len(lines) == 1 and "cannot be read" in lines[0] and str(path) in lines[0]
    assert path.read_text() == '[{"micro_batch_size": 8, "sett'  # left as it was
    # a new record keeps the unreadable one beside it rather than overwrite it
    faults.record_oom(str(tmp_path), {"micro_batch_size": 8, "settings": faults.memory_fingerprint(cfg, 1)})
    assert (tmp_path / "oom.json.unreadable").read_text() == '[{"micro_batch_size": 8, "sett'
    other = faults.memory_fingerprint(gpt2.Config(micro_batch_size=8, n_layer=24), 1)
    lines.clear()
    assert faults.oom_limit(str(tmp_path), other, lines.append) is None
    assert len(lines) == 1 and "n_layer=12" in lines[0] and "other settings" in lines[0]


def test_a_restart_whose_halved_micro_batch_would_be_zero_stops_with_one_line(shards, tmp_path):
    args = [*TINY_ANY_BATCH, f"--data_dir={shards}", f"--log_dir={tmp_path}", "--max_steps=2", "--val_every=0",
            "--micro_batch_size=1"]
    cfg = gpt2.Config()
    apply_overrides(cfg, args)
    faults.record_oom(str(tmp_path), {"micro_batch_size": 1, "settings": faults.memory_fingerprint(cfg, 1)})
    proc = run_gpt2(*args, check=False, in_process=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: micro_batch_size=1 ran out of memory in this log_dir") and \
        "--activation_checkpointing=1" in proc.stderr


def test_stop_request_notes_signals_and_puts_the_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = faults.StopRequest()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handlers run between bytecodes
        assert stop.requested and stop.received == ["SIGUSR1", "SIGTERM"]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_request_outside_the_main_thread_leaves_the_handlers_alone():
    import threading

    before, made = signal.getsignal(signal.SIGTERM), []
    thread = threading.Thread(target=lambda: made.append(faults.StopRequest()))  # signal.signal would raise there
    thread.start()
    thread.join()
    assert made and made[0].previous == {} and signal.getsignal(signal.SIGTERM) is before
