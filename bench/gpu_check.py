"""The GPU acceptance check: on one CUDA GPU, within --time_cap (540 s), what the CPU test suite cannot show.

    python bench/gpu_check.py                        # every check, on the CUDA GPU (without one: one line, exit 0)
    python bench/gpu_check.py --only=greedy,memory   # some of them
    python bench/gpu_check.py --device=cpu           # the same checks at a tiny size on the CPU, to try this script

Each check prints one line, PASS or FAIL (or SKIP, with why) with its figures; a check that fails or runs past its
time budget does not stop the others (a gpt2.py run is stopped at the budget; greedy and hellaswag, which run in this
process, are judged by it when they end); a check the time cap leaves no time for is skipped. The last line is the
summary, printed in every case (on SIGTERM too), and the exit status is 1 if a check failed. Nothing is downloaded,
so a machine with no network gives its verdict as fast as one with: the data is made in a temporary directory (token
shards with a learnable pattern, a random GPT-2 saved by transformers, HellaSwag-format items), and GPT-2's tokenizer
file is read from TIKTOKEN_CACHE_DIR or demo/tiktoken_cache/ (a check that needs it and finds none fails at once).

  bf16      gpt2.py, compiled, bf16, 50 steps against float32 eager (TF32 matmuls, as gpt2.py runs float32 on CUDA):
            through warmup each loss within 3%, then the median of every 10 steps; resumed at step 25, the same
            within 0.5% (CPU: bitwise)
  fsdp      a 1-rank NCCL torchrun with --fsdp=1, bf16, eager, 20 steps: within 3% of float32's; resumed as above
  float16   --dtype=float16 (autocast and GradScaler), eager, 20 steps: finite, within 5% of float32's; resumed as above
  memory    estimate_memory against torch.cuda.max_memory_allocated, 124M and 350M, eager bf16: within 25%
  greedy    KV-cache greedy decoding on CUDA (float32) gives transformers' greedy tokens, on a random GPT-2
  hellaswag the scorer on CUDA against the CPU's on 50 items: float32 losses within 1e-4 per token, bf16 within
            0.05; an ending pick may move only where the CPU's two losses are within twice that (a near-tie)
  speed     tokens/s and MFU of gpt2.py's training step against build-nanogpt's recipe (bench/profile_step.py, the
            baseline bench/bench_gpu.py times), both in this process, one step of each in turn, medians compared:
            passes when ours is at least 0.97x the baseline (a 3% allowance for timing noise); on a CPU, the ratio
            only. Above its line, a table of where our step's time goes (attention, the matmuls by layer, the loss,
            the optimizer, data, host waits, the rest)
  auto      --micro_batch_size=auto with gpt2.py's defaults at 124M and 350M: no out-of-memory error, and at most
            95% of the GPU's memory reserved
  oom       a real out-of-memory error (micro batch 512 at 124M): the step halves until it fits and trains on, with
            the losses of a run started at the micro batch it settled on (within 0.5%)

In --device=cpu mode the model is tiny, nothing is compiled, the GPU-only parts (memory, auto, oom) are skipped and
the rest run at CPU size, FSDP on gloo.
"""

import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cli import answer_help

    answer_help(__file__)

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from machine import descendants  # noqa: E402
from profile_step import NanoStep, OurStep, breakdown, format_breakdown, speed_ratio, time_in_turn  # noqa: E402

import gpt2  # noqa: E402
from cli import merge_settings, run_cli  # noqa: E402
from plot import read_log  # noqa: E402

CHECKS = {  # name: seconds it may take on a GPU (a cold compile of 124M is about a minute); the CPU mode runs in seconds
    "bf16": 200, "fsdp": 75, "float16": 60, "memory": 60, "greedy": 40, "hellaswag": 40, "speed": 150, "auto": 150,
    "oom": 90,
}
WARMUP = 10  # the training checks' warmup steps; the learning rate is constant after them
REFERENCE_BUDGET = 60  # seconds for the float32 eager run the training checks compare with (made once, when first asked)
MIN_START = 15  # seconds: a check is not started with less than this left of the run's time cap (it is skipped)
GRACE = 10  # seconds a stopped run gets to end after SIGTERM (torchrun's agent stops its workers) before SIGKILL
R50K_CACHE_FILE = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # SHA-1 of r50k_base.tiktoken's address: tiktoken's cache name
TOLERANCES = {"bf16": 0.03, "float16": 0.05, "fsdp": 0.03, "resume_gpu": 0.005, "memory": 0.25,
              "hella_fp32": 1e-4, "hella_bf16": 0.05}  # relative for the losses and memory; nats per token for HellaSwag


