"""HellaSwag (gpt2.py's scorer and hellaswag.py's command line): data loading and caching, the scorer against independent
computations, the CLI, two ranks, and errors during training."""

import json
import os
import subprocess
import sys

import pytest
import tiktoken
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, run_gpt2

import cli
import gpt2
import hellaswag

# a few examples in the real schema: ActivityNet-style (short) and WikiHow-style (long), labels as strings and ints
ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window "
     "of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "Then, the man writes over the snow "
     "covering the window of a car, and a woman wearing winter clothes smiles. then", "split": "val", "split_type": "indomain",
     "label": "3", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
     "supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas "
     "coat, knitted with netting.", ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y"},
    {"ind": 47, "activity_label": "Starting a campfire", "ctx_a": "He takes his lighter and lights the newspaper in several "
     "places to start the fire. The bonfire starts burning and continues to burn.", "ctx_b": "he", "ctx": "He takes his "
     "lighter and lights the newspaper in several places to start the fire. The bonfire starts burning and continues to "
     "burn. he", "split": "val", "split_type": "indomain", "label": 1, "endings": ["plays with the dog and makes two cookies.",
     "adds a few more twigs to keep the flames burning.", "gets up and attempts to put a flag on it, fails and makes a "
     "complete mess.", "puts on equipment and stools."], "source_id": "activitynet~v_-Xl95IW5H_s"},
    {"ind": 40210, "activity_label": "Work World", "ctx_a": "[header] How to retract a resignation letter [title] Format "
     "your letter. [step] Set it up as a standard letter, using a legible font such as times new roman 12 point.",
     "ctx_b": "", "ctx": "[header] How to retract a resignation letter [title] Format your letter. [step] Set it up as a "
     "standard letter, using a legible font such as times new roman 12 point.", "split": "val", "split_type": "zeroshot",
     "label": "0", "endings": ["Address your letter to the person who received your resignation letter, and date it.",
                               "[title] Write a funny letter. [step] You want to be as light as possible.",
                               "Sign it with a pen, then fold it in thirds and mail it to your boss's home address "
                               "with a stamp you bought at the local post office last week.",
                               "Do n't use the letter."], "source_id": "wikihow~66610"},
    {"ind": 30, "activity_label": "Getting a haircut", "ctx_a": "The man in the blue shirt sits on the chair next to the "
     "sink. The other man begins washing his hair. He scrubs in the shampoo and then washes it off.", "ctx_b": "he",
     "ctx": "The man in the blue shirt sits on the chair next to the sink. The other man begins washing his hair. He scrubs "
     "in the shampoo and then washes it off. he", "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["then combs it and blow dries his hair after styling it with gel.", "shows the razor that he has for "
                 "shaving his hair.", "hair is now dry, he is on his way to the barber.", "moves the bucket to the other "
                 "side of the sink and continues washing his hair."], "source_id": "activitynet~v_-4m1y4yEVGk"},
    {"ind": 63, "activity_label": "Fixing the roof", "ctx_a": "A woman with long, black, curly hair is wearing casual wear, "
     "talking, and squatting on a roof.", "ctx_b": "the woman", "ctx": "A woman with long, black, curly hair is wearing "
     "casual wear, talking, and squatting on a roof. the woman", "split": "val", "split_type": "indomain", "label": "2",
     "endings": ["then stands up and walks to a part of the roof where she lifts up a black shingle on the roof.",
                 "turns on a machine attached to a hand cart.", "raises her left leg.", "holds her back while she works on "
                 "the roof, she holds her legs behind her legs."], "source_id": "activitynet~v_-59T6Q4Ks9Y"},
    {"ind": 41001, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow basil indoors [title] Choose a sunny "
     "window. [step] Basil needs six to eight hours of sun a day. A south-facing window is best in the northern "
     "hemisphere.", "ctx_b": "", "ctx": "[header] How to grow basil indoors [title] Choose a sunny window. [step] Basil "
     "needs six to eight hours of sun a day. A south-facing window is best in the northern hemisphere.", "split": "val",
     "split_type": "zeroshot", "label": 3, "endings": ["[title] Paint the pot. [step] Any color will do.", "Water it.",
                                                        "[substeps] Basil grows best in a cold, dark basement where "
                                                        "the temperature stays below freezing all winter long.",
                                                        "[substeps] If you have no such window, use a grow light for "
                                                        "twelve hours a day."], "source_id": "wikihow~70112"},
    {"ind": 88, "activity_label": "Playing violin", "ctx_a": "A girl stands on a stage holding a violin.", "ctx_b": "she",
     "ctx": "A girl stands on a stage holding a violin. she", "split": "val", "split_type": "indomain", "label": "1",
     "endings": ["eats the violin.", "begins to play a slow song while the audience watches.", "is shown in a car.",
                 "throws the bow into the crowd and walks off the stage laughing loudly at the judges."],
     "source_id": "activitynet~v_-7QpWHwnVtA"},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", ROWS)


