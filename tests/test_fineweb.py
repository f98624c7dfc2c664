"""fineweb.py: shards that decode to the source, the val split, the manifest, resume after kill -9, errors.

Sources are small parquet / jsonl.gz files with FineWeb-Edu's columns, made in tmp_path; every check compares
with an independent computation (pyarrow reading the source, tiktoken's encode_ordinary/decode, hashlib).
"""

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
from gpt2 import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has had not but "
         "water energy cell theory history students learning river ancient model school data children plants "
         "café naïve Zürich 東京 🙂 — “quoted” 3.14159 2024 <|endoftext|> \t tabs\nnew lines\n\n").split(" ")


def make_docs(n, seed=0, mean_words=60):
    """Texts of varied length and content: unicode, digits, whitespace runs, and the literal '<|endoftext|>'
    (which must be encoded as ordinary text, never as the separator)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = max(1, int(rng.expovariate(1 / mean_words)))
        docs.append(" ".join(rng.choice(WORDS) for _ in range(k)) + rng.choice(["", ".", "\n", "  "]))
    return docs


def fineweb_table(texts):
    """A table with FineWeb-Edu's columns."""
    n = len(texts)
    return pa.table({
        "text": pa.array(texts, pa.string()),
        "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.97] * n,
        "token_count": [len(t or "") // 4 for t in texts],
        "score": [3.1] * n,
        "int_score": [3] * n,
    })


def write_parquet(path, texts, row_group_size=50):
    pq.write_table(fineweb_table(texts), path, row_group_size=row_group_size)
    return str(path)


def write_jsonl_gz(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in fineweb_table(texts).to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def config(data_files, out_dir, **kw):
    kw = {"shard_size": 2000, "val_tokens": 1500, "num_proc": 1, "batch_docs": 16, **kw}
    return fineweb.Config(data_files=data_files, out_dir=str(out_dir), **kw)


def shard_files(out_dir):
    """The shards in stream order: by the index in their names (sorted names are in order within each split)."""
    return sorted((n for n in os.listdir(out_dir) if n.endswith(".npy")), key=lambda n: int(n[-10:-4]))


def all_tokens(out_dir):
    return np.concatenate([np.load(os.path.join(out_dir, n)) for n in shard_files(out_dir)])


def expected_tokens(texts):
    """What the shards must hold: <|endoftext|> + encode_ordinary(text) per non-empty document, in order."""
    enc = tiktoken.get_encoding("gpt2")
    return [[EOT] + enc.encode_ordinary(t) for t in texts if t]


def manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def dir_bytes(out_dir):
    """Every file in out_dir and its content."""
    return {n: open(os.path.join(out_dir, n), "rb").read() for n in sorted(os.listdir(out_dir))}


@pytest.fixture(scope="module")
def texts():
    docs = make_docs(400, seed=1)
    docs[3] = docs[50] = docs[399] = ""  # empty documents are skipped (and counted), even the last one
    docs[7] = None
    docs[200] = "water " * 4500  # 4501 tokens: spans three shards of 2000
    return docs


# --- output ---


def test_decode_round_trip_with_worker_processes(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    fineweb.main(config(src, tmp_path / "out", num_proc=2))
    tokens = all_tokens(tmp_path / "out")
    source = pq.read_table(src).column("text").to_pylist()  # the source as pyarrow reads it
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [t for doc in expected_tokens(source) for t in doc]
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + t for t in source if t)
    # worker processes change nothing: the same bytes as one process
    fineweb.main(config(src, tmp_path / "one", num_proc=1))
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "one")


def test_shard_sizes_names_and_whole_document_val_split(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    shard_size, val_tokens = 1000, 2500  # val spans three shards
    fineweb.main(config(src, tmp_path / "out", shard_size=shard_size, val_tokens=val_tokens))
    names = shard_files(tmp_path / "out")
    assert all(re.fullmatch(r"edufineweb_(val|train)_\d{6}\.npy", n) for n in names)
    assert [int(n[-10:-4]) for n in names] == list(range(len(names)))
    for split in ("val", "train"):  # how gpt2.py lists a split: sorted names, which is stream order
        assert sorted(n for n in os.listdir(tmp_path / "out") if f"_{split}_" in n) == [n for n in names if split in n]
    splits = [n.split("_")[1] for n in names]
    assert splits == ["val"] * splits.count("val") + ["train"] * splits.count("train")
    lengths = {s: [len(np.load(tmp_path / "out" / n)) for n in names if f"_{s}_" in n] for s in ("val", "train")}
    for sizes in lengths.values():  # full shards, but the last of each split
        assert all(n == shard_size for n in sizes[:-1]) and 0 < sizes[-1] <= shard_size
    # val: the longest run of first documents whose tokens fit in val_tokens
    docs = expected_tokens(texts)
    k = 0
    while sum(map(len, docs[:k + 1])) <= val_tokens:
        k += 1
    assert sum(lengths["val"]) == sum(map(len, docs[:k])) <= val_tokens < sum(map(len, docs[:k + 1]))
    val = np.concatenate([np.load(tmp_path / "out" / n) for n in names if "_val_" in n])
    train = np.concatenate([np.load(tmp_path / "out" / n) for n in names if "_train_" in n])
    assert val.tolist() == [t for d in docs[:k] for t in d]
    assert train.tolist() == [t for d in docs[k:] for t in d]  # train starts with a whole document
    assert len(lengths["train"]) > 3


def test_val_split_does_not_depend_on_what_follows(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    fineweb.main(config(src, tmp_path / "all"))
    fineweb.main(config(src, tmp_path / "part", max_docs=120))
    val = {d: [n for n in shard_files(tmp_path / d) if "_val_" in n] for d in ("all", "part")}
    assert val["all"] and val["all"] == val["part"]
    assert all(dir_bytes(tmp_path / "all")[n] == dir_bytes(tmp_path / "part")[n] for n in val["all"])


def test_manifest_describes_the_shards(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    out = tmp_path / "out"
    fineweb.main(config(src, out))
    m = manifest(out)
    assert m["complete"] and m["source"]["files"] == [{"path": src, "bytes": os.path.getsize(src)}]
    assert m["source"]["text_column"] == "text" and m["tokenizer"]["eot_token"] == EOT
    assert m["settings"] == {"shard_size": 2000, "val_tokens": 1500, "max_docs": 0}
    assert [s["file"] for s in m["shards"]] == shard_files(out)
    for s in m["shards"]:
        data = (out / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        arr = np.load(out / s["file"])
        assert s["tokens"] == len(arr) and s["split"] in s["file"]
        assert s["documents"] == int((arr == EOT).sum())  # <|endoftext|> only ever starts a document
    non_empty = [t for t in texts if t]
    t = m["totals"]
    assert t["documents"] == len(non_empty) and t["empty_documents_skipped"] == len(texts) - len(non_empty)
    assert t["rows_read"] == len(texts) and t["tokens"] == sum(map(len, expected_tokens(texts)))
    assert t["val"]["tokens"] + t["train"]["tokens"] == t["tokens"]


def test_jsonl_gz_source_and_max_docs(tmp_path, texts):
    src = write_jsonl_gz(tmp_path / "docs.jsonl.gz", texts)
    fineweb.main(config(src, tmp_path / "out", max_docs=200))
    assert all_tokens(tmp_path / "out").tolist() == [t for d in expected_tokens(texts[:200]) for t in d]
    assert manifest(tmp_path / "out")["totals"]["rows_read"] == 200


def test_glob_of_parquet_files_in_sorted_order(tmp_path, texts):
    for i in range(3):
        write_parquet(tmp_path / f"part-{i}.parquet", texts[i * 100:(i + 1) * 100])
    fineweb.main(config(str(tmp_path / "part-*.parquet"), tmp_path / "out"))
    assert all_tokens(tmp_path / "out").tolist() == [t for d in expected_tokens(texts[:300]) for t in d]


def test_plain_text_one_document_per_line(tmp_path):
    lines = ["First line of a document.", "", "Second, with unicode: naïve café 東京."]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    fineweb.main(config(str(tmp_path / "a.txt"), tmp_path / "out", val_tokens=0))
    assert all_tokens(tmp_path / "out").tolist() == [t for d in expected_tokens(lines) for t in d]


def reference_shards(texts, shard_size, val_tokens, max_docs=0):
    """What fineweb.py wrote before units of work existed, computed here by a plain loop over the documents, one
    at a time: per shard (split, tokens, documents that start in it, the resume record), then the totals."""
    enc = tiktoken.get_encoding("gpt2")
    texts = texts[:max_docs] if max_docs else texts
    pos = {"rows_done": 0, "tokens_into_next_row": 0, "split": "val" if val_tokens > 0 else "train", "val_tokens": 0,
           "documents": 0, "empty_documents": 0}
    shards, buf, docs = [], [], 0

    def flush():
        nonlocal buf, docs
        if buf:
            shards.append((pos["split"], buf, docs, dict(pos)))
            buf, docs = [], 0

    for row, text in enumerate(texts):
        if not text:
            continue
        doc = [EOT] + enc.encode_ordinary(text)
        pos["empty_documents"] += row - pos["rows_done"]
        pos["rows_done"] = row
        if pos["split"] == "val" and pos["val_tokens"] + len(doc) > val_tokens:
            flush()
            pos["split"] = "train"
        if pos["split"] == "val":
            pos["val_tokens"] += len(doc)
        pos["documents"] += 1
        docs += 1
        for i, token in enumerate(doc):
            buf.append(token)
            pos["rows_done"], pos["tokens_into_next_row"] = (row + 1, 0) if i == len(doc) - 1 else (row, i + 1)
            if len(buf) == shard_size:
                flush()
    pos["empty_documents"] += len(texts) - pos["rows_done"]
    pos["rows_done"] = len(texts)
    flush()
    return shards


def check_against_reference(out_dir, texts, shard_size, val_tokens, max_docs=0):
    m = manifest(out_dir)
    ref = reference_shards(texts, shard_size, val_tokens, max_docs)
    assert m["complete"] and len(m["shards"]) == len(ref)
    for i, (entry, (split, tokens, docs, resume)) in enumerate(zip(m["shards"], ref, strict=True)):
        assert entry["file"] == f"edufineweb_{split}_{i:06d}.npy"
        assert np.load(os.path.join(out_dir, entry["file"])).tolist() == tokens
        assert (entry["split"], entry["tokens"], entry["documents"], entry["resume"]) == (split, len(tokens), docs, resume)
    assert m["totals"]["empty_documents_skipped"] == ref[-1][3]["empty_documents"]


def test_workers_and_unit_sizes_never_change_the_output(tmp_path):
    """Row groups of 1 to 60 rows in three files, units of one row group to whole files, 1 or 2 processes: every
    shard and its manifest entry (resume record included) is what the one-document-at-a-time loop above computes."""
    texts = make_docs(500, seed=11, mean_words=30)
    for i in range(0, 500, 37):
        texts[i] = "" if i % 2 else None
    texts[100] = "water " * 700  # spans shards
    for i, (a, b, rows) in enumerate([(0, 170, 1), (170, 171, 60), (171, 500, 7)]):
        write_parquet(tmp_path / f"part-{i}.parquet", texts[a:b], row_group_size=rows)
    src = str(tmp_path / "part-*.parquet")
    outs = []
    for num_proc, unit_bytes, max_docs in [(1, 1, 0), (2, 2000, 0), (2, 10**9, 0), (1, 500, 333), (2, 9000, 333)]:
        out = tmp_path / f"out-{num_proc}-{unit_bytes}-{max_docs}"
        fineweb.main(config(src, out, shard_size=333, val_tokens=2000, num_proc=num_proc, unit_bytes=unit_bytes,
                            max_docs=max_docs))
        check_against_reference(out, texts, 333, 2000, max_docs)
        outs.append(dir_bytes(out))
    assert outs[0] == outs[1] == outs[2] and outs[3] == outs[4]


# --- the Hub, through fsspec ---


def fake_hub(root, texts):
    """A dataset repository laid out as FineWeb-Edu's on the Hub: a dataset card whose YAML header maps configs to
    file patterns, and parquet files under them (hf://datasets/HuggingFaceFW/fineweb-edu/ has the same layout)."""
    repo = root / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nlicense: odc-by\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/*/*\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n"
        "---\n# FineWeb-Edu\n")
    parts = [texts[:90], texts[90:91], texts[91:250]]
    for i, part in enumerate(reversed(parts)):  # written out of order: the listing sorts them
        write_parquet(repo / "sample" / "10BT" / f"{2 - i:03d}_00000.parquet", part, row_group_size=20)
    write_parquet(repo / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", ["not in the sample"] * 5)


def test_hub_dataset_read_through_fsspec_like_hf_urls(tmp_path, texts):
    """--dataset/--name resolve to parquet files from the dataset card and fs.glob, as hf://datasets/... does;
    here the same code reads a local copy of that layout (file://), with worker processes opening the files."""
    fake_hub(tmp_path / "hub", texts)
    cfg = replace(config("", tmp_path / "out", num_proc=2), hub_root=f"file://{tmp_path / 'hub'}")
    fineweb.main(cfg)
    assert all_tokens(tmp_path / "out").tolist() == [t for d in expected_tokens(texts[:250]) for t in d]
    m = manifest(tmp_path / "out")
    assert m["source"] == {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train",
                           "text_column": "text", "hub_root": cfg.hub_root}
    # a resume skips whole row groups of the Hub's files, and ends with the same bytes
    before = dir_bytes(tmp_path / "out")
    os.remove(tmp_path / "out" / shard_files(tmp_path / "out")[4])
    fineweb.main(replace(cfg, unit_bytes=3000))
    assert dir_bytes(tmp_path / "out") == before
    with pytest.raises(UserError, match="no parquet files for config 'sample-1BT'.*README.md.*--name"):
        fineweb.main(replace(cfg, name="sample-1BT", out_dir=str(tmp_path / "other")))


def test_data_files_as_fsspec_urls(tmp_path, texts):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(2):
        with fs.open(f"/fineweb-test/part-{i}.parquet", "wb") as f:
            pq.write_table(fineweb_table(texts[i * 200:(i + 1) * 200]), f, row_group_size=30)
    try:  # the memory filesystem lives in this process: one process
        fineweb.main(config("memory://fineweb-test/*.parquet", tmp_path / "out"))
    finally:
        fs.rm("/fineweb-test", recursive=True)
    assert all_tokens(tmp_path / "out").tolist() == [t for d in expected_tokens(texts) for t in d]
    assert [f["path"] for f in manifest(tmp_path / "out")["source"]["files"]] == [
        "memory:///fineweb-test/part-0.parquet", "memory:///fineweb-test/part-1.parquet"]


# --- resume and rerun ---


def test_resume_after_sigint_and_sigkill_is_byte_identical(tmp_path, capsys):
    texts = make_docs(1500, seed=2, mean_words=40)
    src = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=100)
    args = [f"--data_files={src}", "--shard_size=500", "--val_tokens=3000", "--num_proc=2", "--batch_docs=8"]
    fineweb.main(config(src, tmp_path / "ref", shard_size=500, val_tokens=3000))  # uninterrupted, one process
    out = tmp_path / "out"

    def run_until(shards, sig):
        """Starts a run and sends `sig` once the manifest lists at least `shards` shards."""
        # SIGINT back to its default in the child: a suite started in the background (`pytest &`) ignores it
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "fineweb.py"), *args, f"--out_dir={out}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(manifest(out)["shards"]) >= shards:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        return proc.returncode, stderr

    rc, stderr = run_until(5, signal.SIGINT)
    assert rc == 130 and "run the same command again to continue" in stderr and "Traceback" not in stderr
    done = len(manifest(out)["shards"])
    rc, _ = run_until(done + 10, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    m = manifest(out)
    assert not m["complete"] and done + 10 <= len(m["shards"]) < len(manifest(tmp_path / "ref")["shards"])
    capsys.readouterr()
    fineweb.main(config(src, out, shard_size=500, val_tokens=3000, num_proc=2, batch_docs=8))
    assert f"resuming {out}/: {len(m['shards'])} shards done" in capsys.readouterr().out
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")  # shards and manifest; no temp file left behind


def test_complete_rerun_is_a_no_op(tmp_path, texts, capsys):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    out = tmp_path / "out"
    fineweb.main(config(src, out))
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    capsys.readouterr()
    fineweb.main(config(src, out))
    out_text = capsys.readouterr().out
    assert "is complete" in out_text and "nothing to do" in out_text and "wrote" not in out_text
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before


def test_missing_shard_is_written_again(tmp_path, texts):
    src = write_jsonl_gz(tmp_path / "docs.jsonl.gz", texts)  # resumes through datasets' skip
    out = tmp_path / "out"
    fineweb.main(config(src, out))
    before = dir_bytes(out)
    os.remove(out / shard_files(out)[5])
    fineweb.main(config(src, out))
    assert dir_bytes(out) == before


# --- errors ---


def one_line_error(proc, *needles):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    return last


def test_missing_source_is_one_line_and_nothing_is_lost(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    out = tmp_path / "out"
    fineweb.main(config(src, out))
    before = dir_bytes(out)
    proc = run_cli(f"--data_files={tmp_path / 'nope' / '*.parquet'}", f"--out_dir={out}", "--overwrite=1")
    one_line_error(proc, "nothing matches", "nope")
    assert dir_bytes(out) == before


def test_empty_sources(tmp_path):
    pq.write_table(fineweb_table([]), tmp_path / "empty.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("empty.parquet", "empty.jsonl"):
        with pytest.raises(UserError, match="no documents in"):
            fineweb.main(config(str(tmp_path / name), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    blank = write_parquet(tmp_path / "blank.parquet", ["", None, ""])
    with pytest.raises(UserError, match="no documents in .*all 3 rows have an empty 'text'"):
        fineweb.main(config(blank, tmp_path / "out"))
    assert shard_files(tmp_path / "out") == []


def test_unreadable_source(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file" * 10)
    with pytest.raises(UserError, match="cannot read .*bad.parquet"):
        fineweb.main(config(str(tmp_path / "bad.parquet"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_text_column_lists_the_columns(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    with pytest.raises(UserError, match="no column 'content'.*text, id, dump, url.*--text_column"):
        fineweb.main(config(src, tmp_path / "out", text_column="content"))
    jsrc = write_jsonl_gz(tmp_path / "docs.jsonl.gz", texts)
    with pytest.raises(UserError, match="no column 'content'.*text, id, dump, url"):
        fineweb.main(config(jsrc, tmp_path / "out", text_column="content"))


def test_a_text_column_that_holds_no_strings_names_its_type(tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": list(range(10))}), numbers)
    with pytest.raises(UserError, match=r"column 'text' in .*numbers.parquet holds int64, not text.*--text_column"):
        fineweb.main(config(str(numbers), tmp_path / "out"))
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"text": [["a", "b"]] * 10, "id": list(range(10))}), lists)
    with pytest.raises(UserError, match=r"column 'text' in .*lists.parquet holds list<.*string.*>, not text"):
        fineweb.main(config(str(lists), tmp_path / "out"))
    jsonl = tmp_path / "numbers.jsonl"
    jsonl.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(10)))
    with pytest.raises(UserError, match=r"column 'text' in .*numbers.jsonl.* holds int64, not text"):
        fineweb.main(config(str(jsonl), tmp_path / "out"))


def test_an_error_while_the_progress_bar_is_drawn_starts_its_own_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document number {i}" for i in range(4000)]}), src, row_group_size=1000,
                   compression="snappy")
    data = bytearray(src.read_bytes())
    last_group = pq.ParquetFile(src).metadata.row_group(3).column(0)
    start = last_group.data_page_offset + 64  # inside the last row group's compressed data; the footer stays readable
    data[start:start + 512] = b"\xab" * 512
    src.write_bytes(bytes(data))
    out = run_cli(f"--data_files={src}", f"--out_dir={tmp_path / 'out'}", "--num_proc=1", "--unit_bytes=1000",
                  "--val_tokens=100")
    assert out.returncode == 1
    assert "tokenizing:" in out.stderr  # the bar was drawn
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: cannot read")]
    assert len(errors) == 1 and "docs.parquet (row groups 3-3)" in errors[0], out.stderr


def test_a_log_file_gets_progress_lines_with_count_and_eta(tmp_path, texts):
    """stderr not a terminal (a pipe here, a log file in a batch job): whole lines with the documents done of the
    source's 400, elapsed time and ETA, at the start and at the end, never a bar's carriage-return redraws."""
    src = write_parquet(tmp_path / "docs.parquet", texts)
    out = run_cli(f"--data_files={src}", f"--out_dir={tmp_path / 'out'}", "--num_proc=1", "--shard_size=2000",
                  "--val_tokens=1500")
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("tokenizing:")]
    assert lines[0] == "tokenizing: docs   0/400 (0.0%) | 0.0M tokens | elapsed 0:00:00 | eta ?"
    assert re.fullmatch(r"tokenizing: docs 400/400 \(100\.0%\) \| 0\.0M tokens, \d+\.\d\dM tokens/s \| "
                        r"elapsed 0:00:\d\d \| eta 0:00:00", lines[-1]), lines[-1]


def test_foreign_out_dir_is_refused_and_unchanged(tmp_path, texts):
    src = write_parquet(tmp_path / "docs.parquet", texts)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{other}/ holds files but no manifest.json.*--overwrite=1.*--out_dir"):
        fineweb.main(config(src, other))
    assert dir_bytes(other) == {"notes.txt": b"mine"}
    # shards written with other settings: refused too; --overwrite=1 replaces them
    out = tmp_path / "out"
    fineweb.main(config(src, out))
    before = dir_bytes(out)
    with pytest.raises(UserError, match=f"{out}/ holds shards of another source or settings.*shard_size.*--overwrite=1"):
        fineweb.main(config(src, out, shard_size=3000))
    assert dir_bytes(out) == before
    cfg = config(src, out, shard_size=3000, overwrite=True)
    fineweb.main(cfg)
    assert manifest(out)["settings"]["shard_size"] == 3000
    fineweb.main(replace(cfg, out_dir=str(tmp_path / "fresh"), overwrite=False))
    assert dir_bytes(out) == dir_bytes(tmp_path / "fresh")


# --- gpt2.py reads the output ---


@pytest.fixture(scope="module")
def shards_for_gpt2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2")
    src = write_parquet(tmp / "docs.parquet", make_docs(600, seed=3))
    fineweb.main(config(src, tmp / "out", shard_size=4000, val_tokens=2000))
    return tmp / "out"


def test_gpt2_loader_reads_the_shards(shards_for_gpt2):
    import torch

    from gpt2 import DataLoaderLite

    B, T = 4, 32
    loader = DataLoaderLite(str(shards_for_gpt2), "train", B, T, rank=0, world_size=1, vocab_size=50304)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    first = np.load(shards_for_gpt2 / [n for n in shard_files(shards_for_gpt2) if "_train_" in n][0])
    assert x.flatten().tolist() == first[:B * T].tolist()
    assert y.flatten().tolist() == first[1:B * T + 1].tolist()


def test_gpt2_trains_on_the_shards(shards_for_gpt2, tmp_path):
    log = tmp_path / "log"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), f"--data_dir={shards_for_gpt2}",
                           f"--log_dir={log}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                           "--micro_batch_size=4", "--total_batch_size=128", "--max_steps=3", "--compile=0",
                           "--val_every=0", "--hellaswag_every=0", "--sample_every=0", "--checkpoint_every=0",
                           "--device=cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (log / "log.txt").read_text().splitlines()
    assert any(line.startswith("0 train") for line in lines)


def test_sigkill_during_shard_writes_resumes_byte_identical(tmp_path):
    texts = make_docs(6000, seed=5, mean_words=60)
    src = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=200)
    settings = {"shard_size": 40_000, "val_tokens": 20_000, "num_proc": 1, "batch_docs": 64}
    fineweb.main(config(src, tmp_path / "ref", **settings))
    out = tmp_path / "out"
    args = [f"--data_files={src}", f"--out_dir={out}", *(f"--{k}={v}" for k, v in settings.items())]
    writing = lambda: out.exists() and any(n.endswith(".tmp") for n in os.listdir(out))
    mid_write = 0
    for _ in range(30):  # each run is killed the moment a shard's (or the manifest's) temporary file appears
        if mid_write >= 2 or os.path.exists(out / "manifest.json") and manifest(out).get("complete"):
            break
        if out.exists():  # a temporary file left by the last kill is not this run's write
            for name in os.listdir(out):
                if name.endswith(".tmp"):
                    os.remove(out / name)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "fineweb.py"), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300  # a guard against a hang only: the kill waits for the write, not the clock
        while proc.poll() is None and time.time() < deadline and not writing():
            time.sleep(0.0005)
        proc.send_signal(signal.SIGSTOP)  # frozen: whether it is still mid-write cannot change before the kill
        mid_write += writing()
        proc.kill()
        proc.wait()
    assert mid_write >= 1
    fineweb.main(config(src, out, **settings))
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")
