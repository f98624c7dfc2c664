"""What the machine allows a rank: the memory limit of its own cgroup and its ancestors (v1 and v2, read from trees
written here, and the real machine's), its GPU under per-process launchers, and the spike guard's host copy, one
buffer the size of the state."""

import os
import types

import numpy as np
import pytest
import torch

import cli
import faults
import gpt2

GiB = 2**30
CPU = torch.device("cpu")
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,relatime shared:17 - cgroup cgroup rw,memory\n"
V2_MOUNT = "30 23 0:26 {root} /sys/fs/cgroup rw,nosuid,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
UNLIMITED_V1 = 9223372036854771712  # what v1 writes for no limit (2**63 less a page)


def machine(tmp_path, cgroup=None, mountinfo=None, files=(), available=64 * GiB):
    """A tree under tmp_path with /proc/self/cgroup, /proc/self/mountinfo, /proc/meminfo (MemAvailable: available
    bytes) and the cgroup files {path: content}; each left out when None."""
    def write(path, text):
        path = tmp_path / path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    if available is not None:
        write("/proc/meminfo", f"MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   "
                               f"{available // 1024} kB\nBuffers:           0 kB\n")
    if cgroup is not None:
        write("/proc/self/cgroup", cgroup)
    if mountinfo is not None:
        write("/proc/self/mountinfo", mountinfo)
    for path, text in dict(files).items():
        write(path, f"{text}\n")
    return str(tmp_path)


# --- the memory limit ---

def test_a_v1_limit_is_the_limit_less_the_usage_and_the_ranks_share_it(tmp_path):
    # a hybrid machine: v1's memory controller, and a cgroup2 mount without it
    job = "/sys/fs/cgroup/memory/slurm/job_7"
    root = machine(tmp_path, "12:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7\n0::/\n",
                   V1_MOUNT + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
                   {f"{job}/memory.limit_in_bytes": 4 * GiB, f"{job}/memory.usage_in_bytes": GiB,
                    "/sys/fs/cgroup/memory/slurm/memory.limit_in_bytes": UNLIMITED_V1,
                    "/sys/fs/cgroup/memory/slurm/memory.usage_in_bytes": 5 * GiB,
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes": UNLIMITED_V1,
                    "/sys/fs/cgroup/memory/memory.usage_in_bytes": 9 * GiB,
                    "/sys/fs/cgroup/unified/cgroup.procs": ""})
    assert faults.memory_limits(root) == [(os.path.join(root, job.lstrip("/")), 4 * GiB, GiB)]
    assert gpt2.free_memory(CPU, root=root) == 3 * GiB
    assert gpt2.free_memory(CPU, local_world_size=2, root=root) == 3 * GiB // 2


@pytest.mark.parametrize("parent, child, free", [((2 * GiB, 1.5 * GiB), (8 * GiB, GiB), 0.5 * GiB),  # the parent's
                                                 ((8 * GiB, 1.5 * GiB), (GiB, 0.25 * GiB), 0.75 * GiB)])  # the child's
def test_v2_the_least_room_over_the_cgroup_and_its_ancestors(tmp_path, parent, child, free):
    (parent_max, parent_current), (child_max, child_current) = parent, child
    root = machine(tmp_path, "0::/user.slice/run.scope\n", V2_MOUNT.format(root="/"),
                   {"/sys/fs/cgroup/user.slice/memory.max": int(parent_max),
                    "/sys/fs/cgroup/user.slice/memory.current": int(parent_current),
                    "/sys/fs/cgroup/user.slice/run.scope/memory.max": int(child_max),
                    "/sys/fs/cgroup/user.slice/run.scope/memory.current": int(child_current),
                    "/sys/fs/cgroup/user.slice/run.scope/memory.high": "max",
                    "/sys/fs/cgroup/memory.current": 20 * GiB})  # the root cgroup has no limit files
    assert gpt2.free_memory(CPU, root=root) == int(free)
    assert len(faults.memory_limits(root)) == 2


