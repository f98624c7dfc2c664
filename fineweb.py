"""
FineWeb-Edu (or your own text files) to the uint16 token shards that gpt2.py trains on.

    python fineweb.py                                    # sample-10BT, read from the Hub -> edu_fineweb10B/ (~10B tokens, ~20 GB)
    python fineweb.py --name=sample-100BT --out_dir=edu_fineweb100B
    python fineweb.py --data_files='corpus/*.parquet' --out_dir=my_shards   # local parquet / jsonl(.gz) / txt
Every setting in `Config` below can be overridden as --name=value. Interrupted (Ctrl-C, kill, a crash)?
Run the same command again: it continues where it stopped and ends with the same bytes as an uninterrupted run.

Output, in out_dir: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ... (np.save of a 1-D uint16 array;
every document is <|endoftext|> followed by its GPT-2 tokens, documents in source order, a document may continue
into the next shard of its split) and manifest.json (source, settings, and per shard its split, tokens,
documents and sha256).

How the work is shared (built for a node of 64-192 cores): the source is cut into units of work. For parquet
(FineWeb-Edu on the Hub is parquet) a unit is a few consecutive row groups of one file: the worker process opens
the file itself (local, or hf://... through fsspec with random access), reads those row groups, tokenizes them,
leaves the tokens in shared memory and sends back the token count of each row. This process only hands out unit
descriptors in source order and writes the results in that order (a bounded window of units in flight), so its CPU
time is about 1% of the workers' (bench/bench_fineweb.py): one core keeps up with some 100 workers. jsonl and text
files, and Hub datasets that are not parquet, are read here with `datasets` and their texts sent to the workers:
the same output, but this process does more of the work.
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

from cli import ANY, NOT_EMPTY, Progress, UserError, at_least, check_settings, one_of, run_cli

# --- config ---


@dataclass
class Config:
    # source: a Hugging Face Hub dataset (its parquet files read with random access, never stored whole), or files
    dataset: str = "HuggingFaceFW/fineweb-edu"  # Hub dataset id, e.g. HuggingFaceFW/fineweb
    name: str = "sample-10BT"  # its config: sample-10BT | sample-100BT | sample-350BT | default (everything)
    split: str = "train"  # the Hub dataset's split
    hub_root: str = "hf://datasets"  # where --dataset is found: the Hub, or a copy with the same layout (file:///data/hub)
    data_files: str = ""  # instead of the Hub: paths/globs/folders/fsspec URLs, comma-separated; .parquet .jsonl .json .txt (.gz)
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
    unit_bytes: int = 4_000_000  # parquet: a unit of work is row groups of one file holding this much text (~1M tokens)
    batch_docs: int = 1024  # jsonl/text: documents per batch sent to a tokenizer process
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
    "unit_bytes": at_least(1),
    "hub_root": NOT_EMPTY,
    "debug": ANY,
}


TOKENIZER = "r50k_base"  # gpt2.TOKENIZER: GPT-2's BPE; its <|endoftext|> (50256) starts every document
SHARD_PREFIX = "edufineweb"  # shard names: {SHARD_PREFIX}_{val|train}_{index:06d}.npy, index counting over both splits
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^\w+_(val|train)_\d{6}\.npy$")  # what --overwrite=1 deletes, with the manifest and our temp files
TEMP_RE = re.compile(r"^\.(\d{6}|manifest)\.tmp$")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".text": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
HUB = "hf://datasets"  # Config.hub_root's default: the manifest names the hub_root only when it is another one
IN_FLIGHT_BYTES = 1 << 30  # text bytes of the units handed out and not yet written: bounds memory (tokens ~0.45x)
LOG_EVERY = 10  # seconds between progress lines when stderr is not a terminal (a log file), in place of the bar


# --- source: which files, in which order ---


def file_format(path):
    """'parquet' | 'json' | 'text' from the file name, or None."""
    name = path.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return FORMATS.get(os.path.splitext(name)[1])


def is_url(path):
    return "://" in path


def url_fs(url):
    """(fsspec filesystem, path within it) for a URL such as hf://datasets/..., file:///..., memory://..."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def glob_url(item):
    """The files a URL names (a file, a glob or a folder), sorted, as URLs: the same listing for hf:// and others."""
    fs, path = url_fs(item)
    if fs.isdir(path):
        found = [p for p in fs.find(path) if file_format(p)]
    else:
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def resolve_files(data_files):
    """The files named by a comma-separated list of paths, globs, folders and URLs, in sorted order within each item."""
    files = []
    for item in [s.strip() for s in data_files.split(",") if s.strip()]:
        if is_url(item):
            try:
                found = glob_url(item)
            except (OSError, ValueError, ImportError) as e:
                raise UserError(f"data_files: cannot list {item!r}: {one_line(e)}") from e
        elif os.path.isdir(item):
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


