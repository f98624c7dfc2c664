"""The training recipe: validation over val_tokens whatever the ranks, shuffled epochs that resume exactly, WSD."""

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_log, run_gpt2, write_shards

import gpt2
from gpt2 import GPT, Config, DataLoaderLite, Dist, LinearCrossEntropy, UserError, ValLoader, get_lr

T = 16  # TINY's block_size


@pytest.fixture
def numbered(tmp_path):
    """Shards whose tokens are their own stream positions, so every token read can be traced back."""
    data_dir = str(tmp_path / "numbered")
    os.makedirs(data_dir)
    sizes = [1000, 37, 1, 2500, 611]  # 4149 tokens: no multiple of T, or of any batch below
    stream = np.arange(sum(sizes), dtype=np.uint16)
    for i, piece in enumerate(np.split(stream, np.cumsum(sizes)[:-1])):
        np.save(os.path.join(data_dir, f"edufineweb_train_{i + 3:06d}.npy"), piece)
    for i, piece in enumerate(np.split(stream[:400], [150, 151])):  # val: 400 tokens in shards of 150, 1 and 249
        np.save(os.path.join(data_dir, f"edufineweb_val_{i:06d}.npy"), piece)
    return data_dir, stream


# --- validation ---


def test_linear_cross_entropy_ignores_targets_of_minus_one_as_f_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (40,))
    targets[[0, 7, 8, 39]] = -1
    ours = LinearCrossEntropy.apply(x, w, targets, None)
    ours.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    theirs = F.cross_entropy(x @ w.t(), targets, ignore_index=-1)
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grads, (x.grad, w.grad))
    with torch.no_grad():  # nothing left to average: 0/0, as F.cross_entropy
        assert math.isnan(LinearCrossEntropy.apply(x, w, torch.full((40,), -1), None).item())


def test_val_loader_reads_the_first_val_tokens_once_whatever_the_ranks(numbered):
    data_dir, stream = numbered
    for n_tokens, B, world in [(150, 2, 1), (150, 3, 2), (101, 2, 3), (399, 4, 2), (10_000, 3, 2)]:
        expected = min(n_tokens, 399)  # 400 val tokens hold 399 targets, read once even if more are asked
        loaders = [ValLoader(data_dir, n_tokens, B, T, rank, world, vocab_size=65536) for rank in range(world)]
        batches = [list(loader.batches()) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # every rank runs every forward pass
        x = torch.cat([x.flatten() for rank in batches for x, _ in rank])
        y = torch.cat([y.flatten() for rank in batches for _, y in rank])
        assert all(x.shape == y.shape == (B, T) for rank in batches for x, y in rank)
        read = y >= 0
        assert torch.equal(y[read], x[read] + 1)  # each target follows its input in the stream
        np.testing.assert_array_equal(np.sort(y[read].numpy()), stream[1:expected + 1])  # each of them once
        assert (x[~read] == 0).all()


def test_val_split_shorter_than_val_tokens_is_read_once_and_said(numbered):
    data_dir, _ = numbered
    said = []
    cfg = Config(data_dir=data_dir, val_tokens=1000, micro_batch_size=2, block_size=T, vocab_size=65536)
    loader = gpt2.open_val_loader(cfg, Dist(0, 0, 1, torch.device("cpu")), said.append)
    assert loader.n_tokens == 399
    assert said == ["the val split holds 400 tokens, fewer than val_tokens=1,000: validation reads all of it once, "
                    "399 targets"]


def plain_val_loss(model, tokens, n):
    """The mean cross-entropy of the first n targets of tokens, a sequence of T at a time, with F.cross_entropy."""
    losses = []
    for start in range(0, n, T):
        end = min(start + T, n)
        x = torch.from_numpy(tokens[start:end].astype(np.int64))[None]
        y = torch.from_numpy(tokens[start + 1:end + 1].astype(np.int64))
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits[0].double(), y, reduction="none"))
    return torch.cat(losses).mean().item()