@pytest.fixture(scope="module")
def examples(data_file):
    return gpt2.load_hellaswag("val", data_file)


def run_hellaswag(*args, torchrun_ranks=0):
    """Runs hellaswag.py in a fresh process; returns (n, acc, acc_norm) parsed from its last stdout line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable]
    if torchrun_ranks:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_ranks}"]
    proc = subprocess.run(cmd + [os.path.join(ROOT, "hellaswag.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"hellaswag.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    n, acc_word, acc, norm_word, acc_norm = proc.stdout.strip().splitlines()[-1].split()
    assert (acc_word, norm_word) == ("acc:", "acc_norm:")
    return int(n), acc, acc_norm


def expected_line(losses, labels):
    """(n, acc, acc_norm) as the CLI prints them, from per-ending token losses [[tensor(len_i)] * 4] per example."""
    n = len(labels)
    by_sum = sum(min(range(4), key=lambda i: ex[i].sum().item()) == y for ex, y in zip(losses, labels, strict=True))
    by_mean = sum(min(range(4), key=lambda i: ex[i].mean().item()) == y for ex, y in zip(losses, labels, strict=True))
    return n, f"{by_sum / n:.4f}", f"{by_mean / n:.4f}"


def reference_losses(model, examples, block_size=None):
    """Straightforward scoring with our GPT's own forward: 4 separate rows context + ending per example (the ending's
    last token is only predicted, so it is not fed), full logits, the loss of each ending token. With block_size, the
    example is first cut as gpt2.fit_example documents it: endings to block_size tokens, then the context from the
    left until context + ending[:-1] fits."""
    out = []
    for ex in examples:
        context, endings = ex.context, ex.endings
        if block_size:
            endings = [e[:block_size] for e in endings]
            context = context[-(block_size + 1 - max(map(len, endings))):]
        per_ending = []
        for ending in endings:
            row = torch.tensor([context + ending[:-1]])
            logits, _ = model(row)
            predicted = logits[0, len(context) - 1:, :50257]  # (len(ending), V): the positions followed by an ending token
            logp = F.log_softmax(predicted.double(), dim=-1)
            per_ending.append(-logp[torch.arange(len(ending)), torch.tensor(ending)])
        out.append(per_ending)
    return out


def tiny_gpt(seed=0, vocab_size=50304, block_size=256):
    torch.manual_seed(seed)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # a larger scale than GPT-2's init, so the endings' scores are far apart and ties impossible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


# --- data ---


def test_examples_render_as_build_nanogpt(examples):
    enc = tiktoken.get_encoding("gpt2")
    assert len(examples) == len(ROWS)
    for ex, row in zip(examples, ROWS, strict=True):
        assert ex.context == enc.encode(row["ctx"])
        assert ex.endings == [enc.encode(" " + e) for e in row["endings"]]
        assert ex.label == int(row["label"])


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "line 3 is not a HellaSwag example"),
    (json.dumps({**ROWS[0], "endings": ROWS[0]["endings"][:3]}), "'endings'"),
    (json.dumps({**ROWS[0], "label": 7}), "'label' is 7"),
    (json.dumps({k: v for k, v in ROWS[0].items() if k != "label"}), "no 'label'"),
    (json.dumps({**ROWS[0], "ctx": ""}), "'ctx'"),
])
def test_malformed_line_is_named(tmp_path, bad, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + bad + "\n")
    with pytest.raises(gpt2.UserError) as e:
        gpt2.load_hellaswag("val", str(path))
    message = str(e.value)
    assert f"{path} line 3" in message and problem in message and "\n" not in message


def test_missing_data_file_says_how_to_fix(tmp_path):
    with pytest.raises(gpt2.UserError, match="does not exist"):
        gpt2.load_hellaswag("val", str(tmp_path / "nope.jsonl"))


def test_cached_file_is_read_without_download(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "hellaswag_val.jsonl", ROWS[:2])
    monkeypatch.setattr(gpt2.urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried to download"))
    got = gpt2.load_hellaswag("val", cache_dir=str(tmp_path), url="file:///nonexistent")
    assert [ex.label for ex in got] == [3, 1]


def test_download_is_atomic_and_then_cached(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", ROWS)
    cache = tmp_path / "cache"
    target = cache / "hellaswag_val.jsonl"
    replaced = []
    real_replace = os.replace

    def replace(src, dst):  # the final name must appear only by a rename of a complete file beside it
        assert not os.path.exists(dst) and os.path.dirname(src) == str(cache)
        with open(src) as f:
            assert f.read() == open(source).read()
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(gpt2.os, "replace", replace)
    got = gpt2.load_hellaswag("val", cache_dir=str(cache), url=f"file://{tmp_path}")
    assert len(got) == len(ROWS) and replaced == [str(target)]
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]  # no temporary file left behind
    assert gpt2.load_hellaswag("val", cache_dir=str(cache), url="file:///nonexistent", limit=2)[1] == got[1]


def test_failed_download_names_the_callers_setting(tmp_path):
    """The error says which setting takes a local copy, as the calling command spells it: gpt2.py's by default."""
    cache = tmp_path / "cache"
    for kwargs, own, other in [({}, "--hellaswag_file", "--data_file"), ({"setting": "--data_file"}, "--data_file",
                                                                          "--hellaswag_file")]:
        with pytest.raises(gpt2.UserError) as e:
            gpt2.load_hellaswag("val", cache_dir=str(cache), url=f"file://{tmp_path}/missing", **kwargs)
        assert f"pass {own}=PATH" in str(e.value) and other not in str(e.value) and "\n" not in str(e.value)
        assert not cache.exists() or os.listdir(cache) == []


