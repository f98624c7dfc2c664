"""Sharded training (--fsdp=1), activation checkpointing, the two loss paths and the memory estimate.

The FSDP runs are compared with one process doing the same work with gradient accumulation, as DDP's are in
test_train.py: two gloo ranks on the CPU, each reading half of every batch. The one-process runs go through gpt2.py's
command line in the test process (conftest.gpt2_here).
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, read_log, run_gpt2
from test_train import T, assert_logs_close, assert_weights_close, final_weights

import gpt2
from cli import merge_settings

# vocab 50304 so that HellaSwag and the samples (GPT-2 token ids) can run too, on every rank under FSDP
BATCH = ["--vocab_size=50304", "--micro_batch_size=2", f"--total_batch_size={4 * T}", "--warmup_steps=2", "--max_steps=6",
         "--val_every=3", "--checkpoint_every=3", "--max_lr=3e-3"]


def run(shards, log_dir, *extra, ranks=0):
    return run_gpt2(*TINY, *BATCH, f"--data_dir={shards}", f"--log_dir={log_dir}", *extra, torchrun_ranks=ranks,
                    in_process=not ranks)


def run_two_nodes(*args):
    """gpt2.py as 2 nodes of 1 rank each, meeting through a c10d rendezvous on the loopback; returns node 0's stdout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={i}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=fsdp_test", os.path.join(ROOT, "gpt2.py"), *merge_settings(args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, f"{out}\n{err}"
    return outs[0][0] + outs[1][0]


@pytest.fixture(scope="module")
def hella_file(tmp_path_factory):
    from test_hellaswag import ROWS, write_jsonl

    # 33 examples: one rank scores 17 (two batches of 16), the other 16 and must run a second forward as well
    rows = [dict(row, ind=i) for i, row in enumerate((ROWS * 33)[:33])]
    return write_jsonl(tmp_path_factory.mktemp("hella") / "hellaswag_val.jsonl", rows)


@pytest.mark.slow
def test_fsdp_equals_one_process_and_checkpoints_move_both_ways(shards, hella_file, tmp_path):
    evals = ["--hellaswag_every=3", f"--hellaswag_file={hella_file}", "--sample_every=3",
             "--num_samples=2", "--max_new_tokens=4"]
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    out_one = run(shards, one, *evals, "--val_tokens=128").stdout
    out_fsdp = run(shards, fsdp, *evals, "--val_tokens=128", "--fsdp=1", ranks=2).stdout
    # the two ranks' val windows together are the one process's four; HellaSwag counts are summed over the ranks
    log_one = read_log(one)
    assert {kind for _, kind in log_one} == {"train", "val", "bpb", "hella"}
    assert_logs_close(log_one, read_log(fsdp), atol=1e-5)
    assert_weights_close(final_weights(one)[1], final_weights(fsdp)[1], atol=1e-5)
    samples = lambda out: [line for line in out.splitlines() if line.startswith("sample ")]
    assert len(samples(out_one)) == 3 * 2 and samples(out_fsdp) == samples(out_one)  # printed once, by rank 0

    # a checkpoint written under FSDP is a plain one: same keys, tensors and optimizer numbering as one process's
    a, b = (gpt2.load_checkpoint(d / "model_00003.pt") for d in (one, fsdp))
    assert a["model"].keys() == b["model"].keys()
    assert b["model"]["lm_head.weight"].data_ptr() == b["model"]["transformer.wte.weight"].data_ptr()  # tied, stored once
    assert [g["params"] for g in a["optimizer"]["param_groups"]] == [g["params"] for g in b["optimizer"]["param_groups"]]
    for i, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][i].keys()
        for k in state:
            torch.testing.assert_close(state[k], b["optimizer"]["state"][i][k], atol=1e-5, rtol=0)

    # FSDP's step-3 checkpoint goes on in one process, and one process's under FSDP, on 2 nodes of one rank each with
    # activation checkpointing: both log what `one` logged
    no_evals = ["--hellaswag_every=0", "--sample_every=0"]
    to_one, to_fsdp = tmp_path / "to_one", tmp_path / "to_fsdp"
    run(shards, to_one, *no_evals, f"--init_from={fsdp / 'model_00003.pt'}", "--val_tokens=128")
    run_two_nodes(*TINY, *BATCH, *no_evals, f"--data_dir={shards}", f"--log_dir={to_fsdp}",
                  f"--init_from={one / 'model_00003.pt'}", "--val_tokens=128", "--fsdp=1", "--activation_checkpointing=1")
    after_3 = lambda log: {k: v for k, v in log.items() if k[0] >= 3 and k[1] != "hella"}
    for moved in (to_one, to_fsdp):
        assert_logs_close(after_3(log_one), after_3(read_log(moved)), atol=1e-5)
        assert_weights_close(final_weights(one)[1], final_weights(moved)[1], atol=1e-5)

    # FSDP resumed from its own checkpoint on the same ranks: bit-identical, as if never stopped
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    os.remove(resumed / "model_00006.pt")
    run(shards, resumed, *evals, f"--init_from={resumed / 'model_00003.pt'}", ranks=2)
    with open(fsdp / "log.txt") as f, open(resumed / "log.txt") as g:
        assert f.read() == g.read()
    a, b = (gpt2.load_checkpoint(d / "model_00006.pt") for d in (fsdp, resumed))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32) | overrides
    return gpt2.GPT(gpt2.GPTConfig(**config))


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_plain_and_chunked_losses_and_gradients_are_equal():
    model = tiny_model()
    x, y = torch.randint(0, 100, (2, 3, 16))
    model.loss_impl = "plain"
    plain_loss, plain_grads = loss_and_grads(model, x, y)
    # the plain path is F.cross_entropy on the logits, written out here
    logits, _ = model(x)
    torch.testing.assert_close(plain_loss, F.cross_entropy(logits.view(-1, 100), y.view(-1)))
    model.loss_impl = "chunked"
    chunked_loss, chunked_grads = loss_and_grads(model, x, y)
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-6, rtol=0)
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    model = tiny_model(n_layer=4)
    x, y = torch.randint(0, 100, (2, 4, 16))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss, grads = loss_and_grads(model, x, y)
    for block in model.transformer.h:
        block.recompute = True
    kept_recompute = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept_recompute.append(t.numel()) or t, lambda t: t):
        loss_r, grads_r = loss_and_grads(model, x, y)
    assert torch.equal(loss, loss_r)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=0, rtol=0, msg=name)
    assert sum(kept_recompute) < sum(kept) / 2
    # generation (no grad, KV cache) never recomputes: same tokens as without
    prompt = [1, 2, 3]
    tokens_r, _ = gpt2.generate(model, prompt, 2, 5, top_k=1)
    for block in model.transformer.h:
        block.recompute = False
    assert torch.equal(gpt2.generate(model, prompt, 2, 5, top_k=1)[0], tokens_r)


