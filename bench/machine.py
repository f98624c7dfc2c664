"""What a benchmark runs on: the machine in one line, which every benchmark prints above its figures, and the
processes a benchmark started, found in /proc."""

import os
import platform


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        return platform.processor() or platform.machine()


def describe(device=None):
    """CPU model and cores, torch's version and threads, and the GPU when `device` is a CUDA device."""
    import torch

    gpu = f" | {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return (f"{cpu_name()} | {os.cpu_count()} cores, {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
            f"python {platform.python_version()}{gpu}")


def descendants(pid):
    """The pids of every process below pid, read from /proc (empty where there is no /proc). Taken before anything is
    stopped: once torchrun ends, its workers belong to init and nothing links them to it any more."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