@dataclass
class Config:
    device: str = "auto"  # auto (the CUDA GPU, else nothing to do) | cuda | cpu (tiny shapes, to try the checks)
    only: str = ""  # comma-separated check names (bf16, float16, fsdp, speed, memory, greedy, hellaswag); "" = all
    keep: str = ""  # a directory to keep the runs' logs in; "" = a temporary one (a RAM disk where there is one), removed
    time_cap: int = 540  # seconds for the whole run: checks end by then, the rest are skipped, the summary always prints


class CheckFailed(Exception):
    """A check's one-line reason for FAIL."""


class Skip(Exception):
    """A check that cannot run here, with why."""


class OutOfTime(Skip):
    """The run's time cap ended a check before it finished: not run to its end, so skipped rather than failed."""


class Terminated(BaseException):
    """SIGTERM (the command's own time limit, or a person): the summary still prints. A BaseException, so that no
    check's `except Exception` swallows it."""


@dataclass
class Setup:
    """What every check gets: where it runs, at which size, and until when."""
    device: torch.device
    work: str  # a directory for data and logs
    data_dir: str
    tiny: bool  # the CPU mode's shapes
    deadline: float = 0.0  # time.time() by which the current check must end (its own budget)
    kept: bool = False  # work stays after the run (--keep)
    end: float = float("inf")  # time.time() of the run's time cap: no check goes past it

    @property
    def model(self):  # the shape the training checks run at
        if self.tiny:
            return dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512)
        return dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)

    @property
    def micro_batch(self):
        return 4 if self.tiny else 16

    def left(self):
        """Seconds left to the current check: to its own deadline or the run's cap, whichever comes first."""
        now = time.time()
        if now > self.end:
            raise OutOfTime("the run's time cap (--time_cap) ended it")
        if now > self.deadline:
            raise CheckFailed("ran past its time budget")
        return min(self.deadline, self.end) - now


# --- data the checks make for themselves ---


def write_pattern_shards(data_dir, vocab, n_train, n_val, seed=0):
    """Token shards with something to learn: each token is 7 x the previous plus 0-3, mod a 4096-token (or smaller)
    alphabet. The loss falls from ln(vocab) to about ln(alphabet) within the warmup (on an H200, 124M: 10.97 to 8.4 in
    15 steps), so the first steps of two runs are worth comparing step by step; after them it sits at that plateau,
    with rare spikes, and medians are compared (tracks)."""
    os.makedirs(data_dir, exist_ok=True)
    alphabet = min(vocab, 4096)
    rng = np.random.default_rng(seed)
    for split, n in (("val", n_val), ("train", n_train)):
        tokens = [int(rng.integers(0, alphabet))]
        for step in rng.integers(0, 4, n - 1).tolist():  # plain Python ints: two million tokens in about a second
            tokens.append((7 * tokens[-1] + step) % alphabet)
        np.save(os.path.join(data_dir, f"check_{split}_000000.npy"), np.array(tokens, dtype=np.uint16))


WORDS = ("the man woman dog car house water fire snow window table chair runs walks opens closes takes puts "
         "gives looks finds keeps red small old new quickly slowly then after before with under over into").split()


def write_hellaswag_items(path, n, seed=0):
    """n examples in HellaSwag's val jsonl format (the fields hellaswag_val.jsonl has), made of plain words."""
    rng = np.random.default_rng(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS, k)).capitalize()
    with open(path, "w") as f:
        for i in range(n):
            ctx_a, ctx_b = sentence(int(rng.integers(8, 30))) + ".", str(rng.choice(WORDS))
            row = {"ind": i, "activity_label": sentence(2), "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
                   "split": "val", "split_type": "indomain", "label": int(rng.integers(0, 4)),
                   "endings": [sentence(int(rng.integers(3, 20))) + "." for _ in range(4)], "source_id": f"check~{i}"}
            gpt2.check_hellaswag_row(row)
            f.write(json.dumps(row) + "\n")


def find_tokenizer_cache(environ=os.environ):
    """The folder holding tiktoken's r50k_base file: TIKTOKEN_CACHE_DIR, else the repository's own demo/tiktoken_cache
    (what python demo.py fills; ignored by git). None if neither holds it. Nothing is ever downloaded: tiktoken's
    download has no timeout, and a GPU lent for minutes may have no network at all."""
    for folder in (environ.get("TIKTOKEN_CACHE_DIR"), os.path.join(ROOT, "demo", "tiktoken_cache")):
        if folder and os.path.isfile(os.path.join(folder, R50K_CACHE_FILE)):
            return os.path.abspath(folder)
    return None


