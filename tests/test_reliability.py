"""Crash consistency, fault tolerance under torchrun, non-finite losses and the bad-input catalogue of gpt2.py.

The runs that are killed are real processes; the others go through gpt2.py's command line in the test process
(conftest.gpt2_here), which gives the same numbers bit for bit, seconds cheaper. One error and --debug's traceback are
checked on a real process's stderr.
"""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, read_log, run_gpt2, write_shards

from cli import merge_settings
from gpt2 import list_checkpoints

# the crash runs use a bigger vocabulary, so that writing a checkpoint takes long enough to be caught doing it. 30
# steps: the run gets to step 8 between the kills below (at most 6 steps each), the rest is left for the run that finishes
CRASH = [a for a in TINY if not a.startswith("--vocab_size")] + [
    "--vocab_size=50304", "--max_steps=30", "--val_every=4", "--val_tokens=128", "--checkpoint_every=2",
    "--keep_checkpoints=2", "--warmup_steps=3", "--total_batch_size=128", "--max_lr=3e-3"]


@pytest.fixture
def big_vocab_shards(tmp_path):
    data_dir = str(tmp_path / "data")
    write_shards(data_dir, [4000], "val", vocab_size=50257, seed=1)
    write_shards(data_dir, [9000, 3000], "train", vocab_size=50257, seed=2, start_index=1)
    return data_dir


def start_gpt2(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "gpt2.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc, condition, deadline_s=300):
    """SIGKILLs proc as soon as condition() holds; returns what condition() says with proc stopped (SIGSTOP) just
    before the kill, so a check made then cannot race the process; None if the process ended first. The deadline
    only guards against a hang: every condition used here is reached by the run's own progress, not by time."""
    end = time.time() + deadline_s
    while proc.poll() is None and time.time() < end:
        if condition():
            proc.send_signal(signal.SIGSTOP)
            held = condition()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return held
        time.sleep(0.001)
    proc.wait()
    return None


def logged_step(log_dir):
    """The last step with a train line in log_dir/log.txt (-1 if none yet)."""
    try:
        with open(log_dir / "log.txt") as f:
            steps = [int(line.split()[0]) for line in f if line.endswith("train\n") or " train " in line]
    except (OSError, ValueError):
        return -1
    return max(steps, default=-1)


@pytest.mark.slow
def test_sigkill_at_random_moments_and_during_checkpoint_writes(big_vocab_shards, tmp_path):
    straight = tmp_path / "straight"
    run_gpt2(*CRASH, f"--data_dir={big_vocab_shards}", f"--log_dir={straight}", in_process=True)

    crashed = tmp_path / "crashed"
    args = [*CRASH, f"--data_dir={big_vocab_shards}", f"--log_dir={crashed}", "--init_from=resume"]
    rng = random.Random(0)
    tmp_seen = lambda: any(n.endswith(".tmp") and n.startswith("model_") for n in os.listdir(crashed))
    kills = during_write = 0
    # kills are placed by the run's progress (a step logged, a temporary file present), never by the clock, so that a
    # loaded machine changes how long this takes but not what it tests
    for attempt in range(40):
        if kills >= 6 and during_write >= 3:
            break
        start = list_checkpoints(crashed)[-1][0] if crashed.exists() and list_checkpoints(crashed) else 0
        if attempt % 2 and crashed.exists():  # a temporary file left by the last kill is not this run's write
            for name in os.listdir(crashed):
                if name.endswith(".tmp"):
                    os.remove(crashed / name)
        proc = start_gpt2(*args)
        if attempt % 2:  # mid-write: as soon as a checkpoint's temporary file appears
            held = kill_when(proc, lambda: crashed.exists() and tmp_seen())
            during_write += bool(held)
        else:  # a few steps after where it resumed, mid-step or between steps
            target = start + rng.randint(1, 5)
            held = kill_when(proc, lambda target=target: logged_step(crashed) >= target)
        if held is None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        kills += 1
    assert kills >= 6 and during_write >= 3, (kills, during_write)
    run_gpt2(*args, in_process=True)  # finish whatever is left
    assert read_log(crashed) == read_log(straight)
    with open(straight / "log.txt") as a, open(crashed / "log.txt") as b:
        assert a.read() == b.read()
    assert not [n for n in os.listdir(crashed) if n.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_and_the_run_completes(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", "--max_steps=12", "--val_every=3", "--val_tokens=128",
              "--checkpoint_every=3", "--total_batch_size=128", "--micro_batch_size=2", "--init_from=resume"]
    straight = tmp_path / "straight"
    run_gpt2(*common, f"--log_dir={straight}", torchrun_ranks=2)

    restarted = tmp_path / "restarted"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           os.path.join(ROOT, "gpt2.py"), *merge_settings([*common, f"--log_dir={restarted}"])]
    torchrun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def workers():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if ppid == torchrun.pid and "gpt2.py" in cmdline:
                found.append(int(pid))
        return found

    try:
        deadline = time.time() + 240
        while not list_checkpoints(restarted) and time.time() < deadline and torchrun.poll() is None:
            time.sleep(0.05)
        assert list_checkpoints(restarted), "no checkpoint appeared"
        victims = workers()
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)  # one rank dies mid-run
        out, _ = torchrun.communicate(timeout=300)
    finally:  # never leave a hung group behind
        if torchrun.poll() is None:
            for pid in workers():
                os.kill(pid, signal.SIGKILL)
            torchrun.kill()
    assert torchrun.returncode == 0, out
    assert "resuming from" in out
    assert list_checkpoints(restarted)[-1][0] == 12
    assert read_log(restarted) == read_log(straight)


