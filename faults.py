"""
What a cluster does to a training run, and how gpt2.py answers it: an out-of-memory error on one rank while its
peers may be inside a collective with it, preemption (a scheduler's SIGTERM or SIGUSR1 before it kills), and a
container's memory limit.

Out of memory mid-collective. torch cannot take back half a collective: a rank that failed inside FSDP's gathers or
DDP's last backward must not enter another one (NCCL checks no message sizes, so the next collective would pair with
the wrong one: a hang, or gradients summed with the wrong buffers). The failing rank records the failure in
log_dir/oom.json (record_oom), prints one line and exits; torchrun stops the other ranks, and under --max-restarts
the restarted run reads the record (oom_limit) and trains from the newest checkpoint at about half the micro batch.

Preemption. StopRequest turns SIGTERM and SIGUSR1 into a flag; the training loop folds it into the all-reduce its
step already makes, so every rank stops after the same step, writes the usual checkpoint and exits with status
PREEMPTED.

Container memory limits. memory_limits reads the limits of every memory cgroup holding this process (v2 and v1, its
own and its ancestors'), which gpt2.free_memory takes into account: a container's limit, not the host's memory, is
what the kernel enforces.

Imports nothing but cli and the standard library: gpt2.py imports this module, never the reverse.
"""

import json
import os
import re
import signal
import sys
import threading
import time

from cli import UserError

OOM_FILE = "oom.json"
PREEMPTED = 75  # the exit status of a preempted run: sysexits' EX_TEMPFAIL, "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # spot instances and SLURM's time limit; SLURM's --signal=USR1@N

# what fits a model whose micro batch of 1 ran out of memory, for the lines that say so
LESS_MEMORY = "--activation_checkpointing=1, --loss_impl=chunked, --fsdp=1 or a smaller model"

# the settings that decide a micro batch's memory: a failure recorded under others says nothing about this run. Not the
# loss or activation checkpointing, which --micro_batch_size=auto may turn on by itself: a record made with them (so
# with less memory per sequence) still bounds a run that starts without them, a little more than it must
MEMORY_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "total_batch_size", "dtype", "fsdp",
               "optimizer", "compile")