def tokenizer():
    """tiktoken's GPT-2 encoding from the local cache, or a CheckFailed at once naming the folder to bring."""
    folder = find_tokenizer_cache()
    if folder is None:
        own, given = os.path.join(ROOT, "demo", "tiktoken_cache"), os.environ.get("TIKTOKEN_CACHE_DIR", "unset")
        raise CheckFailed(f"no tokenizer file {R50K_CACHE_FILE} in TIKTOKEN_CACHE_DIR ({given}) or {own}/: bring a "
                          f"tiktoken cache folder there (python demo.py makes it) or set TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    return gpt2.get_tokenizer()


# --- gpt2.py runs ---


def signal_group(pid, sig):
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc, grace=GRACE):
    """Stops proc and everything it started. torchrun starts each worker in a session of its own, so stopping
    torchrun's process group leaves the workers running (and holding the output pipes): SIGTERM to the group first, on
    which torchrun's agent stops its workers; after `grace` seconds SIGKILL to the group and to every process found
    below proc at the start, each in its own group. Returns what proc wrote, as far as it can be read."""
    below = descendants(proc.pid)
    signal_group(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *below]:
        signal_group(pid, signal.SIGKILL)
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a process that escaped still holds the pipes: stop waiting for it
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        proc.wait(timeout=5)
        return "", ""


def run_process(cmd, setup, env=None):
    """Runs cmd to its end or to the check's deadline (or the run's cap, or a SIGTERM to this script). It runs in a
    session of its own, and at the deadline the whole of it stops (see stop), torchrun's workers included, which frees
    the GPU for the next check."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=setup.left())
    except subprocess.TimeoutExpired:
        stop(proc)
        script = next(os.path.basename(c) for c in cmd if c.endswith(".py"))
        if time.time() >= setup.end:
            raise OutOfTime(f"the run's time cap (--time_cap) stopped {script}") from None
        raise CheckFailed(f"{script} ran past the check's time budget and was stopped") from None
    except BaseException:  # the cap already passed (OutOfTime), or SIGTERM (Terminated): nothing is left running
        stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def gpt2_args(setup, log_dir, *args, steps=50, checkpoint_every=0):
    """gpt2.py's command line for a check's run; `args` replace the others' values (gpt2.py refuses a setting given
    twice). The learning rate is constant after its warmup (min_lr = max_lr), so runs of any length share their first
    steps."""
    shape = [f"--{k}={v}" for k, v in setup.model.items()]
    batch = setup.micro_batch * setup.model["block_size"]
    return merge_settings([
        *shape, f"--data_dir={setup.data_dir}", f"--log_dir={log_dir}", f"--micro_batch_size={setup.micro_batch}",
        f"--total_batch_size={batch}", f"--max_steps={steps}", f"--warmup_steps={WARMUP}", "--max_lr=6e-4", "--min_lr=6e-4",
        "--val_every=0", "--hellaswag_every=0", "--sample_every=0", f"--checkpoint_every={checkpoint_every}",
        f"--device={setup.device.type}", *args])


def run_gpt2(setup, log_dir, *args, ranks=0, steps=50, checkpoint_every=0):
    """python gpt2.py (under torchrun with `ranks` ranks if asked) on the check's data: {step: train loss} and stdout."""
    args = gpt2_args(setup, log_dir, *args, steps=steps, checkpoint_every=checkpoint_every)
    launcher = [sys.executable]
    if ranks:
        # the loopback address: an offline machine's own hostname may not resolve, and rendezvous would retry for minutes
        launcher += ["-m", "torch.distributed.run", "--standalone", "--local_addr=127.0.0.1", f"--nproc_per_node={ranks}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if setup.tiny:
        env["OMP_NUM_THREADS"] = "1"
    proc = run_process([*launcher, os.path.join(ROOT, "gpt2.py"), *args], setup, env)
    os.makedirs(log_dir, exist_ok=True)  # gpt2.py may have stopped before making it
    with open(os.path.join(log_dir, "run.out"), "a") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        error = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(error) if line.startswith(("error:", "torch.", "RuntimeError"))),
                      error[-1] if error else "no output")
        where = f"{log_dir}/run.out" if setup.kept else "run.out with --keep=DIR"
        raise CheckFailed(f"gpt2.py failed (exit {proc.returncode}): {reason[:300]}; its output in {where}")
    return read_train_losses(log_dir), proc.stdout


def read_train_losses(log_dir):
    return dict(zip(*read_log(os.path.join(log_dir, "log.txt")).get("train", ([], [])), strict=True))


