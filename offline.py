"""
What a machine with no network but the package index needs for a run on real text, shared by demo.py and
bench/bench_muon.py: a corpus every Python installation ships (the language reference behind help() and the standard
library's docstrings, read from the source files, nothing imported or run), and GPT-2's tokenizer file, from tiktoken
or else from PyPI.
"""

import ast
import glob
import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

# --- corpus ---


def reference_docs():
    """The language reference's sections, as help('TOPIC') shows them."""
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


def docstring_docs():
    """Yields one document per standard-library module: its docstrings (module, classes, functions), read with ast."""
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a template or a file for another Python version
            nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
            texts = [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) > 40]
            if texts:
                yield "\n\n".join(texts)


# --- tokenizer ---


# GPT-2's tokenizer file, for a machine that reaches PyPI and nothing else: openai-whisper's source release
# ships it as whisper/assets/gpt2.tiktoken, byte for byte tiktoken's r50k_base.tiktoken (checked by its SHA-256)
WHISPER_SDIST = "openai-whisper==20250625"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def install_tokenizer_file(data, cache_dir):
    """Puts r50k_base.tiktoken's bytes where tiktoken looks for them (its cache names files by the URL's SHA-1)."""
    if hashlib.sha256(data).hexdigest() != R50K_SHA256:
        sys.exit("demo: the tokenizer file from PyPI does not match r50k_base.tiktoken's SHA-256; set TIKTOKEN_CACHE_DIR")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, hashlib.sha1(R50K_URL.encode()).hexdigest())
    tmp = f"{path}.{os.getpid()}.tmp"  # its own name: processes that start together (test workers) may all write it
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_tokenizer(demo_dir):
    """GPT-2's tokenizer for this process and the scripts it runs: tiktoken's own download or cache if it works,
    else the copy on PyPI (see WHISPER_SDIST)."""
    from gpt2 import get_tokenizer

    try:
        get_tokenizer()
        return
    except Exception as e:  # no route to tiktoken's host: fall back to PyPI, the one network this demo relies on
        reason = type(e).__name__
    cache_dir = os.path.join(demo_dir, "tiktoken_cache")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    try:
        get_tokenizer()  # fetched on an earlier run
        return
    except Exception:
        pass
    print(f"0. tiktoken could not fetch GPT-2's tokenizer ({reason}): taking it from PyPI ({WHISPER_SDIST})")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                        "--dest", tmp, WHISPER_SDIST], check=True)
        with tarfile.open(glob.glob(os.path.join(tmp, "*.tar.gz"))[0]) as sdist:
            member = next(m for m in sdist.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            install_tokenizer_file(sdist.extractfile(member).read(), cache_dir)
    get_tokenizer()
