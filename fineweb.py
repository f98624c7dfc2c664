"""
FineWeb-Edu (or your own text files) to the uint16 token shards that gpt2.py trains on.

    python fineweb.py                                    # sample-10BT, streamed -> edu_fineweb10B/ (~10B tokens, ~20 GB)
    python fineweb.py --name=sample-100BT --out_dir=edu_fineweb100B
    python fineweb.py --data_files='corpus/*.parquet' --out_dir=my_shards   # local parquet / jsonl(.gz) / txt
Every setting in `Config` below can be overridden as --name=value. Interrupted (Ctrl-C, kill, a crash)?
Run the same command again: it continues where it stopped and ends with the same bytes as an uninterrupted run.

Output, in out_dir: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ... (np.save of a 1-D uint16 array;
every document is <|endoftext|> followed by its GPT-2 tokens, documents in source order, a document may continue
into the next shard of its split) and manifest.json (source, settings, and per shard its split, tokens,
documents and sha256).
"""

import glob
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken

from cli import ANY, NOT_EMPTY, UserError, at_least, check_settings, one_of, run_cli

# --- config ---


@dataclass
class Config:
    # source: a Hugging Face Hub dataset, streamed (never stored whole on disk), or local files
    dataset: str = "HuggingFaceFW/fineweb-edu"  # Hub dataset id, e.g. HuggingFaceFW/fineweb
    name: str = "sample-10BT"  # its config: sample-10BT | sample-100BT | sample-350BT | default (everything)
    split: str = "train"  # the Hub dataset's split
    data_files: str = ""  # instead of the Hub: local paths/globs/folders, comma-separated; .parquet .jsonl .json .txt (.gz)
    text_column: str = "text"  # the column with each document's text
    text_sample_by: str = "line"  # .txt files only: line | paragraph | document (one document per file)
    max_docs: int = 0  # read only the first N rows of the source (empty ones included); 0 = all
    # output
    out_dir: str = "edu_fineweb10B"  # shards and manifest.json; gpt2.py's --data_dir
    shard_size: int = 100_000_000  # tokens per shard (200 MB); the last shard of each split may be shorter
    val_tokens: int = 100_000_000  # val = the first documents of the source, whole, as long as they fit in this many tokens
    overwrite: bool = False  # replace the shards in out_dir written from another source or with other settings
    # speed: these never change the output
    num_proc: int = 0  # tokenizer processes; 0 = one per CPU core this process may use (os.sched_getaffinity)
    batch_docs: int = 256  # documents per task sent to a tokenizer process
    debug: bool = False  # show tracebacks instead of one-line errors


RULES = {  # what each setting accepts, checked before any work (see cli.check_settings)
    "dataset": NOT_EMPTY,
    "name": ANY,
    "split": NOT_EMPTY,
    "data_files": ANY,  # each path is checked when it is read
    "text_column": NOT_EMPTY,
    "text_sample_by": one_of("line", "paragraph", "document"),
    "max_docs": at_least(0),
    "out_dir": NOT_EMPTY,
    "shard_size": at_least(1),
    "val_tokens": at_least(0),
    "overwrite": ANY,
    "num_proc": at_least(0),
    "batch_docs": at_least(1),
    "debug": ANY,
}


TOKENIZER = "r50k_base"  # gpt2.TOKENIZER: GPT-2's BPE; its <|endoftext|> (50256) starts every document
SHARD_PREFIX = "edufineweb"  # shard names: {SHARD_PREFIX}_{val|train}_{index:06d}.npy, index counting over both splits
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^\w+_(val|train)_\d{6}\.npy$")  # what --overwrite=1 deletes, with the manifest and our temp files
TEMP_RE = re.compile(r"^\.(\d{6}|manifest)\.tmp$")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".text": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


# --- source ---


def file_format(path):
    """'parquet' | 'json' | 'text' from the file name, or None."""
    name = path.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return FORMATS.get(os.path.splitext(name)[1])