def compare_losses(ours, reference, rtol, steps):
    """(worst relative difference, mean absolute difference) over steps; CheckFailed when a step is missing or not finite."""
    missing = [s for s in steps if s not in ours or s not in reference]
    if missing:
        raise CheckFailed(f"no train loss logged for steps {missing[:5]}{'...' if len(missing) > 5 else ''}")
    bad = [s for s in steps if not math.isfinite(ours[s])]
    if bad:
        raise CheckFailed(f"non-finite loss at steps {bad[:5]}")
    rel = [abs(ours[s] - reference[s]) / abs(reference[s]) for s in steps]
    worst = max(range(len(rel)), key=rel.__getitem__)
    mean_abs = sum(abs(ours[s] - reference[s]) for s in steps) / len(steps)
    return rel[worst], steps[worst], mean_abs


def within(name, ours, reference, rtol, steps):
    """One comparison as words; CheckFailed naming the worst step when it is out of tolerance."""
    worst, step, mean_abs = compare_losses(ours, reference, rtol, steps)
    text = (f"{name}: worst {100 * worst:.2f}% (step {step}: {ours[step]:.4f} vs {reference[step]:.4f}), "
            f"mean |diff| {mean_abs:.4f}")
    if worst > rtol:
        raise CheckFailed(f"{text}, over the {100 * rtol:g}% allowed")
    return text


WINDOW = 10  # steps whose median is compared, once runs at the loss plateau are compared


def tracks(name, ours, reference, rtol, steps, exact):
    """Whether a run follows another: each of its first `exact` steps within rtol, and after them the median of each
    WINDOW steps. Past warmup the check's runs sit at their data's plateau (about ln 4096), where a rare spike (a grad
    norm of 50-100 at one step, seen on an H200 in float32 too) lands on other steps in other precisions: step by step
    the curves then differ by 10-25% at a few steps while their medians agree to 0.2%. One line, or CheckFailed."""
    head, tail = steps[:exact], steps[exact:]
    text = within(name, ours, reference, rtol, head)
    medians = []
    for i in range(0, len(tail), WINDOW):
        window = tail[i:i + WINDOW]
        compare_losses(ours, reference, rtol, window)  # every step logged and finite
        mine, theirs = (statistics.median(run[s] for s in window) for run in (ours, reference))
        medians.append((abs(mine - theirs) / theirs, window, mine, theirs))
    if not medians:
        return text
    worst, window, mine, theirs = max(medians)
    text += (f"; then medians of {WINDOW} steps: worst {100 * worst:.2f}% (steps {window[0]}-{window[-1]}: {mine:.4f} vs "
             f"{theirs:.4f})")
    if worst > rtol:
        raise CheckFailed(f"{text}, over the {100 * rtol:g}% allowed")
    return text


class Reference:
    """The float32 eager run the others are compared with, made once, by the first check that asks for it. It has a
    budget of its own (REFERENCE_BUDGET), and its time is its own: the asking check's deadline moves on by it and
    run_checks leaves it out of that check's time. A failed reference fails every check that asks, without a rerun."""

    def __init__(self, steps=50, budget=REFERENCE_BUDGET):
        self.steps, self.budget = steps, budget
        self.losses, self.error, self.took = None, None, 0.0

    def __call__(self, setup):
        if self.losses is None and self.error is None:
            start, check_deadline = time.time(), setup.deadline
            setup.deadline = start + self.budget
            try:
                self.losses, _ = run_gpt2(setup, os.path.join(setup.work, "fp32_eager"), "--dtype=float32",
                                          "--compile=0", steps=self.steps)
            except CheckFailed as e:
                self.error = f"the float32 reference failed: {e}"
            finally:
                self.took = time.time() - start
                setup.deadline = check_deadline + self.took
        if self.error:
            raise CheckFailed(self.error)
        return self.losses


