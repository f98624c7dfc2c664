"""What the CUDA/NCCL path shares with the CPU, checked on the CPU: the torch floor, a resume under FSDP that holds
only this rank's shards, FSDP's bf16 mixed precision, compiled blocks under FSDP, a failed checkpoint write that
stops every rank, random states per device, and the MFU table."""

import os
import resource
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, read_log, run_gpt2

import gpt2
from cli import apply_overrides


def test_an_old_torch_stops_at_the_start_in_one_line():
    with pytest.raises(gpt2.UserError, match=r"torch 2\.5\.1\+cu124 is too old: this code needs torch >= 2\.\d+"):
        gpt2.check_torch_version("2.5.1+cu124")
    gpt2.check_torch_version(torch.__version__)  # the installed one is new enough
    major, minor = gpt2.TORCH_MIN
    gpt2.check_torch_version(f"{major}.{minor}.0")
    with pytest.raises(gpt2.UserError):
        gpt2.check_torch_version(f"{major}.{minor - 1}.9")


def test_mfu_peaks_match_the_whole_gpu_name():
    # "NVIDIA L40" is not an L4, and "H100 NVL" not an SXM H100: no substring matching
    assert gpt2.PEAK_FLOPS["NVIDIA L40"] != gpt2.PEAK_FLOPS["NVIDIA L4"]
    assert gpt2.PEAK_FLOPS["NVIDIA H100 NVL"] < gpt2.PEAK_FLOPS["NVIDIA H100 80GB HBM3"]
    assert gpt2.PEAK_FLOPS.get("NVIDIA L4 Ultra") is None and gpt2.peak_flops(torch.device("cpu")) is None


def test_random_states_are_this_devices_only():
    state = gpt2.rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    state = gpt2.rng_state(torch.device("cpu"))
    torch.rand(10)
    gpt2.set_rng_state(dict(state, cuda=[]), torch.device("cpu"))  # an older checkpoint's list of every GPU's
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_random_state_round_trip():
    device = torch.device("cuda", torch.cuda.current_device())
    state = gpt2.rng_state(device)
    expected = torch.rand(3, device=device)
    gpt2.set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), expected)


RESUME_CHECK = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
import gpt2

d = gpt2.setup_distributed("cpu")
cfg = gpt2.Config(**dict(gpt2.load_checkpoint({ckpt!r})["config"], data_dir={data!r}, fsdp=True))
ckpt = gpt2.load_checkpoint({ckpt!r})
whole = torch.load({ckpt!r}, weights_only=True)  # read in full, not mapped: the reference
loader = gpt2.DataLoaderLite(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size, d.rank, d.world_size,
                             cfg.vocab_size)