UNREACHABLE = "http://127.0.0.1:9"  # a local port that nothing listens on: a download there fails at once, as offline


def offline_env(cache_dir):
    """Environment variables for a command started from here, under which its real download of HellaSwag fails as it
    does offline: an empty cache_dir, and every https request sent through a proxy at UNREACHABLE (gpt2.py and
    evaluate.py have no URL setting). urllib reads proxies when a process first downloads: only a fresh process obeys."""
    return {"HELLASWAG_CACHE": str(cache_dir), "https_proxy": UNREACHABLE, "HTTPS_PROXY": UNREACHABLE, "no_proxy": "",
            "NO_PROXY": ""}  # an empty no_proxy is no exception


# --- scoring ---


def unigram_gpt(logprobs):
    """A GPT whose every next-token distribution is softmax(logprobs), whatever the input: the blocks add
    nothing to the residual stream, the final LayerNorm outputs a constant, and lm_head maps it to logprobs."""
    model = gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=len(logprobs), n_layer=1, n_head=1, n_embd=4))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        model.lm_head = torch.nn.Linear(4, len(logprobs), bias=False)  # untied from wte
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.tensor(logprobs)
    return model


def test_acc_sums_and_acc_norm_averages():
    # token losses: 0 -> 0.5, 1 -> 1.5, 2 -> 2.5 nats (token 3 takes the remaining probability)
    losses = [0.5, 1.5, 2.5]
    p = [torch.exp(torch.tensor(-x)).item() for x in losses]
    model = unigram_gpt([torch.log(torch.tensor(q)).item() for q in p + [1 - sum(p)]])
    endings = [[2, 2, 2],  # sum 7.5, mean 2.5
               [1, 1, 1, 1],  # sum 6.0, mean 1.5: best by mean
               [2, 2],  # sum 5.0, mean 2.5: best by sum
               [1, 2, 2, 1]]  # sum 8.0, mean 2.0
    examples = [gpt2.HellaSwagExample([0, 1, 2], endings, label) for label in (0, 1, 2, 3, 2)]
    sums, counts = gpt2.score_endings(model, examples, "cpu")
    assert torch.allclose(sums[0], torch.tensor([7.5, 6.0, 5.0, 8.0]), atol=1e-5)
    assert counts[0].tolist() == [3, 4, 2, 4]
    result = gpt2.evaluate_hellaswag(model, examples, "cpu")
    assert result == {"n": 5, "acc": 2 / 5, "acc_norm": 1 / 5}