def test_memory_estimate_counts_the_model_and_what_backward_keeps():
    cfg = gpt2.Config(n_layer=4, n_head=2, n_embd=64, block_size=32, vocab_size=512, micro_batch_size=4)
    model = gpt2.GPT(gpt2.model_config(cfg))
    n = sum(p.numel() for p in model.parameters())
    single = gpt2.estimate_memory(cfg, 1, torch.float32, loss_impl="chunked")
    assert single["weights"] == 4 * n and single["optimizer"] == 8 * n and single["gathered"] == 0
    sharded = gpt2.estimate_memory(gpt2.Config(**{**cfg.__dict__, "fsdp": True}), 8, torch.float32, loss_impl="chunked")
    assert sharded["weights"] == 4 * n / 8 and sharded["optimizer"] == 8 * n / 8
    # the blocks' share of the activations, against the tensors autograd really keeps for backward
    x = torch.randint(0, 512, (4, 32))
    kept = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(x)
    assert sum(kept.values()) == pytest.approx(single["activations_kept"] - single["loss"], rel=0.15)

    # with recompute under bf16 autocast (DDP's way), what the forward keeps is each block's input (and ln_f's): the
    # residual stream, which autocast leaves in float32; the estimate's recompute activations less one block's worth
    # and the loss
    cfg = gpt2.Config(**{**cfg.__dict__, "activation_checkpointing": True})
    estimate = gpt2.estimate_memory(cfg, 1, torch.bfloat16, loss_impl="chunked")
    for block in model.transformer.h:
        block.recompute = True
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(x)
    one_block = x.numel() * cfg.n_embd * 16 * 2
    assert sum(kept.values()) == pytest.approx(estimate["activations_recompute"] - estimate["loss"] - one_block, rel=0.15)


def test_loss_impl_auto_and_a_bad_name():
    assert gpt2.resolve_loss_impl("auto", torch.device("cpu")) == "chunked"
    assert gpt2.resolve_loss_impl("auto", torch.device("cuda")) == "plain"
    with pytest.raises(gpt2.UserError, match=r"--loss_impl=fast: expected auto, chunked or plain"):
        gpt2.resolve_loss_impl("fast", torch.device("cpu"))