def train_and_resume(setup, name, args, steps, rtol, reference, ranks=0):
    """A run of `steps` with a checkpoint halfway, compared with the float32 reference; then the second half again from
    that checkpoint, compared with the first run's (bitwise on a CPU, within resume_gpu on a GPU)."""
    log_dir = os.path.join(setup.work, name)
    half = steps // 2
    # gpt2.py also writes one at the end (1.5 GB at 124M), which nothing reads: removed at once
    losses, _ = run_gpt2(setup, log_dir, *args, ranks=ranks, steps=steps, checkpoint_every=half)
    os.remove(gpt2.checkpoint_path(log_dir, steps))
    figures = [tracks(f"{steps} losses vs float32 eager", losses, reference(setup), rtol, list(range(steps)), WARMUP + 1)]
    resumed = log_dir + "_resumed"  # the run as it was when stopped halfway: its log and the checkpoint there (moved)
    os.makedirs(resumed)
    shutil.copy(os.path.join(log_dir, "log.txt"), resumed)
    os.replace(gpt2.checkpoint_path(log_dir, half), gpt2.checkpoint_path(resumed, half))
    again, out = run_gpt2(setup, resumed, *args, "--init_from=resume", ranks=ranks, steps=steps, checkpoint_every=0)
    if f"(step {half})" not in out:
        raise CheckFailed(f"the resumed run did not start from step {half}: {out.strip()[-300:]}")
    second = list(range(half, steps))
    if setup.device.type == "cpu":
        differ = [s for s in second if again.get(s) != losses[s]]
        if differ:
            raise CheckFailed(f"resumed at step {half}: losses differ from the uninterrupted run's at steps {differ[:5]} "
                              f"(bitwise expected on a CPU)")
        figures.append(f"resumed at step {half}: {len(second)} losses bitwise equal")
    else:
        figures.append(tracks(f"resumed at step {half}", again, losses, TOLERANCES["resume_gpu"], second, 2))
    return "; ".join(figures)


# --- the checks ---


def check_bf16(setup, reference):
    compiled = "--compile=0" if setup.tiny else "--compile=1"
    return train_and_resume(setup, "bf16", ["--dtype=bfloat16", compiled], 50, TOLERANCES["bf16"], reference)


def check_float16(setup, reference):
    return train_and_resume(setup, "float16", ["--dtype=float16", "--compile=0"], 20, TOLERANCES["float16"], reference)


def check_fsdp(setup, reference):
    return train_and_resume(setup, "fsdp", ["--fsdp=1", "--compile=0"], 20, TOLERANCES["fsdp"], reference, ranks=1)


def check_speed(setup, reference):
    """gpt2.py's training step (gpt2.train_step, as gpt2.py runs it) against build-nanogpt's recipe, both built here at
    the bf16 check's shape and micro batch (whose compiled graphs the cache may already hold), on a GPU 4 micro-steps
    a step.
    After a warmup of both they step in turn, one step of each, each timed between device synchronizes, and the
    medians are compared: a busy machine slows both alike. Then where our step's time goes, printed as a table above
    the check's line. CUDA: passes when ours is at least 0.97x the baseline; a CPU gives the ratio only."""
    device, tiny = setup.device, setup.tiny
    grad_accum, warmup, rounds, profiled = (1, 3, 50, 3) if tiny else (4, 8, 20, 2)
    precision = torch.get_float32_matmul_precision()  # the baseline sets TF32 process-wide: put back for the other checks
    try:
        ours = OurStep(setup.model, setup.micro_batch, grad_accum, setup.data_dir, device, compile=not tiny)
        baseline = NanoStep(setup.model, setup.micro_batch, grad_accum, gpt2.find_shards(setup.data_dir, "train")[0],
                            device, compile=not tiny)
        times = time_in_turn({"ours": ours, "baseline": baseline}, rounds, warmup, device)
        setup.left()  # past the budget: no profile
        peak, figures = gpt2.peak_flops(device), []
        flops, tokens = ours.parts.flops_per_token, ours.tokens  # per token and per step: the same for both
        for name, key in (("ours", "ours"), ("build-nanogpt", "baseline")):
            dt = statistics.median(times[key])
            mfu = f"{100 * flops * tokens / dt / peak:.1f}%" if peak else "-"
            figures.append(f"{name} {1e3 * dt:.1f} ms/step {tokens / dt:.0f} tokens/s MFU {mfu}")
        ratio = speed_ratio(times)
        text = f"{'; '.join(figures)}; ours / baseline {ratio:.2f}x (medians of {rounds} steps each, in turn)"
        try:  # the profile only informs: a profiler that cannot run here leaves the verdict as it is
            rows, per_step = breakdown(ours.eager, ours.raw_model, ours.loader, device, profiled, warmup + rounds)
            print(format_breakdown(rows, per_step, device), flush=True)
        except Exception as e:
            text += f"; the profile failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        torch.set_float32_matmul_precision(precision)
        ours = baseline = None  # the checks after this one (auto, oom) need the GPU's memory in their own processes
        if device.type == "cuda":
            torch.compiler.reset()  # compiled code holds on to the models
            gc.collect()
            torch.cuda.empty_cache()
    if device.type != "cuda":
        raise Skip(f"{text}; ratio only: the CPU is not the target")
    if ratio < 0.97:
        raise CheckFailed(f"{text}: slower than the baseline")
    return text


