"""The model against independent computations: transformers' GPT-2, ln(vocab), the schedule's formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2
from gpt2 import GPT, Config, GPTConfig, LinearCrossEntropy, UserError, get_lr


def tiny(**kw):
    return GPTConfig(**{"block_size": 32, "vocab_size": 512, "n_layer": 2, "n_head": 4, "n_embd": 64, **kw})


def test_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=4096))
    x, y = torch.randint(0, 4096, (2, 4, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(4096)) < 0.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    x, y = torch.randint(0, 512, (2, 2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_matches_transformers_gpt2():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                                    activation_function="gelu_new")).eval()
    ours = GPT(tiny())
    # copy the weights by hand; transformers' Conv1D keeps (in, out), nn.Linear (out, in)
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(theirs[name].t() if name.endswith(conv1d) and ".h." in name else theirs[name])
    idx = torch.randint(0, 512, (3, 32))
    logits, _ = ours(idx[:, :-1])
    _, loss = ours(idx[:, :-1], idx[:, 1:])
    out = hf(idx, labels=idx)
    torch.testing.assert_close(logits, out.logits[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [2**27, 3000])  # one chunk; 10 rows a chunk, the last one short
def test_linear_cross_entropy_equals_the_plain_path(monkeypatch, chunk_elements):
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (37,))
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    plain = F.cross_entropy(x2 @ w2.t(), targets)
    (3 * plain).backward()  # something after the loss scales its gradient
    keep = {"logits": torch.full((10,), float("nan"))}  # too small: replaced, then reused by the next calls
    for memory in (None, keep, keep):
        x.grad = w.grad = None
        loss = LinearCrossEntropy.apply(x, w, targets, memory)
        (3 * loss).backward()
        torch.testing.assert_close(loss, plain)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w.grad, w2.grad)
        with torch.no_grad():
            torch.testing.assert_close(LinearCrossEntropy.apply(x, w, targets, memory), plain)
    assert keep["logits"].numel() == min(37, chunk_elements // 300) * 300
    # bfloat16 autocast: matmuls in bfloat16, softmax in float32, as autocast runs the plain path
    for t in (x, w, x2, w2):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(x, w, targets)
        plain = F.cross_entropy(x2 @ w2.t(), targets)
    loss.backward()
    plain.backward()
    assert loss.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((x.grad, x2.grad), (w.grad, w2.grad)):  # both round the same products to bfloat16
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2 * theirs.abs().max().item())


def test_log_softmax_chunks_over_the_first_vocab_tokens(monkeypatch):
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ELEMENTS", 3000)  # 10 rows a chunk
    torch.manual_seed(0)
    x, w = torch.randn(25, 16), torch.randn(300, 16)
    expected = F.log_softmax(x @ w[:257].t(), dim=1)  # the last 43 rows of w are padding
    keep = {}
    for _ in range(2):  # the second time in the kept buffer
        chunks = [(rows, logp.clone()) for rows, logp, _ in gpt2.log_softmax_chunks(x, w, keep, vocab=257)]
        assert [(rows.start, rows.stop) for rows, _ in chunks] == [(0, 10), (10, 20), (20, 25)]
        got = torch.cat([logp for _, logp in chunks])
        torch.testing.assert_close(got[:, :257], expected)
        assert (got[:, 257:] == float("-inf")).all()


def test_gpt2_init_and_weight_tying():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=2048, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(proj.weight.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.001
            assert proj.bias.abs().max().item() == 0


def test_weight_decay_only_on_matrices():
    model = GPT(tiny())
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for name, p in model.named_parameters():
        expected = name.endswith("weight") and "ln_" not in name
        assert (id(p) in decay) == expected, name
        assert (id(p) in no_decay) != expected, name


def test_impossible_configs_are_clear_errors():
    with pytest.raises(UserError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="n_layer=0"):
        GPTConfig(n_layer=0)
    model = GPT(tiny())
    with pytest.raises(ValueError, match="33 tokens is longer than block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_lr_schedule():
    cfg = Config(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert get_lr(0, cfg) == pytest.approx(0.1)
    assert get_lr(9, cfg) == pytest.approx(1.0)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert get_lr(109, cfg) == pytest.approx(0.1, abs=1e-3)
    assert get_lr(110, cfg) == pytest.approx(0.1)
    # a constant floor after a shorter cosine
    cfg.lr_decay_steps = 50
    assert get_lr(35, cfg) == pytest.approx(0.55)
    assert all(get_lr(s, cfg) == pytest.approx(0.1) for s in range(60, 110))
