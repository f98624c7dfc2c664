"""--optimizer=muon: each block matrix updated as torch.optim.Muon updates it alone (q, k and v apart), every parameter
in one optimizer, and the training script's guarantees (exact resume, ranks = accumulation) with it."""

import io

import pytest
import torch
import torch.nn as nn
from conftest import TINY, read_log, run_gpt2

from gpt2 import GPT, Config, GPTConfig, estimate_memory, load_checkpoint, model_config, muon_settings
from muon import MuonAdamW

C = 32  # the width of the tiny model
T = 16  # TINY's block_size
MUON = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01}  # a decay, so that it is tested too
ADAMW = {"weight_decay": 0.1, "learning_rate": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "device_type": "cpu"}


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=T, vocab_size=128, n_layer=2, n_head=2, n_embd=C))


def random_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def scheduled(optimizer, lr):
    """What the training loop does before each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1)


def test_muon_updates_each_block_matrix_as_torch_muon_on_that_matrix_alone():
    model = tiny_model()
    optimizer = model.configure_optimizers(**ADAMW, muon=MUON)
    assert isinstance(optimizer, MuonAdamW)
    block = model.transformer.h[1]
    fused = block.attn.c_attn.weight  # (3C, C): q, k, v
    others = {"c_proj": block.attn.c_proj.weight, "c_fc": block.mlp.c_fc.weight, "mlp.c_proj": block.mlp.c_proj.weight}
    # independent copies: q, k and v as three standalone matrices, each other matrix alone, and (to show that the split
    # matters) the fused weight as one matrix; AdamW's share through torch's AdamW
    alone = {name: nn.Parameter(t.detach().clone()) for name, t in [("q", fused[:C]), ("k", fused[C:2 * C]),
                                                                      ("v", fused[2 * C:]), *others.items()]}
    whole = nn.Parameter(fused.detach().clone())
    wte, bias = model.transformer.wte.weight, model.transformer.ln_f.bias
    adam_alone = {"wte": nn.Parameter(wte.detach().clone()), "bias": nn.Parameter(bias.detach().clone())}
    muon_ref = torch.optim.Muon(list(alone.values()), lr=MUON["lr"], momentum=MUON["momentum"],
                                weight_decay=MUON["weight_decay"])
    muon_whole = torch.optim.Muon([whole], lr=MUON["lr"], momentum=MUON["momentum"], weight_decay=MUON["weight_decay"])
    adamw_ref = torch.optim.AdamW([{"params": [adam_alone["wte"]], "weight_decay": 0.1},
                                   {"params": [adam_alone["bias"]], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for seed, lr in enumerate([6e-4, 3e-4, 6e-5]):  # the schedule scales both optimizers
        random_grads(model, seed)
        for name, g in [("q", fused.grad[:C]), ("k", fused.grad[C:2 * C]), ("v", fused.grad[2 * C:]),
                        *((n, p.grad) for n, p in others.items())]:
            alone[name].grad = g.clone()
        whole.grad = fused.grad.clone()
        adam_alone["wte"].grad, adam_alone["bias"].grad = wte.grad.clone(), bias.grad.clone()
        scheduled(optimizer, lr)
        for group in muon_ref.param_groups + muon_whole.param_groups:
            group["lr"] = lr * (MUON["lr"] / 6e-4)
        for group in adamw_ref.param_groups:
            group["lr"] = lr
        optimizer.step()
        muon_ref.step()
        muon_whole.step()
        adamw_ref.step()
        assert torch.equal(fused[:C], alone["q"]) and torch.equal(fused[C:2 * C], alone["k"])
        assert torch.equal(fused[2 * C:], alone["v"])
        for name, p in others.items():
            assert torch.equal(p, alone[name]), name
        assert torch.equal(wte, adam_alone["wte"]) and torch.equal(bias, adam_alone["bias"])
        assert (fused - whole).abs().max() > 1e-4  # one 3C x C matrix would have been another update
    assert torch.equal(fused[:C], alone["q"])  # still after the loop: the views write into the fused weight


def test_every_parameter_is_in_exactly_one_optimizer():
    model = tiny_model()
    optimizer = model.configure_optimizers(**ADAMW, muon=MUON)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # through each optimizer's own tensors, not the model's: AdamW's add 1, Muon's 10
        for p in (p for group in optimizer.adamw.param_groups for p in group["params"]):
            p.add_(1)
        for p in (p for group in optimizer.muon.param_groups for p in group["params"]):
            p.add_(10)
    names = dict(model.named_parameters())  # the tied wte / lm_head weight once
    block_matrices = {n for n, p in names.items() if n.startswith("transformer.h.") and p.dim() == 2}
    assert len(block_matrices) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of the 2 blocks
    for name, p in names.items():
        # every element reached once, by the optimizer it belongs to: 0 would be none, 2, 11 or 20 two
        expected = 10.0 if name in block_matrices else 1.0
        assert torch.equal(p, torch.full_like(p, expected)), name
    # the state is numbered over AdamW's parameters, then Muon's (c_attn as its 3 pieces), once each
    numbers = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
    assert numbers == list(range(len(names) - len(block_matrices) + 2 * 6))
    # and zero_grad reaches every gradient, the fused c_attn's too (else it would add up from step to step)
    random_grads(model, 0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert [n for n, p in names.items() if p.grad is not None] == []


def test_state_dict_restores_both_optimizers_exactly():
    model, copy = tiny_model(), tiny_model()
    optimizer = model.configure_optimizers(**ADAMW, muon=MUON)
    for seed in range(2):
        random_grads(model, seed)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as a checkpoint stores it, and loads it: plain data only
    buffer.seek(0)
    copy.load_state_dict(model.state_dict())
    restored = copy.configure_optimizers(**ADAMW, muon={**MUON, "lr": 0.05})  # this run's settings are kept
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert [g["lr"] for g in restored.muon.param_groups] == [0.05]
    for group in restored.muon.param_groups:
        group["lr"], group["lr_scale"] = MUON["lr"], MUON["lr"] / 6e-4
    for seed in (2, 3):
        random_grads(model, seed)
        random_grads(copy, seed)
        optimizer.step()
        restored.step()
    for (name, a), b in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(a, b), name


def train(shards, log_dir, *extra, ranks=0, check=True):
    args = [*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--warmup_steps=2", "--max_steps=6",
            "--val_every=3", "--val_tokens=128", "--checkpoint_every=3", "--max_lr=3e-3", "--optimizer=muon", *extra]
    # one process: gpt2.py's command line run in this one (conftest.gpt2_here), seconds cheaper than a fresh process
    return run_gpt2(*args, torchrun_ranks=ranks, check=check, in_process=not ranks)


def test_resume_is_bit_identical_and_switching_optimizer_is_refused(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = train(shards, straight).stdout
    assert "lr 3.0000e-03/2.0000e-02" in out  # both learning rates at the peak (step 1 of warmup 2)
    train(shards, resumed, "--max_steps=3")
    train(shards, resumed, "--init_from=resume", "--max_steps=6")
    with open(straight / "log.txt") as a, open(resumed / "log.txt") as b:
        assert a.read() == b.read()
    ckpt_a, ckpt_b = (load_checkpoint(d / "model_00006.pt") for d in (straight, resumed))
    for name in ckpt_a["model"]:
        assert torch.equal(ckpt_a["model"][name], ckpt_b["model"][name]), name
    state_a, state_b = ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    assert any("momentum_buffer" in s for s in state_a.values()) and any("exp_avg" in s for s in state_a.values())
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(state_a[i][key], state_b[i][key]), (i, key)
    proc = train(shards, resumed, "--init_from=resume", "--optimizer=adamw", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "--optimizer=adamw conflicts with checkpoint" in proc.stderr and "optimizer=muon" in proc.stderr


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_accumulation(shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    batch = ["--micro_batch_size=2", f"--total_batch_size={4 * T}", "--val_tokens=150"]
    train(shards, one, *batch)  # 2 micro-steps
    train(shards, two, *batch, ranks=2)  # 1 on each rank
    log_one, log_two = read_log(one), read_log(two)
    assert log_one.keys() == log_two.keys()
    for key in log_one:
        assert log_one[key] == pytest.approx(log_two[key], abs=1e-5), key
    weights_one, weights_two = (load_checkpoint(d / "model_00006.pt")["model"] for d in (one, two))
    for name in weights_one:
        torch.testing.assert_close(weights_one[name], weights_two[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_memory_estimate_counts_the_optimizer_state_each_keeps(name):
    # Muon keeps one moment per block matrix where AdamW keeps two: the estimate printed at start counts what torch holds
    cfg = Config(n_layer=2, n_head=2, n_embd=C, block_size=T, vocab_size=128, optimizer=name, micro_batch_size=1)
    torch.manual_seed(0)
    model = GPT(model_config(cfg))
    optimizer = model.configure_optimizers(**ADAMW, muon=muon_settings(cfg))
    random_grads(model, 0)
    optimizer.step()
    held = sum(t.nbytes for state in optimizer.state_dict()["state"].values() for k, t in state.items() if k != "step")
    assert estimate_memory(cfg, 1, torch.float32, "chunked")["optimizer"] == held