def file_size(path):
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = url_fs(path)
    return fs.size(p)


def hub_files(dataset, name, split, hub_root):
    """The parquet files of a Hub dataset's config and split as URLs, in the order `datasets` reads them: the
    patterns its dataset card (README.md's YAML header) lists under `configs`, each globbed and sorted. None when
    the card lists no such config or its files are not parquet: then `datasets` reads the dataset."""
    import yaml

    root = f"{hub_root.rstrip('/')}/{dataset}"
    fs, repo = url_fs(root)
    card = fs.cat_file(f"{repo}/README.md").decode("utf-8")
    header = yaml.safe_load(card.split("---", 2)[1]) if card.startswith("---") else None
    configs = (header or {}).get("configs") or []
    config = next((c for c in configs if c.get("config_name") == (name or "default")), None)
    if config is None:
        return None
    data_files = config.get("data_files")
    if isinstance(data_files, (str, dict)):
        data_files = [data_files]
    patterns = []
    for entry in data_files or []:  # "pattern", or {split: ..., path: "pattern" or ["pattern", ...]}
        if isinstance(entry, str):
            patterns += [entry] if split == "train" else []
        elif entry.get("split", "train") == split:
            patterns += [entry["path"]] if isinstance(entry["path"], str) else list(entry["path"])
    # the Hub's listing is 10x faster without the last commit of each file, which is not needed here
    details = {"expand_info": False} if fs.protocol in ("hf", ("hf",)) else {}
    files = []
    for pattern in patterns:
        found = sorted(p for p, info in fs.glob(f"{repo}/{pattern}", detail=True, **details).items()
                       if info["type"] == "file")
        files += [fs.unstrip_protocol(p) for p in found if fs.unstrip_protocol(p) not in files]
    if not files or any(file_format(p) != "parquet" for p in files):
        return None
    return files


def describe_source(cfg):
    """What is read, as plain data: stored in the manifest, and compared to decide whether out_dir can be resumed."""
    if not cfg.data_files:
        source = {"dataset": cfg.dataset, "name": cfg.name, "split": cfg.split, "text_column": cfg.text_column}
        if cfg.hub_root.rstrip("/") != HUB:
            source["hub_root"] = cfg.hub_root
        return source
    files, fmt = resolve_files(cfg.data_files)
    source = {"format": fmt, "files": [{"path": p, "bytes": file_size(p)} for p in files],
              "text_column": cfg.text_column}
    if fmt == "text":
        source["text_sample_by"] = cfg.text_sample_by
    return source


def source_label(source):
    if "dataset" in source:
        return f"{source['dataset']} ({source['name']}, {source['split']})"
    paths = [f["path"] for f in source["files"]]
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more files"


def missing_column(column, columns, where):
    return f"no column {column!r} in {where}: its columns are {', '.join(columns)}; pick one with --text_column=NAME"


def check_text_type(column, schema, where):
    """Stops with one line unless `column` of the arrow schema holds strings (or nulls only)."""
    import pyarrow as pa

    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"column {column!r} in {where} holds {kind}, not text: pick the column of strings with "
                        f"--text_column=NAME")


def one_line(e):
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# --- units of work: parquet row groups, or batches of texts read here ---


@dataclass(frozen=True)
class ParquetUnit:
    """Rows first_row.. of the source: the first `rows` rows of these row groups of one parquet file. A worker
    reads them itself; only this small record is sent to it."""
    path: str  # local path or fsspec URL (hf://datasets/...)
    row_groups: tuple
    first_row: int  # source row number of its first row
    rows: int
    text_bytes: int  # uncompressed size of the text column: what it costs in memory while in flight
    column: str