def resolve_files(data_files):
    """The files named by a comma-separated list of paths, globs and folders, in sorted order within each item."""
    files = []
    for item in [s.strip() for s in data_files.split(",") if s.strip()]:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if os.path.isfile(p) and file_format(p))
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise UserError(f"data_files: nothing matches {item!r}: check the path (globs need quotes in the shell)")
        files += [p for p in found if p not in files]
    formats = {p: file_format(p) for p in files}
    unknown = [p for p, f in formats.items() if f is None]
    if unknown:
        raise UserError(f"data_files: unknown file type {unknown[0]!r}: use {', '.join(FORMATS)} (optionally .gz)")
    if len(set(formats.values())) > 1:
        raise UserError(f"data_files: mixes {' and '.join(sorted(set(formats.values())))} files: convert them to one format")
    return files, formats[files[0]]


def describe_source(cfg):
    """What is read, as plain data: stored in the manifest, and compared to decide whether out_dir can be resumed."""
    if not cfg.data_files:
        return {"dataset": cfg.dataset, "name": cfg.name, "split": cfg.split, "text_column": cfg.text_column}
    files, fmt = resolve_files(cfg.data_files)
    source = {"format": fmt, "files": [{"path": p, "bytes": os.path.getsize(p)} for p in files],
              "text_column": cfg.text_column}
    if fmt == "text":
        source["text_sample_by"] = cfg.text_sample_by
    return source


def source_label(source):
    if "dataset" in source:
        return f"{source['dataset']} ({source['name']}, {source['split']})"
    paths = [f["path"] for f in source["files"]]
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more files"


def open_source(source, debug):
    """The source as a streaming datasets.IterableDataset (or ParquetFiles for local parquet files), and its
    number of rows when that is known cheaply."""
    import datasets

    if not debug:
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line
        datasets.disable_progress_bars()
    label = source_label(source)
    # parquet: read a row group when it is needed; arrow's default pre-buffers a whole file (FineWeb's are ~2 GB)
    import pyarrow.dataset

    lazy = {"fragment_scan_options": pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)}  # Hub only
    try:
        if "dataset" in source:
            hub = {"name": source["name"] or None, "split": source["split"], "streaming": True}
            try:
                ds = datasets.load_dataset(source["dataset"], **hub, **lazy)
            except (TypeError, ValueError) as e:  # not a parquet dataset: no such option
                if "fragment_scan_options" not in str(e):
                    raise
                ds = datasets.load_dataset(source["dataset"], **hub)
            try:
                num_rows = ds.info.splits[source["split"]].num_examples or None
            except (AttributeError, KeyError, TypeError):
                num_rows = None
            return ds, num_rows
        paths, num_rows = [f["path"] for f in source["files"]], None
        kwargs = {}
        if source["format"] == "parquet":
            import pyarrow.parquet as pq

            rows = {}
            for p in paths:  # footers only: the row counts (progress bar) and the columns, before anything is read
                try:
                    meta = pq.ParquetFile(p).metadata
                except Exception as e:
                    raise UserError(f"cannot read {p}: {one_line(e)}: is it a parquet file?") from e
                if source["text_column"] not in meta.schema.names:
                    raise UserError(missing_column(source["text_column"], meta.schema.names, p))
                rows[p] = meta.num_rows
            num_rows = sum(rows.values())
            if not num_rows:
                raise UserError(f"no documents in {label}: every file has 0 rows")
            return ParquetFiles(paths, source["text_column"]), num_rows
        elif source["format"] == "text":
            kwargs["sample_by"] = source["text_sample_by"]
        ds = datasets.load_dataset(source["format"], data_files=paths, split="train", streaming=True, **kwargs)
        return ds, num_rows
    except StopIteration:  # datasets' json builder, on files with no rows
        raise UserError(f"no documents in {label}: the source is empty") from None
    except Exception as e:
        if debug or type(e).__name__ == "UserError":
            raise
        raise UserError(f"cannot open {label}: {one_line(e)}") from e


