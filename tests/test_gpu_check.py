"""bench/gpu_check.py's checks at their CPU size, and bench/bench_gpu.py's build-nanogpt baseline against our model.

The GPU itself is not here: these run the checks' logic (the runs, the comparisons, the PASS/FAIL lines and the
summary) on tiny shapes, and what the script does without CUDA.
"""

import os
import sys
import time

import pytest
import torch
from conftest import ROOT

import gpt2
from cli import apply_overrides

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402
import gpu_check  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    s = gpu_check.Setup(torch.device("cpu"), str(tmp_path), str(tmp_path / "data"), tiny=True, deadline=time.time() + 300)
    gpu_check.write_pattern_shards(s.data_dir, s.model["vocab_size"], 3000, 1000)
    return s


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")
def test_without_cuda_it_says_so_in_one_line(capsys):
    gpu_check.main(gpu_check.Config(), set())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gpu_check: no CUDA GPU here")


def test_a_run_and_its_resume_against_float32(setup, capsys):
    # bf16 autocast on the CPU against float32, 6 steps, stopped at 3 and resumed: what the bf16 check does for 50.
    # The float32 reference is trained here, in this process (the check runs it as python gpt2.py, as the others)
    reference = gpu_check.Reference(steps=6)
    cfg = gpt2.Config()
    log_dir = os.path.join(setup.work, "fp32_here")
    apply_overrides(cfg, gpu_check.gpt2_args(setup, log_dir, "--dtype=float32", "--compile=0", steps=6))
    gpt2.train(cfg, set())
    reference.losses = gpu_check.read_train_losses(log_dir)
    text = gpu_check.train_and_resume(setup, "bf16", ["--dtype=bfloat16", "--compile=0"], 6, 0.03, reference)
    assert "6 losses vs float32 eager" in text and "resumed at step 3: 3 losses bitwise equal" in text
    losses = gpu_check.read_train_losses(os.path.join(setup.work, "bf16"))
    assert sorted(losses) == list(range(6)) and losses != reference.losses  # bf16 is not float32, only close to it
    # the pattern is learnable: the loss falls from ln(512) within a few steps
    assert reference.losses[5] < reference.losses[0] < 6.3


def test_a_loss_out_of_tolerance_fails_naming_its_step():
    reference = {s: 5.0 - 0.1 * s for s in range(10)}
    close = {s: v * 1.01 for s, v in reference.items()}
    assert "worst 1.00%" in gpu_check.within("x", close, reference, 0.03, list(range(10)))
    off = close | {7: reference[7] * 1.05}
    with pytest.raises(gpu_check.CheckFailed, match=r"x: worst 5.00% \(step 7: .*over the 3% allowed"):
        gpu_check.within("x", off, reference, 0.03, list(range(10)))
    with pytest.raises(gpu_check.CheckFailed, match=r"non-finite loss at steps \[2\]"):
        gpu_check.within("x", close | {2: float("nan")}, reference, 0.03, list(range(10)))
    with pytest.raises(gpu_check.CheckFailed, match=r"no train loss logged for steps \[9\]"):
        gpu_check.within("x", {s: v for s, v in close.items() if s < 9}, reference, 0.03, list(range(10)))


def test_after_warmup_a_spike_on_another_step_passes_and_a_shifted_plateau_fails():
    # as seen on an H200: float32 and bf16 agree step by step through warmup, then spike on different steps
    reference = {s: 11.0 - 0.25 * s if s <= 10 else 8.35 for s in range(30)}
    spiky = dict(reference) | {15: 10.5, 24: 9.9}  # one spike in each window: 26% off at step 15
    with pytest.raises(gpu_check.CheckFailed, match=r"worst 25.7\d% \(step 15"):
        gpu_check.within("x", spiky, reference, 0.03, list(range(30)))
    text = gpu_check.tracks("x", spiky, reference | {21: 12.0}, 0.03, list(range(30)), 11)
    assert "worst 0.00% (step 0" in text and "then medians of 10 steps: worst 0.00%" in text
    shifted = {s: v * (1.05 if s >= 20 else 1) for s, v in reference.items()}
    with pytest.raises(gpu_check.CheckFailed, match=r"medians of 10 steps: worst 5.00% \(steps 21-29: 8.7675 vs 8.3500\)"):
        gpu_check.tracks("x", shifted, reference, 0.03, list(range(30)), 11)
    early = dict(reference) | {5: reference[5] * 1.04}  # warmup steps are compared one by one
    with pytest.raises(gpu_check.CheckFailed, match=r"worst 4.00% \(step 5"):
        gpu_check.tracks("x", early, reference, 0.03, list(range(30)), 11)