@dataclass(frozen=True)
class TextUnit:
    """Rows first_row.. of the source, read here (jsonl, text, Hub datasets that are not parquet): the texts
    travel to the worker as one pyarrow string array."""
    texts: object  # pyarrow string array, nulls included
    first_row: int
    rows: int
    text_bytes: int


def parquet_footers(paths, column, label, debug):
    """Per file, the rows and the text column's uncompressed bytes of each row group, from the footers only
    (read in threads: on the Hub each is a request)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def footer(path):
        try:
            with open_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:
            if debug:
                raise
            raise UserError(f"cannot read {path}: {one_line(e)}: is it a parquet file?") from e
        schema = meta.schema.to_arrow_schema()  # the top-level columns (meta.schema.names are the leaves)
        if column not in schema.names:
            raise UserError(missing_column(column, schema.names, path))
        check_text_type(column, schema, path)
        rows, sizes = [], []
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            rows.append(rg.num_rows)
            sizes.append(sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                             if rg.column(c).path_in_schema == column))
        return rows, sizes

    with ThreadPoolExecutor(16 if any(map(is_url, paths)) else 1) as pool:
        footers = list(pool.map(footer, paths))
    if not sum(sum(rows) for rows, _ in footers):
        raise UserError(f"no documents in {label}: every file has 0 rows")
    return footers


def parquet_units(paths, footers, column, unit_bytes, start_row, max_rows):
    """ParquetUnits in source order: consecutive row groups of one file, put together until their text column
    holds unit_bytes (a row group is never split: it is the smallest piece parquet reads), from the unit holding
    start_row on, up to max_rows rows. Big units keep this process's cost per token low; the memory they take is
    bounded by IN_FLIGHT_BYTES."""
    end = sum(sum(rows) for rows, _ in footers)
    end = min(end, max_rows) if max_rows else end
    row = 0
    for path, (rows, sizes) in zip(paths, footers, strict=True):
        groups, n, size = [], 0, 0
        for g, (r, s) in enumerate(zip(rows, sizes, strict=True)):
            groups.append(g)
            n, size = n + r, size + s
            if size >= unit_bytes or g == len(rows) - 1 or row + n >= end:
                take = min(n, end - row)
                if row + take > start_row and take > 0:
                    yield ParquetUnit(path, tuple(groups), row, take, int(size * take / max(n, 1)), column)
                row += take
                groups, n, size = [], 0, 0
                if row >= end:
                    return


def read_batches(ds, source, batch_docs, start_row, max_rows, debug):
    """TextUnits of batch_docs rows of a datasets.IterableDataset, from source row start_row on."""
    column, label = source["text_column"], source_label(source)
    # a resume reads (without tokenizing) the rows already done
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
        check_text_type(column, table.schema, label)
        texts = table.column(column).combine_chunks()
        yield TextUnit(texts, row, len(table), texts.nbytes)
        row += len(table)


def open_datasets(source, debug):
    """A streaming datasets.IterableDataset of the source: jsonl/json and text files, and Hub datasets that are
    not parquet."""
    import datasets

    if not debug:
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line
        datasets.disable_progress_bars()
    if "dataset" in source:
        hub = {"name": source["name"] or None, "split": source["split"], "streaming": True}
        # parquet without a dataset card listing its files: read a row group when it is needed, not whole files
        import pyarrow.dataset

        lazy = {"fragment_scan_options": pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)}
        try:
            return datasets.load_dataset(source["dataset"], **hub, **lazy)
        except (TypeError, ValueError) as e:  # not a parquet dataset: no such option
            if "fragment_scan_options" not in str(e):
                raise
            return datasets.load_dataset(source["dataset"], **hub)
    kwargs = {"sample_by": source["text_sample_by"]} if source["format"] == "text" else {}
    paths = [f["path"] for f in source["files"]]
    return datasets.load_dataset(source["format"], data_files=paths, split="train", streaming=True, **kwargs)


def plan_units(source, cfg, start_row):
    """(the units of work from start_row on, the number of rows to read or None when unknown). Every parquet
    footer (or the first batch of texts) is read here, before out_dir is touched: a bad source changes nothing."""
    label = source_label(source)
    try:
        if "dataset" in source:
            paths = hub_files(source["dataset"], source["name"], source["split"], source.get("hub_root", HUB))
            if paths is None and source.get("hub_root", HUB) != HUB:
                raise UserError(f"no parquet files for config {source['name']!r}, split {source['split']!r} in "
                                f"{source['hub_root']}/{source['dataset']}/README.md: check --name and --split")
        else:
            paths = [f["path"] for f in source["files"]] if source["format"] == "parquet" else None
        if paths is not None:
            footers = parquet_footers(paths, source["text_column"], label, cfg.debug)
            units = parquet_units(paths, footers, source["text_column"], cfg.unit_bytes, start_row, cfg.max_docs)
            num_rows = sum(sum(rows) for rows, _ in footers)
        else:
            ds = open_datasets(source, cfg.debug)
            units = read_batches(ds, source, cfg.batch_docs, start_row, cfg.max_docs, cfg.debug)
            try:
                num_rows = ds.info.splits[source["split"]].num_examples or None
            except (AttributeError, KeyError, TypeError):
                num_rows = None
        first = next(units, None)
    except StopIteration:  # datasets' json builder, on files with no rows
        raise UserError(f"no documents in {label}: the source is empty") from None
    except Exception as e:
        if cfg.debug or isinstance(e, UserError):
            raise
        raise UserError(f"cannot open {label}: {one_line(e)}") from e
    if first is None and start_row == 0:
        raise UserError(f"no documents in {label}: the source is empty")
    total = min(num_rows, cfg.max_docs) if num_rows and cfg.max_docs else (num_rows or cfg.max_docs or None)
    return (units if first is None else _chain(first, units)), total


def _chain(first, rest):
    yield first
    yield from rest


# --- tokenize (in worker processes) ---


def open_file(path):
    """A binary file object, local or through fsspec (hf:// reads byte ranges on demand: random access)."""
    if not is_url(path):
        return open(path, "rb")
    fs, p = url_fs(path)
    return fs.open(p, "rb")


_open_parquet = {}  # per worker process: the files it read last, so a footer is parsed once, not once per unit


def read_parquet_unit(unit):
    """Worker: the texts of a ParquetUnit, as pyarrow arrays of at most 1024 rows."""
    import pyarrow.parquet as pq

    if unit.path not in _open_parquet:
        if len(_open_parquet) >= 2:
            _open_parquet.pop(next(iter(_open_parquet)))[0].close()
        f = open_file(unit.path)
        # pre_buffer=False: read the row groups asked for, not a whole file ahead (FineWeb's files are ~2 GB)
        _open_parquet[unit.path] = f, pq.ParquetFile(f, pre_buffer=False)
    pf = _open_parquet[unit.path][1]
    left = unit.rows
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(unit.row_groups), columns=[unit.column],
                                 use_threads=False):
        yield batch.column(0).slice(0, left)
        left -= len(batch)
        if left <= 0:
            return