def test_v2_memory_high_counts_as_a_limit(tmp_path):
    # above memory.high the kernel throttles rather than kills: a run sized past it would crawl
    root = machine(tmp_path, "0::/job\n", V2_MOUNT.format(root="/"),
                   {"/sys/fs/cgroup/job/memory.max": 6 * GiB, "/sys/fs/cgroup/job/memory.high": 3 * GiB,
                    "/sys/fs/cgroup/job/memory.current": GiB})
    assert gpt2.free_memory(CPU, root=root) == 2 * GiB


def test_no_limit_leaves_the_available_ram(tmp_path):
    v2 = machine(tmp_path / "v2", "0::/job\n", V2_MOUNT.format(root="/"),
                 {"/sys/fs/cgroup/job/memory.max": "max", "/sys/fs/cgroup/job/memory.high": "max",
                  "/sys/fs/cgroup/job/memory.current": GiB}, available=10 * GiB)
    v1 = machine(tmp_path / "v1", "4:memory:/job\n", V1_MOUNT,
                 {"/sys/fs/cgroup/memory/job/memory.limit_in_bytes": UNLIMITED_V1,
                  "/sys/fs/cgroup/memory/job/memory.usage_in_bytes": GiB}, available=10 * GiB)
    for root in v2, v1:
        assert faults.memory_limits(root) == []
        assert gpt2.free_memory(CPU, root=root) == 10 * GiB
    # a limit above the available RAM leaves the RAM
    bigger = machine(tmp_path / "bigger", "0::/job\n", V2_MOUNT.format(root="/"),
                     {"/sys/fs/cgroup/job/memory.max": 100 * GiB, "/sys/fs/cgroup/job/memory.current": GiB},
                     available=10 * GiB)
    assert gpt2.free_memory(CPU, root=bigger) == 10 * GiB


def test_missing_or_garbled_files_are_no_limit(tmp_path):
    assert gpt2.free_memory(CPU, root=machine(tmp_path / "bare", available=12 * GiB)) == 12 * GiB
    assert gpt2.free_memory(CPU, root=machine(tmp_path / "nothing", available=None)) == 8 * GiB  # not Linux
    garbled = machine(tmp_path / "garbled", "no colons here\n0::/job\n\x00\x01:::\n", "short line\n - \n"
                      + V2_MOUNT.format(root="/"), {"/sys/fs/cgroup/job/memory.max": "lots",
                                                    "/sys/fs/cgroup/job/memory.current": GiB}, available=12 * GiB)
    assert gpt2.free_memory(CPU, root=garbled) == 12 * GiB
    no_usage = machine(tmp_path / "no_usage", "0::/job\n", V2_MOUNT.format(root="/"),
                       {"/sys/fs/cgroup/job/memory.max": GiB}, available=12 * GiB)
    assert gpt2.free_memory(CPU, root=no_usage) == 12 * GiB


def test_in_a_container_the_mount_point_is_the_process_cgroup(tmp_path):
    ctr = "/kubepods.slice/pod1.slice/cri-abc.scope"
    files = {"/sys/fs/cgroup/memory.max": 5 * GiB, "/sys/fs/cgroup/memory.current": 2 * GiB}
    # only the container's own cgroup is mounted: the mount's root is the process's path
    own = machine(tmp_path / "own", f"0::{ctr}\n", V2_MOUNT.format(root=ctr), files)
    # the host's root is mounted but the process's directory is not under it (a cgroup namespace of its own); a
    # cgroup of the container's that shares a name with the host's path is not the process's
    namespaced = machine(tmp_path / "namespaced", f"0::{ctr}\n", V2_MOUNT.format(root="/"),
                         {**files, "/sys/fs/cgroup/kubepods.slice/memory.max": GiB,
                          "/sys/fs/cgroup/kubepods.slice/memory.current": 0})
    # the process's path lies outside the mount's root
    outside = machine(tmp_path / "outside", "0::/../../other\n", V2_MOUNT.format(root="/kubepods.slice"), files)
    for root in own, namespaced, outside:
        assert faults.memory_limits(root) == [(os.path.join(root, "sys/fs/cgroup"), 5 * GiB, 2 * GiB)], root
        assert gpt2.free_memory(CPU, root=root) == 3 * GiB
    # the mount's root is a prefix of the process's path: the rest of the path is under the mount point
    nested = machine(tmp_path / "nested", f"0::{ctr}/job\n", V2_MOUNT.format(root=ctr),
                     {**files, "/sys/fs/cgroup/job/memory.max": 4 * GiB, "/sys/fs/cgroup/job/memory.current": int(1.5 * GiB)})
    assert gpt2.free_memory(CPU, root=nested) == int(2.5 * GiB)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads Linux's /proc/meminfo")