def smaller_micro_batch(per_rank, micro_batch_size):
    """About half of micro_batch_size: the largest micro batch at most its half that divides per_rank, this rank's
    sequences per step (so the step's tokens stay the same); None below 1."""
    return next((b for b in range(micro_batch_size // 2, 0, -1) if per_rank % b == 0), None)


def memory_fingerprint(cfg, world_size):
    return {**{k: getattr(cfg, k) for k in MEMORY_KEYS}, "world_size": world_size}


def read_oom_records(log_dir):
    """(the records in log_dir/oom.json, None if there is no such file), or a UserError-worthy reason it cannot be
    read as a list of records."""
    path = os.path.join(log_dir, OOM_FILE)
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("micro_batch_size"), int)
                                                and isinstance(r.get("settings"), dict) for r in records):
        return None, "not a list of records with micro_batch_size and settings"
    return records, None


def record_oom(log_dir, record):
    """Adds `record` (a dict: micro_batch_size, settings, step, rank, where) to log_dir/oom.json, atomically: a file
    of this rank's own is written and renamed over it, so ranks that fail together never leave half a file. A record
    that cannot be read is kept beside it (oom.json.unreadable), never overwritten."""
    path = os.path.join(log_dir, OOM_FILE)
    records, error = read_oom_records(log_dir)
    if error:
        os.replace(path, path + ".unreadable")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump([*(records or []), {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}], f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def oom_limit(log_dir, fingerprint, say):
    """The smallest micro batch that ran out of memory in log_dir under these settings (fingerprint), or None. A
    record that cannot be read, or one from a run with other settings, is named in one line and ignored."""
    path = os.path.join(log_dir, OOM_FILE)
    records, error = read_oom_records(log_dir)
    if error:
        say(f"warning: ignoring {path}, which cannot be read ({error}); it is left as it is")
        return None
    ours = [r["micro_batch_size"] for r in records or [] if r["settings"] == fingerprint]
    if records and not ours:
        theirs = records[-1]["settings"]
        differ = ", ".join(f"{k}={theirs.get(k)!r}" for k in fingerprint if theirs.get(k) != fingerprint[k])
        say(f"ignoring {path}: its out-of-memory records come from a run with other settings ({differ})")
    return min(ours) if ours else None


def fit_below(micro_batch_size, limit, per_rank, path, say):
    """An explicit micro_batch_size, halved until it is below `limit` (one that ran out of memory, recorded in `path`),
    with a line saying so; "auto" as it is (choose_micro_batch stays below the limit). A UserError when even 1 ran
    out, as nothing is smaller."""
    b = micro_batch_size
    if b == "auto" and limit > 1 or b != "auto" and b < limit:
        return b
    smaller = b if b != "auto" else 1
    while smaller is not None and smaller >= limit:
        smaller = smaller_micro_batch(per_rank, smaller)
    if smaller is None:
        raise UserError(f"micro_batch_size={limit} ran out of memory in this log_dir ({path}) and there is nothing "
                        f"smaller to halve to: resume with {LESS_MEMORY}")
    say(f"micro_batch_size={b}: {limit} ran out of memory in this run ({path}), so {smaller} "
        f"({per_rank // smaller} micro-steps per rank)")
    return smaller


class OutOfMemoryInCollective(Exception):
    """An out-of-memory error where this rank's peers may be inside a collective with it (gpt2.forward_backward)."""

    def __init__(self, where, micro_batch_size):
        super().__init__(f"out of memory in the {where} at micro_batch_size={micro_batch_size}")
        self.where, self.micro_batch_size = where, micro_batch_size


def leave_after_oom(log_dir, error, record, per_rank, resumes):
    """Where a collective may be in flight: records the failure `error` (an OutOfMemoryInCollective) in log_dir, with
    `record` (step, rank, settings), says so in one line and exits at once, entering no collective (not even the
    process group's teardown). torchrun then stops the other ranks, and a restart with --init_from=resume (`resumes`)
    trains from the newest checkpoint at about half the micro batch, of the per_rank sequences per step."""
    b = error.micro_batch_size
    path = record_oom(log_dir, {"micro_batch_size": b, "where": error.where, **record})
    smaller = smaller_micro_batch(per_rank, b)
    restarts_left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if smaller is None:
        after = f"nothing smaller to halve to: resume with --init_from=resume and {LESS_MEMORY}"
    elif restarts_left > 0 and resumes:
        after = f"torchrun restarts the run from the newest checkpoint at micro_batch_size={smaller}"
    else:
        after = f"continue with --init_from=resume (the same command otherwise): it resumes at micro_batch_size={smaller}"
    sys.stdout.flush()
    sys.stderr.write(f"error: rank {record['rank']}: {error} (step {record['step']}), where the other ranks may be inside "
                     f"a collective with it: recorded in {path}, stopping the run: {after}\n")
    sys.stderr.flush()
    os._exit(1)


class Preempted(Exception):
    """Every rank stopped on a SIGTERM or SIGUSR1 after a step, its checkpoint written (gpt2.run_training); only rank
    0 (is_master) says so."""

    def __init__(self, message, is_master):
        super().__init__(message)
        self.is_master = is_master


class StopRequest:
    """SIGTERM and SIGUSR1 ask the run to stop: the handler only notes the signal (whatever the process is doing, a
    checkpoint being written included, goes on), and the training loop stops at the next step boundary. A second
    signal is noted too and changes nothing. restore() puts the previous handlers back."""

    def __init__(self, signals=STOP_SIGNALS):
        self.received = []  # the names of the signals, in order
        if threading.current_thread() is not threading.main_thread():
            signals = ()  # Python runs handlers in the main thread only, and refuses them elsewhere: the defaults stay
        self.previous = {s: signal.signal(s, self._note) for s in signals}

    def _note(self, signum, frame):
        self.received.append(signal.Signals(signum).name)  # nothing else here: no print, no I/O in a handler

    @property
    def requested(self):
        return bool(self.received)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# --- the memory a container allows ---


# Each memory cgroup's limits and usage. cgroup v2 has two limits: memory.max, above which the kernel's OOM killer
# acts, and memory.high, above which it throttles the group's allocations and reclaims its memory hard. Most tools read
# memory.max alone; we take the lower of the two, because a training step's tensors cannot be reclaimed (no swap, or
# swapping them is no better), so a run sized past memory.high is not stopped but crawls. v1 has one limit.
# The usage counts the page cache too, which the kernel drops before it kills: the inactive file pages in memory.stat
# are left out, as Kubernetes and docker stats count a container's working set.
CGROUP_FILES = {"cgroup2": (("memory.max", "memory.high"), "memory.current", "inactive_file"),
                "cgroup": (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file")}


def read_text(path):
    """The file's text, or None where it cannot be read (missing, not permitted, not text)."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_bytes(path):
    """A cgroup file's number of bytes, or None for no limit: "max" (v2), 2**60 or more (v1 writes 9223372036854771712),
    or a file that is missing or holds something else."""
    try:
        n = int(read_text(path) or "")
    except ValueError:
        return None
    return n if n < 2**60 else None


def cgroup_dirs(root="/"):
    """[(fs, dir)]: the directory of each memory cgroup that holds this process, its own first, then each ancestor up
    to where its hierarchy is mounted, for cgroup v2 (fs "cgroup2") and v1's memory controller (fs "cgroup"); dir is
    the path on this machine, each file read under root.

    /proc/self/cgroup names the process's cgroup in each hierarchy ("0::/path" for v2, "N:memory:/path" or
    "N:memory,xyz:/path" for v1) relative to the hierarchy's root, and /proc/self/mountinfo says where that hierarchy is
    mounted (field 5) and which of its cgroups the mount shows as its top (field 4). So the process's directory is its
    path less the mount's root, under the mount point. Inside a container that directory is often not there (a cgroup
    namespace of its own, or only the container's cgroup mounted): then the mount point is the process's cgroup."""
    at = lambda path: os.path.join(root, path.lstrip("/"))
    paths = {}  # fs -> the process's cgroup in that hierarchy
    for line in (read_text(at("/proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and not parts[1]:
            paths["cgroup2"] = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            paths["cgroup"] = parts[2]
    dirs = []
    for line in (read_text(at("/proc/self/mountinfo")) or "").splitlines():
        mount, _, fs = line.partition(" - ")  # "id parent major:minor root mount_point options..." - "type source options"
        mount, fs = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f) for f in mount.split()], fs.split()
        if len(mount) < 5 or len(fs) < 3 or fs[0] not in paths or (fs[0] == "cgroup" and "memory" not in fs[2].split(",")):
            continue
        path, mount_root, mount_point = paths[fs[0]], mount[3], os.path.normpath(mount[4])
        inside = path == mount_root or path.startswith(mount_root.rstrip("/") + "/")
        d = os.path.normpath(os.path.join(mount_point, os.path.relpath(path, mount_root))) if inside else mount_point
        if os.path.commonpath([d, mount_point]) != mount_point or not os.path.isdir(at(d)):
            d = mount_point
        while True:
            dirs.append((fs[0], at(d)))
            if d == mount_point:
                break
            d = os.path.dirname(d)
    return dirs


def memory_limits(root="/"):
    """[(dir, limit, usage)] in bytes for each memory cgroup holding this process (cgroup_dirs) that sets a limit, the
    usage less the inactive page cache; a file that is missing, unreadable or garbled counts as no limit there (and
    as no page cache, in memory.stat)."""
    found = []
    for fs, d in cgroup_dirs(root):
        limit_names, usage_name, cache_name = CGROUP_FILES[fs]
        limit = min((n for n in (read_bytes(os.path.join(d, name)) for name in limit_names) if n is not None), default=None)
        usage = read_bytes(os.path.join(d, usage_name))
        cache = re.search(rf"^{cache_name} (\d+)$", read_text(os.path.join(d, "memory.stat")) or "", re.M)
        if limit is not None and usage is not None:
            found.append((d, limit, max(0, usage - (int(cache[1]) if cache else 0))))
    return found