@pytest.fixture(scope="module")
def reference(examples):
    """A tiny GPT with GPT-2's padded vocabulary, and its losses scored the straightforward way."""
    model = tiny_gpt()
    with torch.no_grad():
        return model, reference_losses(model, examples)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_packed_scores_equal_separate_rows(reference, examples, batch_size):
    model, expected = reference
    sums, counts = gpt2.score_endings(model, examples, "cpu", batch_size=batch_size)
    assert torch.allclose(sums, torch.tensor([[e.sum().item() for e in ex] for ex in expected]), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [[len(e) for e in ex.endings] for ex in examples]


def test_examples_longer_than_block_size_are_cut(examples):
    model = tiny_gpt(block_size=24)
    assert max(len(ex.context) + max(map(len, ex.endings)) for ex in examples) > 24
    with torch.no_grad():
        expected = reference_losses(model, examples, block_size=24)
    sums, _ = gpt2.score_endings(model, examples, "cpu", batch_size=4)
    assert torch.allclose(sums, torch.tensor([[e.sum().item() for e in ex] for ex in expected]), rtol=1e-5, atol=1e-4)


def test_small_vocab_model_is_refused(examples):
    with pytest.raises(gpt2.UserError, match="vocab_size=128"):
        gpt2.evaluate_hellaswag(tiny_gpt(vocab_size=128), examples, "cpu")


def test_training_without_the_file_names_its_own_setting(shards, tmp_path, monkeypatch):
    """gpt2.py offline, and with a file that is not there: its errors name --hellaswag_file, not hellaswag.py's setting."""
    for name, value in offline_env(tmp_path / "empty_cache").items():
        monkeypatch.setenv(name, value)  # run_gpt2 passes os.environ on
    common = [*TINY, f"--data_dir={shards}", "--max_steps=1", "--val_every=0", "--hellaswag_every=1"]
    for args, expected in [([f"--log_dir={tmp_path / 'a'}"], "cannot download "),
                           ([f"--log_dir={tmp_path / 'b'}", f"--hellaswag_file={tmp_path / 'nope.jsonl'}"],
                            f"--hellaswag_file={tmp_path / 'nope.jsonl'} does not exist")]:
        proc = run_gpt2(*common, *args, check=False, in_process=True)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {expected}"), proc.stderr
        assert "--hellaswag_file" in proc.stderr and "--data_file" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "empty_cache" / "hellaswag_val.jsonl")