model, optimizer, scaler, step = gpt2.build_model(cfg, d, ckpt, None, loader, print, torch.float32)
named = dict(model.named_parameters())
index = {{id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}}
checked = 0
for name, p in named.items():
    rows = -(-p.shape[0] // d.world_size)
    expected = whole["model"][name][d.rank * rows:(d.rank + 1) * rows]  # torch.chunk's part for this rank
    assert torch.equal(p.to_local(), expected), name
    for key, value in optimizer.state[p].items():
        if key == "step":
            continue
        local = value.to_local()
        assert torch.equal(local, whole["optimizer"]["state"][index[id(p)]][key][d.rank * rows:(d.rank + 1) * rows])
        # the storage behind this rank's moment is its shard, not a view into the whole tensor
        assert local.untyped_storage().nbytes() <= (rows * p[0].numel() * 4), (name, key, local.untyped_storage().nbytes())
        checked += 1
assert model.transformer.wte.weight is model.lm_head.weight  # still tied
print(f"rank {{d.rank}}: {{checked}} moments checked, step {{step}}", flush=True)
gpt2.teardown_distributed()
"""


def torchrun(script, *args, ranks=2, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           script, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kwargs)


def test_fsdp_resume_keeps_only_this_ranks_shards(shards, tmp_path):
    log_dir = tmp_path / "log"
    # vocab 130: the embedding's 130 rows split 65/65; n_embd 34 so that rows and widths are uneven elsewhere too
    run_gpt2(*TINY, "--vocab_size=130", "--n_embd=34", f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=2",
             "--checkpoint_every=2", "--val_every=0", "--fsdp=1", torchrun_ranks=2)
    script = tmp_path / "check.py"
    script.write_text(RESUME_CHECK.format(root=ROOT, ckpt=str(log_dir / "model_00002.pt"), data=shards))
    out = torchrun(str(script))
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: 56 moments checked, step 2" in out.stdout  # 28 parameters, 2 moments each


def test_fsdp_bf16_mixed_precision_equals_a_bf16_model(shards, tmp_path):
    """FSDP's MixedPrecisionPolicy(param_dtype=bfloat16) computes the forward with bf16 weights and a bf16 residual
    stream, autocast off: its first loss is that of the model cast to bf16 in one process, on the same batch."""
    log_dir = tmp_path / "log"
    out = run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=3", "--val_every=0",
                   "--fsdp=1", "--dtype=bfloat16", "--max_lr=1e-2", "--warmup_steps=1", torchrun_ranks=2).stdout
    assert "bfloat16 (FSDP mixed precision)" in out
    cfg = gpt2.Config()
    apply_overrides(cfg, TINY)
    torch.manual_seed(cfg.seed)
    model = gpt2.GPT(gpt2.model_config(cfg)).to(torch.bfloat16)
    losses = []
    for rank in (0, 1):  # each rank's half of step 0's batch; the logged loss is their mean
        loader = gpt2.DataLoaderLite(shards, "train", cfg.micro_batch_size, cfg.block_size, rank, 2, cfg.vocab_size)
        with torch.no_grad():
            losses.append(model(*loader.next_batch())[1].item())
    log = read_log(log_dir)
    assert log[(0, "train")] == pytest.approx(sum(losses) / 2, abs=2e-3)
    # against float32 the bf16 loss is off by bf16's rounding, more than the tolerance above
    with torch.no_grad():
        model32 = model.float()
        loader = gpt2.DataLoaderLite(shards, "train", cfg.micro_batch_size, cfg.block_size, 0, 2, cfg.vocab_size)
        assert model32(*loader.next_batch())[1].item() != pytest.approx(losses[0], abs=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values()) and len(log) == 3


@pytest.mark.slow
def test_fsdp_compiled_blocks_log_the_losses_of_eager(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", "--max_steps=3", "--val_every=0"]
    eager = tmp_path / "eager"
    run_gpt2(*common, f"--log_dir={eager}", in_process=True)  # one eager process: FSDP equals it to 1e-5 (test_fsdp.py)
    for extra in ([], ["--activation_checkpointing=1"]):
        compiled = tmp_path / f"compiled{len(extra)}"
        run_gpt2(*[a for a in common if a != "--compile=0"], "--compile=1", *extra, f"--log_dir={compiled}", "--fsdp=1",
                 torchrun_ranks=2)
        a, b = read_log(eager), read_log(compiled)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # a full disk, for files over 64 KB


def test_a_failed_checkpoint_write_stops_every_rank_in_one_line(shards, tmp_path):
    log_dir = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "gpt2.py"), *TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=4",
           "--checkpoint_every=2", "--val_every=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, preexec_fn=limit_file_size)
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error: cannot write checkpoint")]
    assert len(errors) == 2, out.stdout + out.stderr  # rank 0 and rank 1, which waited for rank 0's write
    assert f"{log_dir}/model_00002.pt" in errors[0] and "--init_from=resume" in errors[0]
    assert not os.path.exists(log_dir / "model_00002.pt") and not os.path.exists(log_dir / "model_00002.pt.tmp")
    assert read_log(log_dir).keys() == {(0, "train"), (1, "train")}  # it stopped there