def check_memory(setup, reference):
    if setup.device.type != "cuda":
        raise Skip("needs torch.cuda.max_memory_allocated")
    figures = []
    for name, (n_layer, n_head, n_embd), B in (("124M", (12, 12, 768), 16), ("350M", (24, 16, 1024), 8)):
        log_dir = os.path.join(setup.work, f"memory_{name}")
        shape = [f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", "--block_size=1024",
                 "--vocab_size=50304", f"--micro_batch_size={B}", f"--total_batch_size={B * 1024}"]
        # the last setting given wins: the shape and batch here over run_gpt2's
        _, out = run_gpt2(setup, log_dir, *shape, "--dtype=bfloat16", "--compile=0", steps=3)
        estimate = re.search(r"memory per rank \(estimate, GB\).*= ([\d.]+)", out)
        measured = [float(m) for m in re.findall(r"mem\s+([\d.]+)GB", out)]
        if not estimate or not measured:
            raise CheckFailed(f"{name}: no estimate or no peak memory in gpt2.py's output: {out.strip()[-300:]}")
        ratio = float(estimate.group(1)) / max(measured)
        figures.append(f"{name} B={B}: estimate {float(estimate.group(1)):.2f} GB, max_memory_allocated {max(measured):.1f} GB "
                       f"({ratio:.2f}x)")
        if abs(ratio - 1) > TOLERANCES["memory"]:
            raise CheckFailed("; ".join(figures) + f": {name} is off by more than {100 * TOLERANCES['memory']:g}%")
    return "; ".join(figures)


def check_auto(setup, reference):
    """--micro_batch_size=auto with gpt2.py's defaults (compiled, bf16, 524288 tokens per step) at 124M and 350M: the
    choice must run without running out of memory and reserve at most 95% of the GPU's memory."""
    if setup.device.type != "cuda":
        raise Skip("needs a CUDA GPU's free memory")
    total = torch.cuda.get_device_properties(setup.device).total_memory
    figures = []
    for name, (n_layer, n_head, n_embd) in (("124M", (12, 12, 768)), ("350M", (24, 16, 1024))):
        shape = [f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", "--block_size=1024",
                 "--vocab_size=50304", "--micro_batch_size=auto", "--total_batch_size=524288", "--compile=1"]
        _, out = run_gpt2(setup, os.path.join(setup.work, f"auto_{name}"), *shape, "--dtype=bfloat16", steps=2)
        choice = re.search(r"micro_batch_size=auto: (\d+)(.*?) \(.*?estimate ([\d.]+) GB", out)
        reserved = [float(m) for m in re.findall(r"\(reserved ([\d.]+)\)", out)]
        if not choice or not reserved:
            raise CheckFailed(f"{name}: no auto choice or no reserved memory in gpt2.py's output: {out.strip()[-300:]}")
        share = max(reserved) * 1e9 / total
        figures.append(f"{name}: auto chose {choice.group(1)}{choice.group(2)}, estimate {choice.group(3)} GB, "
                       f"max_memory_reserved {max(reserved):.1f} GB = {100 * share:.0f}% of {total / 1e9:.0f} GB")
        if share > 0.95:
            raise CheckFailed("; ".join(figures) + ": over 95% of the GPU's memory")
    return "; ".join(figures)


def check_oom(setup, reference):
    """A real out-of-memory error: 124M eager at micro batch 512 (about 400 GB by the estimate) must halve until it
    fits and train on, and its losses equal, within 0.5%, a run started at the micro batch it settled on."""
    if setup.device.type != "cuda":
        raise Skip("needs a CUDA GPU to run out of memory")
    shape = ["--micro_batch_size=512", "--total_batch_size=524288", "--compile=0", "--dtype=bfloat16"]
    losses, out = run_gpt2(setup, os.path.join(setup.work, "oom"), *shape, steps=2)
    halvings = re.findall(r"out of memory at micro_batch_size=(\d+): the step again with (\d+)", out)
    if not halvings or sorted(losses) != [0, 1]:
        raise CheckFailed(f"no halving logged, or not 2 steps trained: {out.strip()[-300:]}")
    settled = halvings[-1][1]
    again, _ = run_gpt2(setup, os.path.join(setup.work, "oom_settled"), *shape, f"--micro_batch_size={settled}", steps=2)
    text = within(f"512 -> {' -> '.join(b for _, b in halvings)}: 2 losses vs a run started at {settled}", losses, again,
                  0.005, [0, 1])
    return text


