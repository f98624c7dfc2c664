"""demo.py: its corpus is Python's own documentation, and a shortened run goes from text to samples."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import demo
import offline


def test_corpus_is_pythons_documentation(tmp_path):
    path = tmp_path / "corpus.jsonl"
    n_docs, n_chars = demo.build_corpus(str(path), max_chars=600_000)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n_docs and all(set(r) == {"text"} for r in rows)
    assert sum(len(r["text"]) for r in rows) == n_chars >= 600_000
    # the language reference is all there (it comes first), and module docstrings follow it
    from pydoc_data.topics import topics

    texts = {r["text"] for r in rows}
    assert set(topics.values()) <= texts
    assert len(texts) > len(topics)
    # shuffled, the same way every time
    demo.build_corpus(str(tmp_path / "again.jsonl"), max_chars=600_000)
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    assert [r["text"] for r in rows[:len(topics)]] != [topics[k] for k in sorted(topics)]


def test_docstrings_are_read_without_importing():
    before = set(sys.modules)
    first = next(offline.docstring_docs())
    assert len(first) > 40
    assert "antigravity" not in set(sys.modules) - before  # ast reads the files; importing some would open a browser


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("datasets")
    demo_dir = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--quick=1", f"--demo_dir={demo_dir}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo done" in proc.stdout
    _, series = demo.summarize(str(demo_dir / "log" / "log.txt"))
    assert series["val"][-1] < series["val"][0] - 1.0  # it learned something in 20 steps
    with open(demo_dir / "log" / "log.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (demo_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["tokens"]) == 48 for s in samples)
    assert proc.stdout.count("\nsample ") == 3


def test_tokenizer_file_from_pypi_serves_tiktoken(tmp_path):
    # the bytes demo.py takes from openai-whisper's sdist (offline.py) are r50k_base.tiktoken; here they come from
    # tiktoken's cache, and a fresh process must load GPT-2's tokenizer from the folder demo.py writes, and only from there
    import tiktoken
    from tiktoken.load import read_file_cached

    import fineweb
    import gpt2

    assert fineweb.TOKENIZER == gpt2.TOKENIZER == "r50k_base"
    offline.install_tokenizer_file(read_file_cached(offline.R50K_URL, offline.R50K_SHA256), str(tmp_path / "cache"))
    text = "GPT-2's tokenizer: <|endoftext|> is ordinary text here, 12345 tokens."
    code = f"import tiktoken; print(tiktoken.get_encoding('r50k_base').encode_ordinary({text!r}))"
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tiktoken.get_encoding("gpt2").encode_ordinary(text))
