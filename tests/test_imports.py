"""Commands are siblings: a script imports the shared floors below it, never another command (docs/tour.md's "The
imports go one way"). The imports are read with ast, so nothing is imported and torch is never loaded."""

import ast
import glob
import json
import os

from conftest import ROOT

# what a command may import; every other .py at the top and in bench/, and every notebook, is a command. gpt2.py is
# the trainer and the library both: everything imports it, and it imports only the floors below it (cli, muon, faults, plot)
FLOORS = {"cli.py", "gpt2.py", "muon.py", "faults.py", "plot.py", "offline.py", "bench/machine.py", "bench/profile_step.py"}


def script_source(path):
    """A .py file's text, or a notebook's code cells (its %magic and !shell lines dropped: they are not Python)."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".ipynb"):
            return f.read()
        cells = [c["source"] for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    lines = "\n".join(s if isinstance(s, str) else "".join(s) for s in cells).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def imported_modules(source):
    """Every module name the source imports, at the top or inside a function: import a.b, from a import b (a and
    a.b: b may be a module), importlib.import_module("a") and __import__("a") with a literal name."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def repo_scripts():
    """{module name: path relative to the repo} for the top-level scripts and bench/ (which puts itself on sys.path,
    so its modules are imported as `machine` as well as `bench.machine`), and the notebooks."""
    modules, notebooks = {}, []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        name = os.path.basename(rel).removesuffix(".py")
        modules[name] = rel
        if rel.startswith("bench/"):
            modules[f"bench.{name}"] = rel
    for path in sorted(glob.glob(os.path.join(ROOT, "**", "*.ipynb"), recursive=True)):
        if ".ipynb_checkpoints" not in path:
            notebooks.append(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return modules, notebooks


def test_no_script_imports_a_command():
    modules, notebooks = repo_scripts()
    scripts = sorted(set(modules.values())) + notebooks
    # the commands that once borrowed from a sibling are among those read, so a wrong glob cannot pass by reading nothing
    assert {"evaluate.py", "hellaswag.py", "demo.py", "bench/bench_muon.py", *FLOORS} <= set(scripts)
    wrong = []
    for rel in scripts:
        for name in sorted(imported_modules(script_source(os.path.join(ROOT, rel)))):
            if name in modules and modules[name] not in FLOORS and modules[name] != rel:
                wrong.append(f"{rel} imports {name} ({modules[name]}, a command)")
    assert not wrong, ("; ".join(wrong) + f": move what it uses down to a shared floor ({', '.join(sorted(FLOORS))}), "
                       f"or add a new small file of its own to FLOORS")


def test_every_import_form_is_read(tmp_path):
    source = ("import a\nimport b.c as d\nfrom e import f\nfrom . import g\n"
              "def h():\n    import i\n    from j.k import m\n"
              "importlib.import_module('n')\n__import__('o')\nimportlib.import_module(name)\n")
    assert imported_modules(source) == {"a", "b.c", "e", "e.f", "i", "j.k", "j.k.m", "n", "o"}
    notebook = tmp_path / "x.ipynb"
    notebook.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["import not_code\n"]},
        {"cell_type": "code", "source": ["%matplotlib inline\n", "!pip install p\n", "import demo\n"]},
        {"cell_type": "code", "source": "from hellaswag import expand_aliases"}]}))
    assert imported_modules(script_source(str(notebook))) == {"demo", "hellaswag", "hellaswag.expand_aliases"}
