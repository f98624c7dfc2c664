"""Sampling: greedy decoding against transformers' generate, the KV cache against full recomputation, --mode=sample."""

import contextlib
import json
import math

import pytest
import torch
from conftest import run_gpt2

import cli
import gpt2

transformers = pytest.importorskip("transformers")


def hf_model(seed=0, **config):
    """A random transformers GPT-2 with weights large enough (std 0.2) that greedy text is not one repeated token."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**{"vocab_size": 128, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
                                           "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None, **config})
    return transformers.GPT2LMHeadModel(hf_config).eval()


@pytest.fixture
def models(tmp_path):
    """(transformers' model, ours with its weights), through a directory as a user would load one."""
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    return hf, gpt2.load_model(str(tmp_path / "hf")).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_transformers_generate(models, use_cache):
    hf, model = models
    prompt = [5, 17, 99, 3, 64]
    ours, _ = gpt2.generate(model, prompt, 2, 48, top_k=1, use_cache=use_cache)
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48, min_new_tokens=48, pad_token_id=0)
    assert len(set(ours[0].tolist())) > 3  # a test of something: the text does not collapse to one token
    assert ours[0].tolist() == theirs[0, len(prompt):].tolist()
    assert ours[1].tolist() == ours[0].tolist()


def test_cache_gives_the_same_tokens_and_logprobs(models):
    _, model = models
    results = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        results.append(gpt2.generate(model, [1, 2, 3], 4, 60, top_k=20, temperature=0.9, generator=generator,
                                     use_cache=use_cache))
    (cached, cached_lp), (full, full_lp) = results
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_lp, full_lp, atol=1e-5, rtol=0)
    assert len(set(cached[:, -1].tolist())) > 1  # the samples differ from each other


def test_logprobs_are_the_models(models):
    hf, model = models
    prompt = [9, 8, 7]
    tokens, logprobs = gpt2.generate(model, prompt, 1, 10, top_k=5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([prompt + tokens[0].tolist()])
    with torch.no_grad():
        expected = torch.log_softmax(hf(seq).logits[0, len(prompt) - 1:-1] / 0.7, dim=-1)  # (10, V)
    torch.testing.assert_close(logprobs[0], expected.gather(-1, tokens[0, :, None])[:, 0], atol=1e-5, rtol=0)


def test_top_k_is_respected(models):
    _, model = models
    tokens, _ = gpt2.generate(model, [4], 64, 1, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        allowed = set(model(torch.tensor([[4]]))[0][0, -1].topk(3).indices.tolist())
    assert set(tokens[:, 0].tolist()) <= allowed and len(set(tokens[:, 0].tolist())) > 1


def test_sample_mode_writes_the_samples_file(tmp_path):
    pytest.importorskip("tiktoken")
    hf = hf_model(vocab_size=50257, n_positions=24, initializer_range=0.02)
    hf.save_pretrained(tmp_path / "hf")
    samples_file = tmp_path / "samples.jsonl"
    long_prompt = " ".join(["one two three four five six seven eight nine ten"] * 3)  # 30 tokens
    proc = run_gpt2("--mode=sample", f"--init_from={tmp_path / 'hf'}", f"--prompt={long_prompt}", "--num_samples=3",
                    "--max_new_tokens=8", "--top_k=50", "--temperature=1.0", "--seed=42", f"--samples_file={samples_file}",
                    "--device=cpu", in_process=True)
    assert "keeping its last 16 tokens" in proc.stdout
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("sample ")] == \
        ["sample 0", "sample 1", "sample 2"]
    records = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(records) == 3
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    prompt = enc.encode_ordinary(long_prompt)[-16:]
    for r in records:
        assert set(r) == {"prompt", "completion", "tokens", "mean_logprob", "perplexity"}
        assert len(r["tokens"]) == 8 and enc.decode(r["tokens"]) == r["completion"]
        assert r["prompt"] == enc.decode(prompt)
        assert r["perplexity"] == pytest.approx(math.exp(-r["mean_logprob"]), rel=1e-9)
        # the mean log-probability, recomputed with transformers
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + r["tokens"]])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r["tokens"])[:, None]).mean()
        assert r["mean_logprob"] == pytest.approx(expected.item(), abs=1e-4)
    # the same seed gives the same samples, in-process too
    cfg = gpt2.Config(prompt=long_prompt, num_samples=3, max_new_tokens=8, seed=42)
    again = gpt2.print_samples(gpt2.load_model(str(tmp_path / "hf")), enc, torch.device("cpu"), contextlib.nullcontext, cfg)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in records]
    assert [r["mean_logprob"] for r in again] == pytest.approx([r["mean_logprob"] for r in records], abs=1e-5)


def test_sample_mode_errors_are_one_line():
    proc = run_gpt2("--mode=sample", check=False, in_process=True)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --mode=sample needs a model")
    assert len(proc.stderr.strip().splitlines()) == 1
    for arg, message in [("--top_k=0", "--top_k=0: must be at least 1"), ("--temperature=0", "must be > 0"),
                         ("--mode=generate", "--mode=generate: expected train, sample or export")]:
        cfg = gpt2.Config()
        with pytest.raises(gpt2.UserError, match=message):
            gpt2.main(cfg, cli.apply_overrides(cfg, cli.merge_settings(["--mode=sample", "--init_from=gpt2", arg])))