@pytest.mark.slow
def test_val_loss_on_two_ranks_is_the_plain_mean_over_the_first_val_tokens(shards, tmp_path):
    # 150 tokens: 10 sequences, the last of 6; each rank reads 5 in two micro-batches of 3, the second padded.
    # (test_train's two-ranks test compares with one process too, with val_tokens=150 and other micro-batches)
    log_dir = tmp_path / "log"
    run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--val_tokens=150", "--val_every=1", "--max_steps=1",
             "--checkpoint_every=1", "--micro_batch_size=3", "--total_batch_size=96", torchrun_ranks=2)
    ckpt = gpt2.load_checkpoint(str(log_dir / "model_00001.pt"))
    model = GPT(gpt2.model_config(Config(**{k: ckpt["config"][k] for k in gpt2.MODEL_KEYS})))
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        expected = plain_val_loss(model, np.load(os.path.join(shards, "edufineweb_val_000000.npy")), 150)
    assert read_log(log_dir)[(1, "val")] == pytest.approx(expected, abs=1e-5)


def test_checkpoint_of_an_older_version_with_val_steps_resumes():
    saved = {k: v for k, v in vars(Config(n_layer=2)).items() if k not in ("val_tokens", "shuffle", "lr_schedule",
                                                                            "warmdown_steps")}
    saved["val_steps"] = 20
    cfg = gpt2.resume_config(Config(), set(), saved, "old.pt")
    assert cfg.n_layer == 2 and cfg.val_tokens == Config.val_tokens and not cfg.shuffle and cfg.lr_schedule == "cosine"


# --- shuffled epochs ---


def read_stream(loaders, steps):
    """Every rank's batches, step by step: the inputs in the order the ranks share the stream, and the targets."""
    xs, ys = [], []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            xs.append(x.flatten().numpy())
            ys.append(y.flatten().numpy())
    return np.concatenate(xs), ys