def random_hf_gpt2(setup, path):
    """A randomly initialised transformers GPT-2 (GPT-2's vocabulary), saved to path as from_pretrained reads it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # one line per check
    shape = dict(n_layer=2, n_head=2, n_embd=64) if setup.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    torch.manual_seed(0)
    # no end-of-text token: generate() then writes exactly max_new_tokens, as ours does, and never masks one out
    config = GPT2Config(vocab_size=gpt2.GPT2_VOCAB, n_positions=1024, **shape, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def check_greedy(setup, reference):
    from transformers import GPT2LMHeadModel

    enc = tokenizer()
    path = random_hf_gpt2(setup, os.path.join(setup.work, "random_gpt2"))
    torch.backends.cuda.matmul.allow_tf32 = False  # both in full float32
    ours = gpt2.load_hf_model(path, setup.device).eval()
    theirs = GPT2LMHeadModel.from_pretrained(path).to(setup.device).eval()
    prompts = ["The meaning of life is", "Hello, I'm a language model,", "In 1905, Einstein"]
    new = 16 if setup.tiny else 32
    for text in prompts:
        prompt = enc.encode_ordinary(text)
        tokens, _ = gpt2.generate(ours, prompt, 1, new, top_k=1)
        ids = torch.tensor([prompt], device=setup.device)
        with torch.no_grad():
            expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                       pad_token_id=enc.eot_token)[0, len(prompt):]
        if tokens[0].tolist() != expected.tolist():
            if len(expected) != new:
                raise CheckFailed(f"prompt {text!r}: transformers wrote {len(expected)} tokens, not {new}")
            first = next(i for i, (a, b) in enumerate(zip(tokens[0].tolist(), expected.tolist(), strict=True)) if a != b)
            raise CheckFailed(f"prompt {text!r}: our token {first} is {tokens[0, first].item()}, transformers' "
                              f"{expected[first].item()}")
    return f"{len(prompts)} prompts x {new} tokens equal to transformers' generate(do_sample=False) on {setup.device.type}"


def check_hellaswag(setup, reference):
    tokenizer()  # load_hellaswag encodes with it: when it cannot load, this says so in one line
    path = os.path.join(setup.work, "hellaswag_val.jsonl")
    write_hellaswag_items(path, 12 if setup.tiny else 50)  # bf16 matmuls are slow on a CPU
    examples = gpt2.load_hellaswag("val", path)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if setup.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=1024, vocab_size=50304, **shape)).eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    labels = torch.tensor([ex.label for ex in examples])
    scores = {}  # name: (summed losses (N, 4), acc_norm's picks (N,)), as evaluate_hellaswag counts them
    bf16 = lambda: torch.autocast(device_type=setup.device.type, dtype=torch.bfloat16)
    for name, device, autocast in (("cpu", torch.device("cpu"), nullcontext), ("fp32", setup.device, nullcontext),
                                   ("bf16", setup.device, bf16)):
        sums, counts = gpt2.score_endings(model.to(device), examples, device, autocast)
        if name == "cpu":
            cpu_counts = counts
        elif not torch.equal(counts, cpu_counts):
            raise CheckFailed(f"{name}: the ending token counts differ from the CPU's")
        scores[name] = (sums, (sums / counts).argmin(1))
    acc_norm = lambda name: (scores[name][1] == labels).float().mean().item()
    per_token = lambda name: scores[name][0] / cpu_counts  # (N, 4)
    diff32 = (per_token("fp32") - per_token("cpu")).abs().max().item()
    diff16 = (per_token("bf16") - per_token("cpu")).abs().max().item()

    def unexplained(name, tol):
        """Items whose acc_norm pick moved although the CPU's losses of the two endings are further apart than twice
        the tolerance (a closer pair, a near-tie, may swap within it)."""
        cpu_loss, picks, cpu_picks = per_token("cpu"), scores[name][1], scores["cpu"][1]
        moved = (picks != cpu_picks).nonzero()[:, 0]
        gaps = (cpu_loss[moved, picks[moved]] - cpu_loss[moved, cpu_picks[moved]]).abs()
        return len(moved), int((gaps > 2 * tol).sum())

    moved32, bad32 = unexplained("fp32", TOLERANCES["hella_fp32"])
    moved16, bad16 = unexplained("bf16", TOLERANCES["hella_bf16"])
    text = (f"{len(examples)} items, acc_norm CPU {acc_norm('cpu'):.2f}, {setup.device.type} float32 {acc_norm('fp32'):.2f} "
            f"(max |diff| {diff32:.1e} per token, {moved32} picks moved, {bad32} of them not near-ties), bf16 "
            f"{acc_norm('bf16'):.2f} (max |diff| {diff16:.3f} per token, {moved16} picks moved, {bad16} not near-ties)")
    if diff32 > TOLERANCES["hella_fp32"] or bad32:
        raise CheckFailed(f"{text}: float32 differs from the CPU's by more than {TOLERANCES['hella_fp32']:g} per token")
    if diff16 > TOLERANCES["hella_bf16"] or bad16:
        raise CheckFailed(f"{text}: bf16 differs from the CPU's by more than {TOLERANCES['hella_bf16']:g} per token")
    return text


# --- running them ---


def terminated(signum, frame):
    raise Terminated()


def run_checks(setup, names, time_cap=540):
    """Runs each named check within its budget and what is left of time_cap (seconds from now); prints one line each
    and the summary, in every case (a SIGTERM included); returns the verdict (PASS: no check failed; checks skipped for
    want of time do not fail it) and {name: PASS, FAIL or SKIP}."""
    reference = Reference()
    functions = {"bf16": check_bf16, "float16": check_float16, "fsdp": check_fsdp, "speed": check_speed,
                 "memory": check_memory, "greedy": check_greedy, "hellaswag": check_hellaswag, "auto": check_auto,
                 "oom": check_oom}
    start = time.time()
    setup.end = start + time_cap
    status = {}
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for name in names:
            t0 = time.time()
            budget = CHECKS[name] * (3 if setup.tiny else 1)  # the CPU mode tries the logic; its time says little
            setup.deadline = t0 + budget
            reference_took = reference.took
            try:
                if setup.end - t0 < MIN_START:
                    raise OutOfTime(f"not started: {max(setup.end - t0, 0):.0f} s left of the {time_cap} s time cap")
                line, status[name] = functions[name](setup, reference), "PASS"
            except Skip as e:
                line, status[name] = str(e), "SKIP"
            except CheckFailed as e:
                line, status[name] = str(e), "FAIL"
            except Terminated:
                line, status[name] = "stopped by SIGTERM", "FAIL"
                raise
            except Exception as e:  # a check's own bug or the library's: reported, and the others still run
                line, status[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", "FAIL"
            finally:
                took = time.time() - t0 - (reference.took - reference_took)  # the reference's time is its own
                if reference.took != reference_took:
                    print(f"(the float32 reference: {reference.took:.0f} s, "
                          f"{'failed' if reference.error else f'{reference.steps} steps'})", flush=True)
                if status.get(name) == "PASS" and took > budget:  # a check in this process can only be judged
                    line, status[name] = f"{line}; but it took {took:.0f} s, over its {budget} s budget", "FAIL"
                print(f"{status[name]} {name:9s} {took:5.0f} s  {line}", flush=True)
    except Terminated:
        pass  # the checks not run are counted as skipped below
    finally:
        signal.signal(signal.SIGTERM, previous)
        for name in names:
            status.setdefault(name, "SKIP")
        counts = {s: sum(v == s for v in status.values()) for s in ("PASS", "FAIL", "SKIP")}
        elapsed = time.time() - start
        where = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "CPU (tiny shapes)"
        verdict = "PASS" if not counts["FAIL"] else "FAIL"
        print(f"gpu_check {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
              f"{elapsed:.0f} s (time cap {time_cap} s) on {where}, torch {torch.__version__}", flush=True)
    return verdict, status


def scratch_dir():
    """A temporary directory for the runs' data, logs and checkpoints: on the RAM disk where there is one with room
    (a 124M checkpoint with AdamW's state is 1.5 GB), else the system's temporary directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 16 * 2**30:
        return tempfile.mkdtemp(prefix="gpu_check_", dir=shm)
    return tempfile.mkdtemp(prefix="gpu_check_")


def main(cfg, _):
    names = [n for n in cfg.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise gpt2.UserError(f"--only={cfg.only}: no check named {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise gpt2.UserError(f"--device={cfg.device}: expected auto, cuda or cpu")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here, nothing checked (python bench/gpu_check.py --device=cpu tries the checks "
              "at a tiny size on the CPU)")
        return
    device = torch.device("cpu" if cfg.device == "cpu" else "cuda")
    tiny = device.type == "cpu"
    if cfg.time_cap < 1:
        raise gpt2.UserError(f"--time_cap={cfg.time_cap}: expected the run's seconds, >= 1 (540 fits a 10-minute limit)")
    # offline by construction: transformers and the hub read local files only, tiktoken its cache (tokenizer())
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    work = cfg.keep or scratch_dir()
    os.makedirs(work, exist_ok=True)
    try:
        setup = Setup(device, work, os.path.join(work, "data"), tiny, kept=bool(cfg.keep))
        # 50 steps of the bf16 check read 50 x 16 x 1024 tokens, plus the memory check's first micro-batches
        write_pattern_shards(setup.data_dir, setup.model["vocab_size"], 60_000 if tiny else 2_000_000,
                             10_000 if tiny else 100_000)
        verdict, _ = run_checks(setup, names, cfg.time_cap)
    finally:
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