def tokenize_unit(unit):
    """Worker: a unit of work -> (lengths, tokens). lengths is each row's token count, <|endoftext|> included, and
    0 for an empty or null text (skipped); tokens is one uint16 array holding, per non-empty row, <|endoftext|>
    then its tokens (as enc.encode_ordinary)."""
    enc = tiktoken.get_encoding(TOKENIZER)  # tiktoken caches it: the first call per process loads it
    eot = np.array([enc.eot_token], dtype=np.uint32)
    arrays = read_parquet_unit(unit) if isinstance(unit, ParquetUnit) else [unit.texts]
    parts, lengths = [], []
    for texts in arrays:
        for text in texts.to_pylist():
            if not text:
                lengths.append(0)
                continue
            doc = enc.encode_to_numpy(text, disallowed_special=())  # encode_ordinary, without a Python list
            parts += (eot, doc)
            lengths.append(len(doc) + 1)
    lengths = np.array(lengths, dtype=np.int64)
    if len(lengths) != unit.rows:
        raise ValueError(f"read {len(lengths)} rows, expected {unit.rows}")
    if not parts:
        return lengths, np.empty(0, np.uint16)
    tokens = np.concatenate(parts)
    if tokens.max() >= 2**16:  # cannot happen with GPT-2's 50257 tokens; it would with a bigger vocabulary
        raise ValueError(f"token id {tokens.max()} does not fit in uint16")
    return lengths, tokens.astype(np.uint16)