class ParquetFiles:
    """Local parquet files read with pyarrow, one row group at a time: memory stays flat whatever the file size
    (datasets' streaming parquet reader holds on to what it has read), and a resume skips whole row groups."""

    def __init__(self, paths, column):
        self.paths, self.column = paths, column

    def tables(self, start_row, batch_rows):
        """pyarrow tables of at most batch_rows rows of the text column, from source row start_row on."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        skip = start_row
        for path in self.paths:
            f = pq.ParquetFile(path, pre_buffer=False)
            groups = []
            for g in range(f.num_row_groups):
                n = f.metadata.row_group(g).num_rows
                if skip >= n and not groups:
                    skip -= n
                else:
                    groups.append(g)
            if not groups:
                continue
            for batch in f.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[self.column]):
                if skip >= len(batch):
                    skip -= len(batch)
                    continue
                yield pa.Table.from_batches([batch.slice(skip)])
                skip = 0


def read_batches(ds, source, batch_docs, start_row, max_rows, debug):
    """Yields (rows, texts, row_end) per batch of the source: the row numbers of its non-empty documents, their
    texts as one pyarrow string array (cheap to send to a worker), and the number of source rows read so far."""
    import pyarrow.compute as pc

    column, label = source["text_column"], source_label(source)
    if isinstance(ds, ParquetFiles):
        it = ds.tables(start_row, batch_docs)
    else:  # a resume reads (without tokenizing) the rows already done
        it = iter((ds.skip(start_row) if start_row else ds).with_format("arrow").iter(batch_size=batch_docs))
    row = start_row
    while not max_rows or row < max_rows:
        try:
            table = next(it)
        except StopIteration:
            return
        except Exception as e:
            if debug:
                raise
            raise UserError(f"cannot read {label} after row {row}: {one_line(e)} (--debug=1 shows the traceback)") from e
        if max_rows and row + len(table) > max_rows:
            table = table.slice(0, max_rows - row)
        if column not in table.column_names:
            raise UserError(missing_column(column, table.column_names, label))
        texts = table.column(column).combine_chunks()
        keep = pc.fill_null(pc.greater(pc.binary_length(texts), 0), False)  # empty and null texts are skipped
        rows = row + np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        yield rows, texts.filter(keep), row + len(table)
        row += len(table)


def missing_column(column, columns, where):
    return f"no column {column!r} in {where}: its columns are {', '.join(columns)}; pick one with --text_column=NAME"


def one_line(e):
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# --- tokenize (in worker processes) ---


def tokenize_batch(texts):
    """Worker: texts -> (tokens, lengths). tokens is one uint16 array holding, per document, <|endoftext|> then its
    tokens (as enc.encode_ordinary); lengths is each document's token count, <|endoftext|> included."""
    enc = tiktoken.get_encoding(TOKENIZER)  # tiktoken caches it: the first call per process loads it
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = []
    for text in texts.to_pylist() if hasattr(texts, "to_pylist") else texts:
        parts.append(eot)
        parts.append(enc.encode_to_numpy(text, disallowed_special=()))  # encode_ordinary, without a Python list
    if not parts:
        return np.empty(0, np.uint16), np.empty(0, np.int64)
    tokens = np.concatenate(parts)
    if tokens.max() >= 2**16:  # cannot happen with GPT-2's 50257 tokens; it would with a bigger vocabulary
        raise ValueError(f"token id {tokens.max()} does not fit in uint16")
    lengths = np.array([len(p) for p in parts[1::2]], dtype=np.int64) + 1
    return tokens.astype(np.uint16), lengths


def worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool


def tokenize_stream(batches, num_proc):
    """Yields (rows, tokens, lengths, row_end) per batch, in order. At most 2 * num_proc + 2 batches are in flight,
    so memory stays bounded however fast the source is read."""
    if num_proc == 1:
        for rows, texts, row_end in batches:
            yield rows, *tokenize_batch(texts), row_end
        return
    import multiprocessing

    # spawn: the same on Linux, macOS and Windows, and no fork of a process holding the source's threads
    with multiprocessing.get_context("spawn").Pool(num_proc, initializer=worker_init) as pool:
        pending = deque()
        for rows, texts, row_end in batches:
            pending.append((rows, pool.apply_async(tokenize_batch, (texts,)), row_end))
            if len(pending) >= 2 * num_proc + 2:
                rows, result, row_end = pending.popleft()
                yield rows, *result.get(), row_end
        while pending:
            rows, result, row_end = pending.popleft()
            yield rows, *result.get(), row_end


# --- shards and manifest ---


def write_atomic(path, write, tmp_name):
    """Writes a file through write(f) to a temporary file, then renames it into place: never half-written."""
    tmp = os.path.join(os.path.dirname(path), tmp_name)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_manifest(out_dir, manifest):
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomic(os.path.join(out_dir, MANIFEST), lambda f: f.write(text.encode()), ".manifest.tmp")