def test_a_torchrun_worker_stops_at_the_deadline(setup, tmp_path):
    # torchrun starts its worker in a session of its own: stopping torchrun's group alone would leave it running
    script = tmp_path / "worker.py"
    script.write_text("import time\ntime.sleep(20.5)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local_addr=127.0.0.1", "--nproc_per_node=1",
           str(script)]
    start = time.time()
    setup.deadline = start + 6
    with pytest.raises(gpu_check.CheckFailed, match="worker.py ran past the check's time budget and was stopped"):
        gpu_check.run_process(cmd, setup)
    assert time.time() - start < 6 + gpu_check.GRACE + 3  # not the worker's 20 s
    time.sleep(0.5)
    assert not [pid for pid in gpu_check.descendants(1) if b"worker.py" in open(f"/proc/{pid}/cmdline", "rb").read()]


def test_the_time_cap_skips_what_it_cannot_run_and_the_summary_prints(setup, capsys):
    verdict, status = gpu_check.run_checks(setup, ["greedy", "hellaswag"], time_cap=gpu_check.MIN_START - 1)
    lines = capsys.readouterr().out.splitlines()
    assert verdict == "PASS" and status == {"greedy": "SKIP", "hellaswag": "SKIP"}
    assert lines[0].startswith("SKIP greedy") and "not started: 14 s left of the 14 s time cap" in lines[0]
    assert lines[-1].startswith("gpu_check PASS: 0 passed, 0 failed, 2 skipped in ")


def test_no_tokenizer_file_fails_at_once_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))  # no demo/tiktoken_cache either
    start = time.time()
    with pytest.raises(gpu_check.CheckFailed, match=rf"no tokenizer file {gpu_check.R50K_CACHE_FILE} in TIKTOKEN_CACHE_DIR "
                                                   rf"\({tmp_path}\) or {tmp_path}/demo/tiktoken_cache/: bring"):
        gpu_check.tokenizer()
    assert time.time() - start < 1


def test_a_run_past_its_budget_is_stopped_with_its_children(setup, tmp_path):
    # as torchrun starts gpt2.py workers: a script that starts a child of its own and waits
    script = tmp_path / "launcher.py"
    script.write_text("import subprocess, time\nsubprocess.Popen(['sleep', '61.25'])\ntime.sleep(60)\n")
    start = setup.deadline = time.time() + 1
    with pytest.raises(gpu_check.CheckFailed, match="launcher.py ran past the check's time budget and was stopped"):
        gpu_check.run_process([sys.executable, str(script)], setup)
    assert time.time() - start < 10  # a child left running would hold the output pipe open for its 61 s
    time.sleep(0.2)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                left += [pid] if f.read() == b"sleep\x0061.25\x00" else []
        except OSError:
            pass
    assert not left  # the child went with its parent


def test_greedy_hellaswag_and_the_summary(setup, capsys):
    verdict, status = gpu_check.run_checks(setup, ["greedy", "hellaswag", "memory"])
    lines = capsys.readouterr().out.splitlines()
    assert verdict == "PASS" and status == {"greedy": "PASS", "hellaswag": "PASS", "memory": "SKIP"}, lines
    assert lines[0].startswith("PASS greedy") and "3 prompts x 16 tokens equal to transformers'" in lines[0]
    assert lines[1].startswith("PASS hellaswag") and "12 items" in lines[1]
    assert "0 picks moved" in lines[1] and "0 not near-ties" in lines[1]  # the CPU's float32 twice in this mode
    assert lines[2].startswith("SKIP memory")
    assert len(lines) == 4 and lines[3].startswith("gpu_check PASS: 2 passed, 0 failed, 1 skipped in ")


def test_hellaswag_items_are_in_the_real_format(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    gpu_check.write_hellaswag_items(path, 7)
    rows = gpt2.read_hellaswag_jsonl(path, "fix it")
    assert len(rows) == 7 and all(row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}" for row in rows)


def test_the_baseline_is_gpt2_as_build_nanogpt_writes_it():
    shape = dict(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(3)
    ours = gpt2.GPT(gpt2.GPTConfig(**shape))
    torch.manual_seed(3)
    theirs = bench_gpu.NanoGPT(**shape)
    # the same parameters, names and GPT-2 initialisation: from one seed, the same weights
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    # its loss is plain F.cross_entropy over the logits; ours (chunked on a CPU) gives the same loss and gradients
    x, y = torch.randint(0, 96, (2, 3, 16))
    _, loss = ours(x, y)
    logits, base_loss = theirs(x, y)
    assert logits.shape == (3, 16, 96)
    torch.testing.assert_close(loss, base_loss, atol=1e-6, rtol=0)
    loss.backward()
    base_loss.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)