def test_error_during_training_is_one_line(shards, data_file, tmp_path):
    """A UserError raised by HellaSwag inside the training loop reaches gpt2.py's one-line handler: exit 1, no traceback."""
    proc = run_gpt2(*TINY, f"--data_dir={shards}", f"--log_dir={tmp_path / 'log'}", "--max_steps=2", "--val_every=0",
                    "--hellaswag_every=1", f"--hellaswag_file={data_file}", check=False,
                    in_process=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: HellaSwag needs GPT-2's tokenizer") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# --- command line ---


def test_hf_model_matches_transformers(tmp_path, data_file, examples):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257, initializer_range=0.5)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    # the expected numbers straight from transformers: per example, per ending, its own forward pass
    losses = []
    with torch.no_grad():
        for ex in examples:
            per_ending = []
            for ending in ex.endings:
                logits = hf(torch.tensor([ex.context + ending])).logits[0].double()  # (T, V)
                logp = F.log_softmax(logits[len(ex.context) - 1:-1], dim=-1)  # (len(ending), V)
                per_ending.append(-logp[torch.arange(len(ending)), torch.tensor(ending)])
            losses.append(per_ending)
    expected = expected_line(losses, [ex.label for ex in examples])
    assert run_hellaswag("-m", str(tmp_path / "hf"), f"--data_file={data_file}", "--device=cpu") == expected


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference, examples):
    """The reference model saved as gpt2.py saves it, and the line the CLI must print for it."""
    model, losses = reference
    path = str(tmp_path_factory.mktemp("ckpt") / "model_00002.pt")
    config = {k: getattr(model.config, k) for k in gpt2.MODEL_KEYS}
    gpt2.save_checkpoint(path, {"model": gpt2.clean_state_dict(model.state_dict()), "config": config, "step": 2})
    return path, expected_line(losses, [ex.label for ex in examples])


def test_checkpoint_matches_reference(checkpoint, data_file):
    path, expected = checkpoint
    assert run_hellaswag(f"--checkpoint={path}", f"--data_file={data_file}", "--batch_size=3") == expected


def test_two_ranks_give_the_counts_of_one(checkpoint, data_file, examples):
    path, expected = checkpoint
    assert len(examples) % 2 == 1  # the ranks get 4 and 3 examples
    got = run_hellaswag(f"--checkpoint={path}", f"--data_file={data_file}", "--device=cpu", torchrun_ranks=2)
    assert got == expected


def test_command_without_the_file_names_its_own_setting(checkpoint, tmp_path, capsys):
    """hellaswag.py offline (its --data_url at an unreachable address), and with a file that is not there: its errors
    name --data_file, not gpt2.py's and evaluate.py's --hellaswag_file."""
    path, _ = checkpoint
    common = [f"--checkpoint={path}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"]
    for args, expected in [([f"--data_url={UNREACHABLE}"], f"cannot download {UNREACHABLE}/hellaswag_val.jsonl"),
                           ([f"--data_file={tmp_path / 'nope.jsonl'}"], f"--data_file={tmp_path / 'nope.jsonl'} does not exist")]:
        with pytest.raises(SystemExit):
            hellaswag.run_cli(hellaswag.main, hellaswag.Config(), common + args)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
        assert "--data_file" in err and "--hellaswag_file" not in err, err
    assert not os.path.exists(tmp_path / "cache" / "hellaswag_val.jsonl")


def test_exactly_one_model_is_required(capsys):
    for argv in ([], ["-m", "gpt2", "--checkpoint=x.pt"]):
        with pytest.raises(SystemExit):
            hellaswag.run_cli(hellaswag.main, hellaswag.Config(), hellaswag.expand_aliases(argv))
        err = capsys.readouterr().err
        assert err.startswith("error: pass exactly one of") and err.count("\n") == 1
    assert cli.expand_aliases(["-m", "gpt2-xl", "--limit=5"]) == ["--model=gpt2-xl", "--limit=5"]