def start_position(val_tokens):
    """Where a fresh run starts. After each shard the manifest stores this record as it is after that shard."""
    return {"rows_done": 0,  # source rows whose tokens are all in the shards so far
            "tokens_into_next_row": 0,  # tokens of row rows_done already written (it continues in the next shard)
            "split": "val" if val_tokens > 0 else "train",  # the split of the next document
            "val_tokens": 0,  # tokens of the documents given to val so far
            "documents": 0,  # non-empty documents started so far
            "empty_documents": 0}  # empty rows skipped so far


class ShardWriter:
    """Cuts the stream of documents into shards of shard_size tokens, gives the first documents to val, and writes
    each shard and then the manifest atomically. Its state after each shard is in the manifest, to resume from."""

    def __init__(self, out_dir, manifest, shard_size, val_tokens):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size, self.val_tokens = shard_size, val_tokens
        shards = manifest["shards"]
        self.pos = dict(shards[-1]["resume"]) if shards else start_position(val_tokens)
        self.index = len(shards)  # of the next shard
        self.buf = np.empty(shard_size, dtype=np.uint16)  # pages are only touched as they fill
        self.spare = None  # a second buffer, filled while a thread writes the first (2 x shard_size x 2 bytes)
        self.fill = 0  # tokens in buf
        self.docs = 0  # documents that start in buf
        # one thread writes the shards and the manifest, in order: the disk and sha256 do not stall the tokenizers
        from concurrent.futures import ThreadPoolExecutor

        self.thread, self.writing = ThreadPoolExecutor(1, thread_name_prefix="shard-writer"), None

    def add(self, row, doc):
        """Appends one document (<|endoftext|> and its tokens) read from source row `row`."""
        pos = self.pos
        if pos["tokens_into_next_row"]:  # the document the last shard ended in: skip what is written already
            assert row == pos["rows_done"], f"resumed at row {row}, expected {pos['rows_done']}"
            done = pos["tokens_into_next_row"]
        else:
            pos["empty_documents"] += row - pos["rows_done"]  # the rows in between were empty
            pos["rows_done"], done = row, 0
            # val: whole documents from the start, while they fit; the first that does not fit ends it for good
            if pos["split"] == "val" and pos["val_tokens"] + len(doc) > self.val_tokens:
                if pos["val_tokens"] == 0:
                    raise UserError(f"the first document has {len(doc)} tokens, more than --val_tokens="
                                     f"{self.val_tokens}: raise it, or --val_tokens=0 for no val split")
                self.flush()  # the last val shard
                pos["split"] = "train"
            if pos["split"] == "val":
                pos["val_tokens"] += len(doc)
            pos["documents"] += 1
            self.docs += 1
        while done < len(doc):
            n = min(len(doc) - done, self.shard_size - self.fill)
            self.buf[self.fill:self.fill + n] = doc[done:done + n]
            self.fill += n
            done += n
            if done == len(doc):
                pos["rows_done"], pos["tokens_into_next_row"] = row + 1, 0
            else:
                pos["tokens_into_next_row"] = done
            if self.fill == self.shard_size:
                self.flush()

    def flush(self):
        """Hands the tokens in buf to the writer thread as the next shard (if any), and carries on in the other
        buffer. The manifest that lists the shard is written after it."""
        if self.fill == 0:
            return
        self.wait()  # for the previous shard: its buffer becomes the spare
        entry = {"file": f"{SHARD_PREFIX}_{self.pos['split']}_{self.index:06d}.npy", "split": self.pos["split"],
                 "tokens": self.fill, "documents": self.docs, "sha256": None, "resume": dict(self.pos)}
        self.writing = self.thread.submit(self.write_shard, self.buf[:self.fill], entry, f".{self.index:06d}.tmp")
        self.buf, self.spare = self.spare if self.spare is not None else np.empty_like(self.buf), self.buf
        self.index += 1
        self.fill = self.docs = 0

    def write_shard(self, tokens, entry, tmp_name):  # in the writer thread
        path = os.path.join(self.out_dir, entry["file"])
        write_atomic(path, lambda f: np.save(f, tokens), tmp_name)
        entry["sha256"] = sha256_file(path)
        self.manifest["shards"].append(entry)
        save_manifest(self.out_dir, self.manifest)

    def wait(self):
        """Until the shard being written is on disk, with its manifest; raises what went wrong there."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            try:
                writing.result()
            except OSError as e:
                raise UserError(f"cannot write to {self.out_dir}/: {one_line(e)}: free some space, or choose "
                                 f"another --out_dir; then run the same command again") from e

    def close(self):
        self.thread.shutdown(wait=True)  # on Ctrl-C too: the shard being written is finished, not abandoned

    def finish(self, rows_read):
        """After the last document: writes the last shard and marks the manifest complete, with totals."""
        pos = self.pos
        pos["empty_documents"] += rows_read - pos["rows_done"]
        pos["rows_done"] = rows_read
        self.flush()
        self.wait()
        shards = self.manifest["shards"]
        totals = {"rows_read": rows_read, "empty_documents_skipped": pos["empty_documents"], "shards": len(shards),
                  "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards)}
        for split in ("val", "train"):
            mine = [s for s in shards if s["split"] == split]
            totals[split] = {"shards": len(mine), "tokens": sum(s["tokens"] for s in mine),
                             "documents": sum(s["documents"] for s in mine)}
        self.manifest.update(complete=True, totals=totals)
        save_manifest(self.out_dir, self.manifest)
        return totals


def new_manifest(source, cfg):
    enc = tiktoken.get_encoding(TOKENIZER)
    return {
        "format": "each shard is a 1-D uint16 numpy array (np.save; read with np.load). Shards in index order hold "
                  "the documents in source order, each as <|endoftext|> followed by its tokens. A document may "
                  "continue into the next shard of its split, never into the other split. 'documents' counts the "
                  "documents that start in a shard. val is the first documents of the source, whole, as long as "
                  "their tokens fit in val_tokens; train is the rest.",
        "source": source,
        "tokenizer": {"name": f"tiktoken {TOKENIZER}", "eot_token": enc.eot_token, "vocab_size": enc.n_vocab},
        "settings": {"shard_size": cfg.shard_size, "val_tokens": cfg.val_tokens, "max_docs": cfg.max_docs},
        "complete": False,
        "shards": [],
    }


def check_out_dir(out_dir, expected, overwrite):
    """Reads out_dir: 'fresh', or ('resume' | 'complete', manifest). Refuses a directory holding anything else
    unless overwrite."""
    if not os.path.isdir(out_dir):
        return "fresh", None
    names = [n for n in os.listdir(out_dir) if not TEMP_RE.match(n)]
    if not names:
        return "fresh", None
    how = "pass --overwrite=1 to replace them, or choose another --out_dir"
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        if overwrite:
            return "fresh", None
        what = "an unreadable manifest.json" if os.path.exists(path) else "files but no manifest.json"
        raise UserError(f"{out_dir}/ holds {what} (not output of this fineweb.py): {how}") from None
    differ = [k for k in ("source", "tokenizer", "settings") if manifest.get(k) != expected[k]]
    if differ:
        if overwrite:
            return "fresh", None
        detail = "; ".join(f"{k} was {json.dumps(manifest.get(k))}" for k in differ)
        raise UserError(f"{out_dir}/ holds shards of another source or settings ({detail[:300]}): {how}")
    if overwrite:
        return "fresh", None
    # keep the shards that are on disk whole; a later shard that is missing or damaged is written again
    for i, shard in enumerate(manifest["shards"]):
        try:
            arr = np.load(os.path.join(out_dir, shard["file"]), mmap_mode="r")
            ok = arr.dtype == np.uint16 and arr.shape == (shard["tokens"],)
        except (OSError, ValueError):
            ok = False
        if not ok:
            manifest["shards"], manifest["complete"] = manifest["shards"][:i], False
            manifest.pop("totals", None)
            break
    return ("complete" if manifest["complete"] else "resume"), manifest


def clear_out_dir(out_dir):
    """--overwrite=1: deletes what this script writes (shards, manifest, temp files), nothing else."""
    for n in os.listdir(out_dir):
        if SHARD_RE.match(n) or TEMP_RE.match(n) or n == MANIFEST:
            os.remove(os.path.join(out_dir, n))


# --- main ---


def main(cfg, overridden=()):
    check_settings(cfg, RULES)
    enc = tiktoken.get_encoding(TOKENIZER)
    if enc.max_token_value >= 2**16:
        raise UserError(f"tokenizer {TOKENIZER} has ids up to {enc.max_token_value}: they do not fit in uint16 shards")
    num_proc = cfg.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print("fineweb.py config:", " ".join(f"--{k}={v}" for k, v in asdict(cfg).items()), flush=True)

    # 1. what would be written, and what out_dir holds already: nothing is read or changed yet
    source = describe_source(cfg)
    manifest = new_manifest(source, cfg)
    state, existing = check_out_dir(cfg.out_dir, manifest, cfg.overwrite)
    if state == "complete":
        t = existing["totals"]
        print(f"{cfg.out_dir}/ is complete: {t['shards']} shards, {t['tokens']:,} tokens "
              f"({t['val']['tokens']:,} val, {t['train']['tokens']:,} train); nothing to do "
              f"(--overwrite=1 rebuilds it)", flush=True)
        return t
    manifest = existing if state == "resume" else manifest
    start_row = manifest["shards"][-1]["resume"]["rows_done"] if manifest["shards"] else 0

    # 2. open the source and read its first batch before touching out_dir: a bad source changes nothing on disk
    ds, num_rows = open_source(source, cfg.debug)
    batches = read_batches(ds, source, cfg.batch_docs, start_row, cfg.max_docs, cfg.debug)
    first = next(batches, None)
    if first is None and start_row == 0:
        raise UserError(f"no documents in {source_label(source)}: the source is empty")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if state == "fresh":
        clear_out_dir(cfg.out_dir)  # what --overwrite=1 replaces, or temp files left by a run killed at its start
    save_manifest(cfg.out_dir, manifest)
    if state == "resume":
        print(f"resuming {cfg.out_dir}/: {len(manifest['shards'])} shards done, skipping {start_row:,} source rows",
              flush=True)

    # 3. tokenize in worker processes, in order, and write the shards
    from tqdm import tqdm

    writer = ShardWriter(cfg.out_dir, manifest, cfg.shard_size, cfg.val_tokens)
    total = min(num_rows, cfg.max_docs) if num_rows and cfg.max_docs else (num_rows or cfg.max_docs or None)
    bar = tqdm(total=total, initial=start_row, unit="doc", unit_scale=True, desc="tokenizing", dynamic_ncols=True)
    t0, tokens, rows_read = time.time(), 0, start_row
    stream = tokenize_stream(batches if first is None else _chain(first, batches), num_proc)
    try:
        for rows, toks, lengths, row_end in stream:
            ends = np.cumsum(lengths)
            for row, start, end in zip(rows.tolist(), (ends - lengths).tolist(), ends.tolist(), strict=True):
                writer.add(row, toks[start:end])
            tokens += len(toks)
            bar.update(row_end - rows_read)
            rows_read = row_end
            bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens, {tokens / (time.time() - t0) / 1e6:.2f}M tokens/s",
                                refresh=False)
        if writer.pos["documents"] == 0:
            raise UserError(f"no documents in {source_label(source)}: all {rows_read:,} rows have an empty "
                             f"{source['text_column']!r}; is --text_column right?")
        totals = writer.finish(rows_read)
    except KeyboardInterrupt:
        bar.close()
        stream.close()
        writer.close()
        print(f"\ninterrupted: the {len(manifest['shards'])} shards in {cfg.out_dir}/ are safe; "
              f"run the same command again to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        stream.close()  # stops the worker processes, whatever happened
        writer.close()
    bar.close()
    dt = time.time() - t0
    print(f"wrote {cfg.out_dir}/: {totals['shards']} shards, {totals['tokens']:,} tokens ({totals['val']['tokens']:,} "
          f"val, {totals['train']['tokens']:,} train), {totals['documents']:,} documents, "
          f"{totals['empty_documents_skipped']:,} empty skipped; this run {tokens:,} tokens in {dt:.1f} s "
          f"({tokens / dt / 1e6:.2f}M tokens/s, {num_proc} processes)", flush=True)
    if totals["train"]["shards"] == 0:
        print(f"note: no train shards: all {totals['documents']:,} documents fit in --val_tokens={cfg.val_tokens}; "
              f"lower it for a train split", flush=True)
    return totals


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    try:
        run_cli(main, Config(), sys.argv[1:])
    except KeyboardInterrupt:  # before the shards were started (later, main says more)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
