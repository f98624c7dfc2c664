"""What a benchmark ran on, in one line: every benchmark prints it above its figures."""

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