def test_free_memory_on_this_machine_is_at_most_the_available_ram():
    free = gpt2.free_memory(CPU)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < free <= available * 1.05  # MemAvailable moves between the two reads


# --- the GPU of each rank ---

def test_each_rank_takes_its_gpu_among_those_it_sees():
    # srun --gpus-per-task=1: each process sees one GPU, renumbered 0
    assert [gpt2.local_gpu(r, 1) for r in range(8)] == [0] * 8
    # two per task
    assert [gpt2.local_gpu(r, 2) for r in range(4)] == [0, 1, 0, 1]
    # torchrun on an 8-GPU machine: every process sees all eight
    assert [gpt2.local_gpu(r, 8) for r in range(8)] == [0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(cli.UserError, match="no CUDA GPU for LOCAL_RANK=3 .*--device=cpu"):
        gpt2.local_gpu(3, 0)


# --- the spike guard's host copy ---

def tiny_training(tmp_path):
    """A tiny GPT, its AdamW after one step (so that it has state), a batch and the parts the spike guard reads."""
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 1e-8, "cpu")
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x_train_000001.npy", np.random.default_rng(0).integers(0, 64, 10_000).astype(np.uint16))
    loader = gpt2.DataLoaderLite(str(data), "train", 4, 32, vocab_size=64)
    parts = types.SimpleNamespace(raw_model=model, optimizer=optimizer, loader=loader,
                                  scaler=torch.amp.GradScaler("cpu", enabled=False))
    return model, optimizer, parts


def train(model, optimizer, loader, steps):
    for _ in range(steps):
        x, y = loader.next_batch()
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def state_tensors(model, optimizer):
    return [p.detach() for p in model.parameters()] + [v for s in optimizer.state.values() for v in s.values()
                                                      if torch.is_tensor(v)]


def test_host_copies_are_views_of_one_buffer_the_size_of_the_state(tmp_path, capsys):
    model, optimizer, parts = tiny_training(tmp_path)
    train(model, optimizer, parts.loader, 1)
    live = state_tensors(model, optimizer)
    state_bytes = sum(t.numel() * t.element_size() for t in live)
    assert len(live) > 3 * len(list(model.parameters()))  # exp_avg, exp_avg_sq and step for each parameter
    buffer, copies, pinned = gpt2.host_copies(live, pin=False)
    assert not pinned and buffer.dtype == torch.uint8
    assert state_bytes <= buffer.nbytes <= 1.01 * state_bytes
    start, spans = buffer.data_ptr(), []
    for copy, t in zip(copies, live, strict=True):
        assert copy.shape == t.shape and copy.dtype == t.dtype and copy.is_contiguous()
        assert copy.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert copy.data_ptr() % 64 == 0
        spans.append((copy.data_ptr(), copy.data_ptr() + copy.nbytes))
    spans.sort()
    assert spans[0][0] >= start and spans[-1][1] <= start + buffer.nbytes
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))  # none overlap
    for copy, t in zip(copies, live, strict=True):
        copy.copy_(t)
    assert all(torch.equal(copy, t) for copy, t in zip(copies, live, strict=True))

    # asked to page-lock where torch has no CUDA: pageable, with a warning
    _, _, pinned = gpt2.host_copies(live, pin=True)
    if not torch.cuda.is_available():
        assert not pinned and "warning: cannot page-lock" in capsys.readouterr().out


