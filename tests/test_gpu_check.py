"""bench/gpu_check.py's checks at their CPU size, build-nanogpt's baseline against our model, and bench/profile_step.py's
timing in turn and profile of our step.

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
import gpu_check  # noqa: E402
import profile_step  # noqa: E402


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
    nano = profile_step.NanoGPT  # bench_gpu.py's and gpu_check.py's baseline
    shape = dict(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(3)
    ours = gpt2.GPT(gpt2.GPTConfig(**shape))
    torch.manual_seed(3)
    theirs = nano(**shape)
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


def test_the_steps_run_in_turn_and_the_ratio_is_of_their_medians():
    # two fake step functions on a fake clock: each call records itself and moves the clock by its step's time
    now, calls = [0.0], []

    def fake(name, seconds):
        def step(i):
            calls.append((name, i))
            now[0] += seconds(i)
        return step

    ours = fake("ours", lambda i: 9.0 if i == 4 else 1.0)  # one step slowed, as by a neighbour's burst
    baseline = fake("baseline", lambda i: 100.0 if i < 2 else 2.0 + (i % 2) / 10)  # its warmup (compilation) is slow
    times = profile_step.time_in_turn({"ours": ours, "baseline": baseline}, rounds=5, warmup=2, device=torch.device("cpu"),
                                      clock=lambda: now[0])
    assert calls == [(name, i) for i in range(7) for name in ("ours", "baseline")]  # A B A B ..., warmup included
    assert times["ours"] == pytest.approx([1, 1, 9, 1, 1]) and times["baseline"] == pytest.approx([2, 2.1, 2, 2.1, 2])
    # medians 2.0 / 1.0; the means (2.04 / 2.6) would call ours the slower
    assert profile_step.speed_ratio(times) == pytest.approx(2.0)


def test_categories_from_torch_op_and_kernel_names():
    step, mlp, loss = profile_step.STEP, profile_step.LABEL + "mlp", profile_step.LOSS
    backward = [step, "autograd::engine::evaluate_function: AddmmBackward0", "AddmmBackward0"]
    expected = {
        (step, "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"): "attention",
        (step, "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_efficient_attention",
         "aten::_efficient_attention_forward", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"): "attention",
        (step, "autograd::engine::evaluate_function: ScaledDotProductFlashAttentionBackward0",
         "ScaledDotProductFlashAttentionBackward0", "aten::_scaled_dot_product_flash_attention_backward",
         "aten::_flash_attention_backward"): "attention",
        (step, mlp, "aten::linear", "aten::addmm"): "matmul mlp",
        (step, mlp, "aten::mm"): "matmul mlp",
        (step, mlp, "aten::linear", "aten::addmm", *backward, "aten::mm"): "matmul mlp",  # its backward, made by addmm
        (step, profile_step.LABEL + "qkv", "aten::linear", "aten::addmm", "sm90_xmma_gemm_bf16bf16_bf16f32"): "matmul qkv",
        (step, profile_step.LABEL + "attn out", "aten::linear", "aten::addmm"): "matmul attn out",
        (step, loss, profile_step.LABEL + "lm_head", "aten::linear", "aten::mm"): "matmul lm_head",  # the plain loss
        (step, loss, "LinearCrossEntropy", "aten::matmul", "aten::mm"): "matmul lm_head",  # the chunked loss's own
        (step, loss, "LinearCrossEntropy", "aten::log_softmax", "aten::_log_softmax"): "loss",
        (step, loss, "aten::cross_entropy_loss", "aten::nll_loss_nd", "aten::nll_loss"): "loss",
        (step, "Optimizer.step#AdamW.step", "aten::_fused_adamw_"): "optimizer",
        (step, "Optimizer.zero_grad#AdamW.zero_grad"): "optimizer",
        (step, "aten::_foreach_norm"): "optimizer",  # the gradient clip
        (step, profile_step.DATA): "data",
        (step, "aten::to", "aten::_to_copy", "aten::copy_", "Memcpy HtoD (Pinned -> Device)"): "data",
        (step,): "host / idle",
        (step, "aten::item", "aten::_local_scalar_dense"): "host / idle",
        (step, "aten::layer_norm", "aten::native_layer_norm"): "other",
        (step, "aten::gelu"): "other",
        (*backward, "aten::mm"): "other",  # a backward matmul whose forward op was in no label
    }
    assert {names: profile_step.categorize(list(names)) for names in expected} == expected


def test_where_our_step_time_goes_on_the_cpu(setup):
    ours = profile_step.OurStep(setup.model, setup.micro_batch, 2, setup.data_dir, setup.device, compile=False)
    ours.eager(0)
    start = time.perf_counter()
    rows, per_step = profile_step.breakdown(ours.eager, ours.raw_model, ours.loader, setup.device, steps=3, first=1)
    took = time.perf_counter() - start
    names = [name for name, _, _ in rows]
    assert names == ["attention", "matmul qkv", "matmul attn out", "matmul mlp", "matmul lm_head", "loss", "optimizer",
                     "data", "host / idle", "other"]
    shares = {name: share for name, _, share in rows}
    assert all(share > 0 for share in shares.values()), shares  # each label found its work, forward and backward
    assert sum(shares.values()) == pytest.approx(1, abs=0.05), shares  # the rows against the clock around the steps
    assert 4 * per_step < took  # the warmup step and 3 measured ones
    real = shares["attention"] + shares["loss"] + sum(v for k, v in shares.items() if k.startswith("matmul"))
    assert real > 0.15, shares
    # the labels are gone after: no hook left on any module, the loader's own next_batch back
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.raw_model.modules())
    assert "next_batch" not in vars(ours.loader)
    table = profile_step.format_breakdown(rows, per_step, setup.device).splitlines()
    assert len(table) == 2 + len(rows) + 1 and table[-1].split()[0] == "total"


def test_the_speed_check_on_a_cpu_gives_the_ratio_without_a_verdict(setup, capsys):
    precision = torch.get_float32_matmul_precision()
    verdict, status = gpu_check.run_checks(setup, ["speed"])
    lines = capsys.readouterr().out.splitlines()
    assert verdict == "PASS" and status == {"speed": "SKIP"}, lines
    assert lines[0].startswith("where our step's time goes") and [line.split()[0] for line in lines[2:12]] == [
        "attention", "matmul", "matmul", "matmul", "matmul", "loss", "optimizer", "data", "host", "other"]
    line = next(line for line in lines if line.startswith("SKIP speed"))
    assert "ours / baseline" in line and "medians of 50 steps each, in turn" in line
    assert line.endswith("ratio only: the CPU is not the target")
    assert torch.get_float32_matmul_precision() == precision  # the baseline's TF32 setting did not outlive the check