def tokenize_to_shared_memory(unit):
    """Worker: tokenize_unit, with the tokens left in a new block of shared memory: only its name and the lengths
    go back through the pipe (arrays sent through it cost this process two more copies: ~4% of the workers' CPU
    with multiprocessing.Pool, whose worker-handler thread also busy-waits while a result is being read)."""
    from multiprocessing import shared_memory

    lengths, tokens = tokenize_unit(unit)
    shm = shared_memory.SharedMemory(create=True, size=max(tokens.nbytes, 1))
    np.ndarray(tokens.shape, tokens.dtype, buffer=shm.buf)[:] = tokens
    shm.close()
    return lengths.astype(np.int32), shm.name, len(tokens)


def from_shared_memory(lengths, name, n, scratch=None):
    """The tokens a worker left in shared memory, and the block freed. On Linux the block is a file in /dev/shm,
    read into `scratch` (a list holding one reusable array): one copy into memory this process already has,
    without mapping fresh pages every unit. The tokens are valid until the next call with the same scratch."""
    from multiprocessing import resource_tracker, shared_memory

    path = os.path.join("/dev/shm", name)
    if scratch is not None and os.path.isfile(path):
        if scratch[0].size < n:
            scratch[0] = np.empty(max(n, 2 * scratch[0].size), np.uint16)
        tokens = scratch[0][:n]
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(tokens).cast("B"), 0
            while done < len(view):  # one read returns at most ~2 GB
                done += f.readinto(view[done:]) or _short_read(path)
        os.unlink(path)
        resource_tracker.unregister("/" + name, "shared_memory")  # registered by the worker that made it
        return lengths, tokens
    shm = shared_memory.SharedMemory(name)
    try:
        tokens = np.frombuffer(shm.buf, np.uint16, n).copy()
    finally:
        shm.close()
        shm.unlink()
    return lengths, tokens


def _short_read(path):
    raise OSError(f"{path} ended early")


def worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    try:
        import pyarrow

        pyarrow.set_cpu_count(1)  # one core per worker: arrow's own threads would compete with the other workers
        pyarrow.set_io_thread_count(1)
    except ImportError:
        pass
    # a main process killed with SIGKILL cannot stop its workers, and ProcessPoolExecutor's workers keep the
    # pipe to it open: each one notices that its parent has gone by itself
    import threading

    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()


def exit_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def unit_label(unit):
    if isinstance(unit, ParquetUnit):
        return f"{unit.path} (row groups {unit.row_groups[0]}-{unit.row_groups[-1]})"
    return f"source rows {unit.first_row}-{unit.first_row + unit.rows - 1}"


def worker_pool(num_proc):
    """The tokenizer processes, or None for --num_proc=1 (everything in this process)."""
    if num_proc == 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the same on Linux, macOS and Windows, and no fork of a process holding the source's threads.
    # ProcessPoolExecutor, not multiprocessing.Pool: one thread waits for and reads results (Pool's worker handler
    # spins while its result handler reads), and a worker killed by the OS is an error, not a hang
    return ProcessPoolExecutor(num_proc, multiprocessing.get_context("spawn"), initializer=worker_init)