def one_line_error(*args, in_process=True):
    proc = run_gpt2(*args, check=False, in_process=in_process)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def snapshot(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def trained(shards, log_dir, *extra):
    run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=3", "--val_every=0",
             "--checkpoint_every=3", *extra, in_process=True)
    return snapshot(log_dir)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    log_dir = tmp_path / "log"
    # a learning rate this large makes the first update overflow the next forward pass
    args = [*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=5", "--val_every=0",
            "--checkpoint_every=1", "--warmup_steps=1", "--max_lr=1e30"]
    err = one_line_error(*args, in_process=False)  # a real process: the one line a shell sees after training began
    assert "step 1: loss nan" in err and "--skip_nonfinite=1" in err
    assert [s for s, _ in list_checkpoints(log_dir)] == [1]
    assert read_log(log_dir) == {(0, "train"): pytest.approx(read_log(log_dir)[(0, "train")])}
    # skipping instead: the run ends, and no step after the bad one changes the weights
    out = run_gpt2(*args, "--skip_nonfinite=1", "--init_from=resume", in_process=True).stdout
    assert "non-finite, step skipped" in out
    assert [s for s, _ in list_checkpoints(log_dir)][-1] == 5


def test_keep_checkpoints_keeps_the_newest(shards, tmp_path):
    trained(shards, tmp_path / "log", "--max_steps=5", "--checkpoint_every=1", "--keep_checkpoints=2")
    assert [s for s, _ in list_checkpoints(tmp_path / "log")] == [4, 5]


def test_truncated_checkpoint_is_refused_and_left_alone(shards, tmp_path):
    log_dir = tmp_path / "log"
    trained(shards, log_dir)
    path = log_dir / "model_00003.pt"
    path.write_bytes(path.read_bytes()[:2000])
    before = snapshot(log_dir)
    err = one_line_error(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--init_from=resume")
    assert "cannot load checkpoint" in err and "model_00003.pt" in err
    assert snapshot(log_dir) == before


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_that_would_run_code_is_refused(shards, tmp_path):
    evil = tmp_path / "model_00001.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    for how in (f"--init_from={evil}", "--init_from=resume"):
        err = one_line_error(*TINY, f"--data_dir={shards}", f"--log_dir={tmp_path}", how)
        assert "refused to load checkpoint" in err and "could run code" in err
        assert not (tmp_path / "PWNED").exists() and not os.path.exists(os.path.join(ROOT, "PWNED"))


def test_unwritable_log_dir(shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = one_line_error(*TINY, f"--data_dir={shards}", f"--log_dir={blocker / 'log'}", "--max_steps=1")
    assert "cannot write to log_dir" in err and "a_file/log" in err
    assert blocker.read_text() == "not a directory"


def test_bad_data_from_the_command_line(shards, tmp_path):
    common = [*TINY, f"--log_dir={tmp_path / 'log'}", "--max_steps=1"]
    assert "does not exist: run python fineweb.py" in one_line_error(*common, f"--data_dir={tmp_path / 'none'}")
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    (val_only / "edufineweb_val_000000.npy").write_bytes((tmp_path / "data" / "edufineweb_val_000000.npy").read_bytes())
    assert "no train shards" in one_line_error(*common, f"--data_dir={val_only}")
    train_only = tmp_path / "data"
    os.remove(train_only / "edufineweb_val_000000.npy")
    assert "no val shards" in one_line_error(*common, f"--data_dir={train_only}")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "edufineweb_val_000000.npy").write_bytes(b"\x93NUMPY garbage")
    (corrupt / "edufineweb_train_000001.npy").write_bytes(b"\x93NUMPY garbage")
    assert "cannot read shard" in one_line_error(*common, f"--data_dir={corrupt}")


def test_traceback_only_with_debug(tmp_path):
    proc = run_gpt2("--data_dir=/nonexistent", "--debug=1", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
