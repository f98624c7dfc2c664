"""Hugging Face GPT-2 in both directions: same weights give the same logits as transformers' own model."""

import os
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, read_log, run_gpt2

import cli
import gpt2

transformers = pytest.importorskip("transformers")


def save_hf_model(path, seed=0, **config):
    """A randomly initialised transformers GPT-2 saved with save_pretrained (the format of the hub's models)."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**{"vocab_size": 128, "n_positions": 32, "n_embd": 32, "n_layer": 2,
                                           "n_head": 2, "bos_token_id": None, "eos_token_id": None, **config})
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(path)
    return hf


def train_checkpoint(tmp_path, shards, *args):
    """A two-step TINY training run; returns the checkpoint's path."""
    log_dir = str(tmp_path / "log")
    run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={log_dir}", "--total_batch_size=64", "--max_steps=2",
             "--warmup_steps=1", "--val_every=0", *args, in_process=True)
    return gpt2.checkpoint_path(log_dir, 2)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hf_directory_loads_with_the_same_logits(tmp_path, weights_file):
    hf = save_hf_model(tmp_path / "hf")
    if weights_file == "pytorch_model.bin":  # the older format, as many directories on the hub still hold it
        torch.save(hf.state_dict(), tmp_path / "hf" / weights_file)
        os.remove(tmp_path / "hf" / "model.safetensors")
    assert gpt2.is_hf_model(str(tmp_path / "hf")) and gpt2.is_hf_model("gpt2-xl") and not gpt2.is_hf_model(str(tmp_path))
    model = gpt2.load_model(str(tmp_path / "hf"))
    assert model.config == gpt2.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    x = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hf_config_takes_the_model_fields_and_refuses_conflicts(tmp_path):
    save_hf_model(tmp_path / "hf")
    name = str(tmp_path / "hf")
    cfg = gpt2.Config()
    merged = gpt2.hf_config(cfg, set(), gpt2.load_hf_model(name), name)
    assert (merged.n_layer, merged.n_embd, merged.block_size, merged.vocab_size) == (2, 32, 32, 128)
    cfg.n_layer = 3
    with pytest.raises(gpt2.UserError, match="--n_layer=3 conflicts with .*n_layer=2"):
        gpt2.hf_config(cfg, {"n_layer"}, gpt2.load_hf_model(name), name)
    # a shorter context keeps the first position embeddings
    cfg = gpt2.Config(block_size=8)
    model = gpt2.load_hf_model(name)
    assert gpt2.hf_config(cfg, {"block_size"}, model, name).block_size == 8
    assert model.transformer.wpe.weight.shape == (8, 32)


def test_fine_tuning_starts_from_the_hf_weights(tmp_path, shards):
    hf = save_hf_model(tmp_path / "hf")  # TINY's shape, with 32 positions of which TINY's block_size keeps 16
    log_dir = str(tmp_path / "log")
    proc = run_gpt2(*TINY, f"--init_from={tmp_path / 'hf'}", f"--data_dir={shards}", f"--log_dir={log_dir}",
                    "--total_batch_size=64", "--max_steps=2", "--warmup_steps=1", "--val_every=2", "--val_tokens=64",
                    in_process=True)
    assert "fine-tuning" in proc.stdout
    # the first step's loss is transformers' loss on the first batch (random init would give another)
    first = torch.from_numpy(np.load(os.path.join(shards, "edufineweb_train_000001.npy"))[:65].astype(np.int64))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(first[:-1].view(4, 16)).logits.view(-1, 128), first[1:])
    assert read_log(log_dir)[(0, "train")] == pytest.approx(expected.item(), abs=2e-6)
    ckpt = gpt2.load_checkpoint(gpt2.checkpoint_path(log_dir, 2))
    assert ckpt["config"]["block_size"] == 16 and ckpt["model"]["transformer.wpe.weight"].shape == (16, 32)
    assert os.path.isfile(os.path.join(log_dir, "log.png"))


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, shards):
    path = train_checkpoint(tmp_path, shards, "--vocab_size=50304")
    out = tmp_path / "export"
    proc = run_gpt2("--mode=export", f"--init_from={path}", f"--export_dir={out}", in_process=True)
    assert "exported" in proc.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 16
    model = gpt2.load_model(path)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(ours[..., :50257], theirs, atol=1e-5, rtol=0)
    # and back again: our loader reads what we exported
    with torch.no_grad():
        torch.testing.assert_close(gpt2.load_model(str(out))(x)[0], theirs, atol=1e-5, rtol=0)


def test_exported_tokenizer_encodes_like_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.get_encoding("gpt2")
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    written = gpt2.export_hf(model, str(tmp_path / "export"))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(written)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "Hello, I'm a language model,\n\n  naïve café 日本語 <|endoftext|> ...\tend"
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.decode(enc.encode_ordinary("round trip: ünïcode")) == "round trip: ünïcode"
    assert tok.eos_token_id == enc.eot_token


def test_export_refuses_small_vocab_and_foreign_directories(tmp_path):
    small = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(gpt2.UserError, match="vocab_size=128 < 50257"):
        gpt2.export_hf(small, str(tmp_path / "a"))
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(gpt2.UserError, match="not empty and not an earlier export"):
        gpt2.export_hf(model, str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    # an earlier export is replaced, and nothing is left beside it
    gpt2.export_hf(model, str(tmp_path / "exp"))
    gpt2.export_hf(model, str(tmp_path / "exp"))
    assert sorted(os.listdir(tmp_path)) == ["exp", "mine"]


def test_wandb_gets_the_metrics_from_rank_0(tmp_path, shards, monkeypatch):
    """Weights & Biases, replaced by a recorder: what gpt2.py sends, in-process."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    class FakeWandb:
        @staticmethod
        def init(project, name, config):
            calls.append(("init", project, name, config["n_layer"]))
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    cfg = gpt2.Config()
    overridden = cli.apply_overrides(cfg, cli.merge_settings([
        *TINY, f"--data_dir={shards}", f"--log_dir={tmp_path / 'log'}", "--total_batch_size=64", "--max_steps=2",
        "--warmup_steps=1", "--val_every=2", "--val_tokens=64", "--wandb_log=1", "--wandb_project=p", "--wandb_run_name=r"]))
    gpt2.train(cfg, overridden)
    log = read_log(str(tmp_path / "log"))
    assert calls[0] == ("init", "p", "r", 2) and calls[-1] == "finish"
    assert [c[0] for c in calls[1:-1]] == [0, 0, 1, 2]
    assert calls[2][1]["train/loss"] == pytest.approx(log[(0, "train")], abs=1e-6)
    assert calls[4][1]["val/loss"] == pytest.approx(log[(2, "val")], abs=1e-4)


def test_wandb_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(gpt2.UserError, match="pip install wandb"):
        gpt2.start_wandb(gpt2.Config(wandb_log=True))