def tokenize_stream(units, pool, num_proc, debug):
    """Yields (unit, lengths, tokens) per unit, in order; tokens is valid until the next unit is asked for.
    Units are handed out while fewer than 2 * num_proc + 2 are in flight and their text fits in IN_FLIGHT_BYTES,
    so memory stays bounded whatever the source."""

    def result(unit, get):
        try:
            return get()
        except Exception as e:
            if debug:
                raise
            raise UserError(f"cannot read {unit_label(unit)}: {one_line(e)} (--debug=1 shows the traceback)") from e

    if pool is None:
        for unit in units:
            yield unit, *result(unit, lambda u=unit: tokenize_unit(u))
        return
    pending, in_flight, scratch = deque(), 0, [np.empty(0, np.uint16)]
    try:
        for unit in units:
            while pending and (len(pending) >= 2 * num_proc + 2 or in_flight + unit.text_bytes > IN_FLIGHT_BYTES):
                done, task = pending.popleft()
                in_flight -= done.text_bytes
                yield done, *from_shared_memory(*result(done, task.result), scratch)
            pending.append((unit, pool.submit(tokenize_to_shared_memory, unit)))
            in_flight += unit.text_bytes
        while pending:
            done, task = pending.popleft()
            yield done, *from_shared_memory(*result(done, task.result), scratch)
    finally:  # stopped early (an error, Ctrl-C): free the shared memory of the units tokenized but not written
        for _, task in pending:
            if not task.cancel():
                try:
                    from_shared_memory(*task.result())
                except Exception:
                    pass


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


def shared_buffers(shard_size, count=2):
    """count (SharedMemory, uint16 array of shard_size) pairs, or None when /dev/shm lacks room for them and for
    the units in flight (Docker gives it 64 MB unless told otherwise)."""
    from multiprocessing import shared_memory

    try:
        room = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # not Linux
        return None
    if room.f_bavail * room.f_frsize < count * shard_size * 2 + IN_FLIGHT_BYTES:
        return None
    blocks = [shared_memory.SharedMemory(create=True, size=shard_size * 2) for _ in range(count)]
    return [(shm, np.ndarray((shard_size,), np.uint16, shm.buf)) for shm in blocks]