def test_the_spike_guard_puts_the_state_back_exactly(tmp_path):
    model, optimizer, parts = tiny_training(tmp_path)
    cfg = gpt2.Config(total_batch_size=4 * 32, spike_skip_steps=2)
    printed = []
    guard = gpt2.SpikeGuard(cfg, gpt2.Dist(0, 0, 1, CPU), parts, 0, types.SimpleNamespace(print=printed.append))
    assert "(pageable) for the parameters (the optimizer's state joins them" in printed[-1]
    assert guard.buffer.nbytes <= 1.01 * sum(p.numel() * p.element_size() for p in model.parameters())

    train(model, optimizer, parts.loader, 2)
    guard.snapshot(2)
    assert f"{guard.buffer.nbytes / 1e9:.2f} GB of host memory per rank (pageable) for the parameters and the " \
           f"optimizer's state" in printed[-1]
    live = state_tensors(model, optimizer)
    assert sum(t.numel() * t.element_size() for t in live) <= guard.buffer.nbytes <= \
        1.01 * sum(t.numel() * t.element_size() for t in live)
    storage = guard.buffer.untyped_storage().data_ptr()
    assert all(copy.untyped_storage().data_ptr() == storage for copy in guard.saved["tensors"])
    expected = [t.clone() for t in live]

    train(model, optimizer, parts.loader, 3)
    assert not all(torch.equal(t, e) for t, e in zip(state_tensors(model, optimizer), expected, strict=True))
    guard.restore()
    after = state_tensors(model, optimizer)
    assert len(after) == len(expected)
    for t, e in zip(after, expected, strict=True):
        assert torch.equal(t, e)
    assert parts.loader.position == 2 * 4 * 32

    train(model, optimizer, parts.loader, 1)
    guard.snapshot(3)  # the same layout: the same buffer
    assert guard.buffer.untyped_storage().data_ptr() == storage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locks memory for a CUDA GPU")
def test_page_locked_copies_on_the_gpu_come_back_exactly_and_lock_again_after_freeing():
    torch.manual_seed(0)
    live = [torch.randn(1000, 1000, device="cuda"), torch.randn(7, device="cuda").to(torch.bfloat16),
            torch.tensor(3.0, device="cuda")]
    for _ in range(3):  # freed memory was unlocked, so the same addresses lock again
        buffer, copies, pinned = gpt2.host_copies(live, pin=True)
        assert pinned
        for copy, t in zip(copies, live, strict=True):
            copy.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        assert all(torch.equal(copy, t.cpu()) for copy, t in zip(copies, live, strict=True))
        del buffer, copies


@pytest.mark.parametrize("fs", ["v1", "v2"])
def test_the_inactive_page_cache_is_not_counted_as_used(tmp_path, fs):
    # the kernel drops inactive file pages before it kills: a cgroup that read a large file is not full
    stat = "cache 1073741824\n{name} 805306368\nactive_file 268435456\n"
    if fs == "v1":
        job = "/sys/fs/cgroup/memory/job"
        root = machine(tmp_path, "4:memory:/job\n0::/\n", V1_MOUNT,
                       {f"{job}/memory.limit_in_bytes": 4 * GiB, f"{job}/memory.usage_in_bytes": 2 * GiB,
                        f"{job}/memory.stat": stat.format(name="total_inactive_file").strip()})
    else:
        job = "/sys/fs/cgroup/job"
        root = machine(tmp_path, "0::/job\n", V2_MOUNT.format(root="/"),
                       {f"{job}/memory.max": 4 * GiB, f"{job}/memory.current": 2 * GiB,
                        f"{job}/memory.stat": stat.format(name="inactive_file").strip()})
    assert gpt2.free_memory(CPU, root=root) == 4 * GiB - (2 * GiB - 768 * 2**20)