def test_shuffled_epochs_read_every_token_once_each_in_a_new_order(numbered):
    data_dir, stream = numbered
    B, world, total = 3, 2, len(stream)
    loaders = [DataLoaderLite(data_dir, "train", B, T, rank, world, vocab_size=65536, shuffle=True, seed=5)
               for rank in range(world)]
    seen, ys = read_stream(loaders, 4 * total // (B * T * world) + 1)  # four epochs and a bit
    for i, y in enumerate(ys[:-1]):  # the targets are the next tokens of the shuffled stream, across ranks too
        np.testing.assert_array_equal(y, seen[i * B * T + 1:(i + 1) * B * T + 1])
    epochs = [seen[e * total:(e + 1) * total] for e in range(4)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), stream)  # every token once
        windows = order[:total // T * T].reshape(-1, T)
        assert (np.diff(windows, axis=1) == 1).all()  # windows of T whole, in place within the stream...
        assert (windows[:, 0] % T == 0).all()
        np.testing.assert_array_equal(order[total // T * T:], stream[total // T * T:])  # ...the short rest last
    assert not np.array_equal(epochs[0], stream)
    assert len({order.tobytes() for order in epochs}) == 4  # each epoch in its own order
    other_seed = DataLoaderLite(data_dir, "train", B * world, T, vocab_size=65536, shuffle=True, seed=6)
    assert not np.array_equal(read_stream([other_seed], 10)[0], seen[:10 * B * T * world])


def test_shuffled_loader_resumes_mid_epoch_exactly_on_any_world_size(numbered):
    data_dir, stream = numbered
    B = 2
    make = lambda world, b=B: [DataLoaderLite(data_dir, "train", b, T, rank, world, vocab_size=65536, shuffle=True,
                                              seed=5) for rank in range(world)]
    first = make(2)
    read_stream(first, 150)  # into the third epoch, mid-window
    state = first[0].state_dict()
    assert state == first[1].state_dict() == {"position": 150 * 2 * B * T, "seed": 5}
    straight, _ = read_stream(first, 60)  # across the next epoch end
    resumed = make(2)
    for loader in resumed:
        loader.seed = 0  # a resumed run keeps the order it started with, whatever --seed says now
        loader.load_state_dict(state)
    assert np.array_equal(read_stream(resumed, 60)[0], straight)
    for world, b in [(1, 2 * B), (4, B // 2)]:  # the same tokens per step on other world sizes
        moved = make(world, b)
        for loader in moved:
            loader.load_state_dict(state)
        assert np.array_equal(read_stream(moved, 60)[0], straight)


# --- learning-rate schedule ---


def test_schedules_follow_their_formulas():
    cfg = Config(max_lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    wsd = Config(max_lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20, lr_schedule="wsd", warmdown_steps=6)
    for step in range(25):
        warm = (step + 1) / 4
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 4) / 16)) if step < 20 else 0.1
        assert get_lr(step, cfg) == pytest.approx(warm if step < 4 else cosine), step
        # steps 14..19 decay: 1 - sqrt of 1/6 .. 6/6 of the way, min_lr at the last step
        decay = 0.1 + 0.9 * (1 - math.sqrt(min(1, max(0, step - 13) / 6)))
        assert get_lr(step, wsd) == pytest.approx(warm if step < 4 else 1.0 if step < 14 else decay), step
    assert get_lr(19, wsd) == pytest.approx(0.1)
    default = Config(max_lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, lr_schedule="wsd")  # the last 20 steps
    assert [get_lr(s, default) for s in (79, 80, 99)] == pytest.approx([1.0, 1 - math.sqrt(1 / 20), 0.0])


def test_bad_recipe_settings_are_one_line_errors(shards, tmp_path):
    bad = [({"lr_schedule": "linear"}, "--lr_schedule=linear: expected cosine or wsd"),
           ({"min_lr": 1e-3}, "--min_lr=0.001 is above --max_lr=0.0006"),
           ({"lr_schedule": "wsd", "warmdown_steps": 19000}, "--warmdown_steps=19000 and --warmup_steps=715 are longer "
                                                             "than the run (--max_steps=19073)"),
           ({"lr_schedule": "wsd", "warmdown_steps": -1}, "--warmdown_steps=-1: must be at least 0"),
           ({"val_tokens": 0}, "--val_tokens=0: must be at least 1")]
    for settings, message in bad:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            gpt2.check_config(Config(**settings))
    gpt2.check_config(Config(lr_schedule="wsd", warmdown_steps=18358))  # 715 + 18358 = 19073: fits exactly
    log_dir = tmp_path / "log"
    proc = run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--lr_schedule=wsd", "--max_steps=10",
                    "--warmup_steps=5", "--warmdown_steps=6", check=False, in_process=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --warmdown_steps=6 and --warmup_steps=5 are longer than the run "
                                                "(--max_steps=10): lower them or raise max_steps"]
    assert not log_dir.exists()  # stopped before any work


# --- end to end ---


def test_shuffled_wsd_run_resumes_bit_identically_and_logs_the_lr_it_used(tmp_path):
    data = tmp_path / "data"
    write_shards(data, [3000], "val", seed=1)
    write_shards(data, [300, 211], "train", seed=2, start_index=1)  # 511 tokens: 6 steps of 128 cross an epoch end
    common = [*TINY, f"--data_dir={data}", "--shuffle=1", "--lr_schedule=wsd", "--warmup_steps=2", "--warmdown_steps=3",
              "--max_lr=3e-3", "--min_lr=3e-4", "--val_every=3", "--val_tokens=100", "--checkpoint_every=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_gpt2(*common, f"--log_dir={straight}", "--max_steps=6", in_process=True).stdout
    resumed.mkdir()  # as if stopped after the step-3 checkpoint, mid-epoch (384 of 511 tokens)
    for name in ("model_00003.pt", "log.txt"):
        shutil.copy(straight / name, resumed / name)
    run_gpt2(*common, f"--log_dir={resumed}", "--max_steps=6", "--init_from=resume", in_process=True)
    with open(straight / "log.txt") as a, open(resumed / "log.txt") as b:
        assert a.read() == b.read()
    a, b = (gpt2.load_checkpoint(str(d / "model_00006.pt")) for d in (straight, resumed))
    assert a["loader"] == b["loader"] == {"position": 6 * 128, "seed": 1337}
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # warmup 1.5e-3, 3e-3; stable 3e-3; then 1 - sqrt over steps 3, 4, 5, reaching min_lr at the last
    expected = [1.5e-3, 3e-3, 3e-3] + [3e-4 + 2.7e-3 * (1 - math.sqrt(k / 3)) for k in (1, 2, 3)]
    logged = [float(line.split("| lr ")[1].split()[0]) for line in out.splitlines() if "| lr " in line]
    assert logged == pytest.approx(expected, rel=1e-4)
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected[-1])  # what AdamW took last