def write_shared_shard(name, n, path, tmp_name):
    """Worker: writes the first n tokens of the shared buffer `name` as the shard `path`, atomically, and returns
    its sha256."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name)
    try:
        write_atomic(path, lambda f: np.save(f, np.ndarray((n,), np.uint16, shm.buf)), tmp_name)
    finally:
        try:
            shm.close()
        except BufferError:  # np.save failed and its traceback still holds the array: the OS unmaps it at exit
            pass
    return sha256_file(path)


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

    def __init__(self, out_dir, manifest, shard_size, val_tokens, pool=None):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size, self.val_tokens, self.pool = shard_size, val_tokens, pool
        shards = manifest["shards"]
        self.pos = dict(shards[-1]["resume"]) if shards else start_position(val_tokens)
        self.index = len(shards)  # of the next shard
        # two buffers (2 x shard_size x 2 bytes; pages are only touched as they fill): one fills while the other is
        # written. Given worker processes and room in /dev/shm they are shared memory and a worker writes and
        # hashes the shard: writing 200 MB into a new file is otherwise most of what this process spends
        self.shared = shared_buffers(shard_size) if pool is not None else None
        if self.shared:
            (self.buf_shm, self.buf), (self.spare_shm, self.spare) = self.shared
        else:
            self.buf, self.spare, self.buf_shm, self.spare_shm = np.empty(shard_size, np.uint16), None, None, None
        self.fill = 0  # tokens in buf
        self.first_doc = self.pos["documents"]  # documents started before buf: the rest start in it
        # one thread writes the shards and the manifest, in order: the disk and the sha256 (computed in a worker
        # when there are some) do not stall the tokenizers
        from concurrent.futures import ThreadPoolExecutor

        self.thread, self.writing = ThreadPoolExecutor(1, thread_name_prefix="shard-writer"), None

    def add(self, first_row, lengths, tokens):
        """Appends the documents of source rows first_row, first_row + 1, ...: row i has lengths[i] tokens
        (<|endoftext|> and its text; 0 = empty, skipped), one after another in tokens. Works a block of documents
        at a time: Python runs per shard and per unit, never per document (the coordinator's CPU is the limit
        of a node-sized run)."""
        pos = self.pos
        rows = first_row + np.flatnonzero(lengths)  # the non-empty rows
        ends = np.cumsum(lengths[lengths > 0])  # where each one's tokens end in `tokens`
        starts = ends - lengths[lengths > 0]
        # a resumed run starts at the unit holding rows_done: what comes before it is in the shards already
        i = int(np.searchsorted(rows, pos["rows_done"]))
        cont = pos["tokens_into_next_row"] > 0  # rows[i] is the document the last shard ended in
        if cont and (i == len(rows) or rows[i] != pos["rows_done"]):
            raise RuntimeError(f"resumed at row {rows[i] if i < len(rows) else None}, expected {pos['rows_done']}")
        at = int(starts[i]) + pos["tokens_into_next_row"] if i < len(rows) else 0
        while i < len(rows):
            j = i + 1 if cont else len(rows)  # a continued document, alone: it was given its split already
            if pos["split"] == "val" and not cont:
                # val: whole documents from the start, while they fit; the first that does not fit ends it for good
                fit = int(np.searchsorted(pos["val_tokens"] + ends[i:] - starts[i], self.val_tokens, side="right"))
                if fit == 0:
                    if pos["val_tokens"] == 0:
                        raise UserError(f"the first document has {ends[i] - starts[i]} tokens, more than --val_tokens="
                                        f"{self.val_tokens}: raise it, or --val_tokens=0 for no val split")
                    pos["empty_documents"] += int(rows[i]) - pos["rows_done"]  # the rows in between were empty
                    pos["rows_done"] = int(rows[i])
                    self.flush()  # the last val shard
                    pos["split"] = "train"
                    continue
                j = i + fit
            self.copy(tokens, at, rows, starts, ends, i, j, cont)  # documents i..j-1, all in one split
            i, at, cont = j, int(ends[j - 1]), False

    def copy(self, tokens, at, rows, starts, ends, i, j, cont):
        """Copies tokens[at:ends[j - 1]] (documents i..j-1, the first one already started when cont) into the
        shards, setting pos to what it is after each shard and at the end."""
        pos, before = self.pos, dict(self.pos)
        new = i + cont  # the first document that starts here

        def pos_at(t):  # pos once tokens[:t] are in the shards: the state the manifest stores after a shard
            d = int(np.searchsorted(ends, t))  # the document holding token t - 1
            documents = before["documents"] + max(d + 1 - new, 0)
            done = int(ends[d]) == t
            return {"rows_done": int(rows[d]) + done, "tokens_into_next_row": 0 if done else t - int(starts[d]),
                    "split": before["split"],
                    "val_tokens": before["val_tokens"] + (int(ends[d] - starts[new]) if before["split"] == "val"
                                                          and d >= new else 0),
                    "documents": documents,
                    # each document started adds the empty rows since the last one: all the empty rows before it
                    "empty_documents": int(rows[d]) - (documents - 1) if d >= new else before["empty_documents"]}

        stop = int(ends[j - 1])
        while at < stop:
            n = min(stop - at, self.shard_size - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[at:at + n]
            self.fill, at = self.fill + n, at + n
            if self.fill == self.shard_size:
                pos.update(pos_at(at))
                self.flush()
        pos.update(pos_at(stop))

    def flush(self):
        """Hands the tokens in buf to the writer thread as the next shard (if any), and carries on in the other
        buffer. The manifest that lists the shard is written after it."""
        if self.fill == 0:
            return
        self.wait()  # for the previous shard: its buffer becomes the spare
        entry = {"file": f"{SHARD_PREFIX}_{self.pos['split']}_{self.index:06d}.npy", "split": self.pos["split"],
                 "tokens": self.fill, "documents": self.pos["documents"] - self.first_doc, "sha256": None,
                 "resume": dict(self.pos)}
        self.writing = self.thread.submit(self.write_shard, self.buf[:self.fill], self.buf_shm, entry,
                                          f".{self.index:06d}.tmp")
        self.buf, self.spare = self.spare if self.spare is not None else np.empty_like(self.buf), self.buf
        self.buf_shm, self.spare_shm = self.spare_shm, self.buf_shm
        self.index += 1
        self.fill, self.first_doc = 0, self.pos["documents"]

    def write_shard(self, tokens, shm, entry, tmp_name):  # in the writer thread
        path = os.path.join(self.out_dir, entry["file"])
        if shm is not None:
            task = self.pool.submit(write_shared_shard, shm.name, len(tokens), path, tmp_name)
            entry["sha256"] = task.result()
        else:
            write_atomic(path, lambda f: np.save(f, tokens), tmp_name)
            # hashing costs ~1 ns per token, as much as the rest of this process's work: a worker does it
            entry["sha256"] = sha256_file(path) if self.pool is None else self.pool.submit(sha256_file, path).result()
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
        if self.shared:
            self.buf = self.spare = None
            for shm, _ in self.shared:
                try:
                    shm.close()
                except BufferError:  # a view is still held (an error on its way up): the OS unmaps it at exit
                    pass
                shm.unlink()
            self.shared = None

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

    # 2. plan the units of work and read the first one's footer (or texts) before touching out_dir: a bad source
    # changes nothing on disk
    units, total = plan_units(source, cfg, start_row)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if state == "fresh":
        clear_out_dir(cfg.out_dir)  # what --overwrite=1 replaces, or temp files left by a run killed at its start
    save_manifest(cfg.out_dir, manifest)
    if state == "resume":
        print(f"resuming {cfg.out_dir}/: {len(manifest['shards'])} shards done, skipping {start_row:,} source rows",
              flush=True)

    # 3. tokenize in worker processes, in order, and write the shards
    from tqdm import tqdm

    pool = worker_pool(num_proc)
    writer = ShardWriter(cfg.out_dir, manifest, cfg.shard_size, cfg.val_tokens, pool)
    # a terminal gets tqdm's bar, redrawn in place; a log file gets a line every LOG_EVERY seconds instead (the bar's
    # redraws would pile up there as one endless line), with the documents done, elapsed time and ETA
    on_terminal = sys.stderr.isatty()
    bar = tqdm(total=total, initial=start_row, unit="doc", unit_scale=True, desc="tokenizing", dynamic_ncols=True,
               disable=not on_terminal)
    progress = Progress(total, done=start_row, skip=1)  # one update per line: the first holds the workers' start-up
    t0, tokens, rows_read = time.time(), 0, start_row
    shown = t0

    def log_progress():
        speed = f", {tokens / (time.time() - t0) / 1e6:.2f}M tokens/s" if tokens else ""
        print(f"tokenizing: docs {progress.count()} | {tokens / 1e6:,.1f}M tokens{speed} | {progress.times()}",
              file=sys.stderr, flush=True)

    if not on_terminal:
        log_progress()
    stream = tokenize_stream(units, pool, num_proc, cfg.debug)
    try:
        for unit, lengths, toks in stream:
            writer.add(unit.first_row, lengths, toks)
            tokens += len(toks)
            bar.update(unit.first_row + unit.rows - rows_read)
            rows_read = unit.first_row + unit.rows
            if time.time() > shown + (1 if on_terminal else LOG_EVERY):  # formatting per unit costs more than the loop
                shown = time.time()
                if on_terminal:
                    bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens, {tokens / (shown - t0) / 1e6:.2f}M tokens/s",
                                        refresh=False)
                else:
                    progress.update(rows_read)
                    log_progress()
        if not on_terminal:
            progress.update(rows_read)
            log_progress()
        if writer.pos["documents"] == 0:
            raise UserError(f"no documents in {source_label(source)}: all {rows_read:,} rows have an empty "
                            f"{source['text_column']!r}; is --text_column right?")
        totals = writer.finish(rows_read)
    except BaseException as e:
        bar.close()  # ends the bar's line: what is printed next (the error, or the note below) starts on its own
        if not isinstance(e, KeyboardInterrupt):
            raise
        stream.close()
        writer.close()
        print(f"\ninterrupted: the {len(manifest['shards'])} shards in {cfg.out_dir}/ are safe; "
              f"run the same command again to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        stream.close()
        writer.close()  # the shard being written is finished (its sha256 is computed in the pool)
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # stops the worker processes, whatever happened
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


if __name__ == "__main__":
    try:
        run_cli(main, Config(), sys.argv[1:])
    except KeyboardInterrupt:  # before the shards were started (later, main says more)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
