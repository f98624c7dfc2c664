"""The docs keep their word: every command line in README.md and docs/**/*.md is read by its script's own settings
parser and checks (so a renamed setting, a misspelt script or a refused value fails here, not in a reader's
terminal), every relative link reaches a file and a heading that exist, and docs/tour.md names only functions and
classes that gpt2.py has. Nothing is run: each script is imported once and only its command line is exercised."""

import ast
import builtins
import difflib
import functools
import glob
import importlib.util
import os
import re
import shlex
import sys
import urllib.parse
from typing import NamedTuple

import pytest
from conftest import ROOT

import cli

DOCS = sorted(os.path.relpath(p, ROOT) for p in [os.path.join(ROOT, "README.md"),
                                                  *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
TOUR = os.path.join("docs", "tour.md")  # gpt2.py read top to bottom: the names it gives must be gpt2.py's


# --- reading markdown ---


FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def split_markdown(text):
    """(prose, fenced): the document's lines twice, with the fenced code blocks' lines blanked in the first and all
    other lines blanked in the second, so that both keep the file's line numbers."""
    prose, fenced, fence = [], [], None
    for line in text.split("\n"):
        opened, bare = FENCE.match(line), line.strip()
        if fence is None and opened:
            fence, kind = opened.group(1), "fence"
        elif fence is not None and bare and set(bare) == {fence[0]} and len(bare) >= len(fence):  # its closing fence
            fence, kind = None, "fence"
        else:
            kind = "prose" if fence is None else "code"
        prose.append(line if kind == "prose" else "")
        fenced.append(line if kind == "code" else "")
    return prose, fenced


SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


def code_spans(prose):
    """(line, text) of every inline code span, found paragraph by paragraph: a span may wrap onto the next line (the
    line break reads as a space), never past a blank line."""
    spans, start = [], 0
    for end in [i for i, line in enumerate(prose) if not line.strip()] + [len(prose)]:
        paragraph = "\n".join(prose[start:end])
        for m in SPAN.finditer(paragraph):
            # a table cell writes | in code as \|
            spans.append((start + 1 + paragraph.count("\n", 0, m.start()), m.group(2).replace("\n", " ").replace("\\|", "|")))
        start = end + 1
    return spans


def fenced_lines(fenced):
    """(line, text) of every line in a code block, with lines that end in a backslash joined to the next, as the
    shell reads them, and a leading "$ " prompt dropped."""
    out, i = [], 0
    while i < len(fenced):
        first, text = i + 1, fenced[i]
        while text.rstrip().endswith("\\") and i + 1 < len(fenced):
            i += 1
            text = text.rstrip()[:-1] + " " + fenced[i].strip()
        if text.strip():
            out.append((first, text.strip().removeprefix("$ ")))
        i += 1
    return out


# --- finding the commands ---


SEPARATORS = {"&&", "||", ";", "|", "&", "|&", ";;", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")


def simple_commands(text):
    """The words of each simple command in a shell line: split at && || ; | &, comments dropped, and a redirection
    (> f, 2>&1, < f) cut off with the rest of its command. None if the line cannot be read as the shell would (an
    unclosed quote)."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:
        return None
    commands, words, redirected = [], [], False
    for token in tokens + [";"]:
        if token in SEPARATORS:
            commands.append(words)
            words, redirected = [], False
        elif redirected:
            pass
        elif set(token) <= set("<>&") and set(token) & set("<>"):
            if words and words[-1].isdigit():  # the 2 of 2>&1 is a file descriptor, not an argument
                words.pop()
            redirected = True
        else:
            words.append(token)
    return [w for w in commands if w]


def launched_script(args):
    """(script, its arguments) from torchrun's arguments: its own options, then the script. An option's value goes
    after = (--nproc_per_node=8), so that the first word that is not an option is the script."""
    i = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    return None if i is None else (args[i], args[i + 1:])


def project_script(words, bare):
    """(script, its arguments) when the simple command `words` runs a file: python [its options] X.py ...,
    torchrun [its options] X.py ..., python -m torch.distributed.run [its options] X.py ..., after any VAR=value, or
    (if `bare`) X.py followed by options. None for anything else (pip, python -m pytest, tee, ...)."""
    while words and (ASSIGNMENT.match(words[0]) or words[0] == "env"):
        words = words[1:]
    if not words:
        return None
    program = os.path.basename(words[0])
    if program == "torchrun":
        return launched_script(words[1:])
    if PYTHON.match(program):
        rest = words[1:]
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if option == "-m":
                module = rest[0] if rest else ""
                if module == "torch.distributed.run":
                    return launched_script(rest[1:])
                path = module.replace(".", "/") + ".py"
                return (path, rest[1:]) if os.path.isfile(os.path.join(ROOT, path)) else None
            if option == "-c":
                return None
            if option in ("-X", "-W") and rest:  # python's options that take a value
                rest.pop(0)
        return (rest[0], rest[1:]) if rest else None
    if bare and words[0].endswith(".py") and any(w.startswith("-") for w in words[1:]):
        return words[0], words[1:]
    return None


class Command(NamedTuple):
    line: int
    text: str  # the command's words, quoted again as the shell would read them
    script: str | None  # None: the line could not be read (an unclosed quote)
    args: list
    whole: bool  # False for a bare `X.py --name=value` in prose: a fragment that names a mode or setting


def doc_commands(path):
    """Every command line in the markdown file `path` that runs a script: in code blocks, and in inline code spans,
    where a bare `X.py --name=value` counts too, as a fragment."""
    with open(path, encoding="utf-8") as f:
        prose, fenced = split_markdown(f.read())
    found = []
    # a bare X.py only in prose: in a code block, a line that starts with one is output (fineweb.py config: ...)
    lines = [(line, text, False) for line, text in fenced_lines(fenced)] + [(*span, True) for span in code_spans(prose)]
    for line, text, bare in sorted(lines, key=lambda found: found[0]):
        commands = simple_commands(text)
        if commands is None:  # only a command is worth the error: prose in backticks may hold an apostrophe
            if project_script(text.split(), bare):
                found.append(Command(line, text, None, [], True))
            continue
        for words in commands:
            script = project_script(words, bare)
            if script:
                found.append(Command(line, shlex.join(words), *script, bool(project_script(words, bare=False))))
    return found


# --- checking a command as its script would ---


def script_files():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/*/*.py"))


@functools.cache
def load(script):
    """The script's module, imported once from its file: a top-level script under its own name (as the scripts
    import each other), one in a folder under a name of its own, with its folder on sys.path as when it runs."""
    path = os.path.join(ROOT, script)
    name = script.removesuffix(".py")
    if "/" in name:
        sys.path.insert(0, os.path.dirname(path))
        name = "docs_" + name.replace("/", "_")
    known = sys.modules.get(name)
    if known is not None and os.path.abspath(getattr(known, "__file__", "")) == os.path.abspath(path):
        return known
    spec = importlib.util.spec_from_file_location(name if known is None else f"docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before it runs: the scripts it imports may import it back by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@functools.cache
def command_line(script):
    """(the Config class that the script's run_cli(main, Config(), argv) reads, whether that argv goes through
    cli.expand_aliases, which reads -m NAME); None for a script that reads its arguments by hand (plot.py)."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", "")) == "run_cli"), None)
    if call is None:
        return None
    aliases = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "expand_aliases" for n in ast.walk(call.args[2]))
    return call.args[1].func.id, aliases


def check_settings(module, cfg, whole):
    """What the script checks before any work: gpt2.py's check_command_line; otherwise its RULES and RELATIONS
    (fineweb.py, hellaswag.py, evaluate.py); a script with neither (demo.py, bench/) only parses them. A fragment
    (`gpt2.py --mode=export` in prose) leaves out the rest of its command, so only each value is checked."""
    own, rules = getattr(module, "check_command_line", None), getattr(module, "RULES", None)
    if whole and own is not None and own.__module__ == module.__name__:
        own(cfg)
    elif rules is not None:
        cli.check_settings(cfg, rules, getattr(module, "RELATIONS", ()) if whole else ())


def command_error(script, args, whole=True):
    """Why the script would refuse this command line before doing any work, or None if it would take it."""
    path = os.path.normpath(os.path.join(ROOT, script))
    if not path.startswith(ROOT + os.sep) or not os.path.isfile(path):
        near = difflib.get_close_matches(os.path.normpath(script), script_files(), n=1)
        return f"no such script {script}" + (f": did you mean {near[0]}?" if near else "")
    script = os.path.relpath(path, ROOT)
    entry = command_line(script)
    if entry is None or any(a in cli.HELP for a in args):  # run_cli answers --help before it reads anything else
        return None
    config, aliases = entry
    args = [a for a in args if a not in ("...", "…")]  # "and more settings", as prose writes it
    module = load(script)
    cfg = getattr(module, config)()
    try:
        cli.apply_overrides(cfg, cli.expand_aliases(args) if aliases else args)
        check_settings(module, cfg, whole)
    except cli.UserError as e:
        return str(e)
    return None


def command_errors(path, shown):
    """One line per command in the markdown file `path` that its script would refuse: file:line: `command`: why."""
    errors = []
    for c in doc_commands(path):
        error = "a quote is not closed" if c.script is None else command_error(c.script, c.args, c.whole)
        if error:
            errors.append(f"{shown}:{c.line}: `{c.text}`: {error}")
    return errors


# --- links ---


def slug(heading):
    """GitHub's anchor for a heading: its text lowercased, punctuation but - and _ dropped, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every anchor a markdown file has: its headings' slugs (a repeated one numbered -1, -2, as GitHub does) and
    the id or name of its HTML tags."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_markdown(f.read())
    headings = []
    for i, line in enumerate(prose):
        atx = re.match(r"^ {0,3}#{1,6}\s+(.*?)(\s+#+)?\s*$", line)
        if atx:
            headings.append(atx.group(1))
        elif i and prose[i - 1].strip() and re.match(r"^ {0,3}(=+|-+)\s*$", line) and "|" not in prose[i - 1]:
            headings.append(prose[i - 1])  # a setext heading: its text underlined with === or ---
    found, seen = set(), {}
    for heading in headings:
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found | set(re.findall(r"<\w+[^>]*\s(?:id|name)=\"([^\"]+)\"", "\n".join(prose)))


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)|"
                  r"<\w+[^>]*\s(?:href|src)=\"([^\"]+)\"", re.M)


def link_errors(path, shown):
    """One line per relative link in the markdown file `path` whose file or heading does not exist."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_markdown(f.read())
    text = SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(prose))  # code is not a link
    # a link starting with / is from the repository's root; the file's own folder stands in for one outside it
    path = os.path.abspath(path)
    root = ROOT if path.startswith(ROOT + os.sep) else os.path.dirname(path)
    errors = []
    for m in LINK.finditer(text):
        target = next(t for t in m.groups() if t is not None)
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        line = text.count("\n", 0, m.start()) + 1
        file, _, anchor = urllib.parse.unquote(target).partition("#")
        linked = os.path.normpath(os.path.join(root, file.lstrip("/")) if file.startswith("/") else
                                  os.path.join(os.path.dirname(path), file)) if file else path
        if not linked.startswith(root + os.sep) or not os.path.exists(linked):  # GitHub shows nothing outside
            errors.append(f"{shown}:{line}: link to {target}: no such file {os.path.relpath(linked, os.path.dirname(path))}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            near = difflib.get_close_matches(anchor, anchors(linked), n=1)
            errors.append(f"{shown}:{line}: link to {target}: {os.path.basename(linked)} has no heading #{anchor}"
                          + (f": did you mean #{near[0]}?" if near else ""))
    return errors


# --- the tour ---


CALLED = re.compile(r"^([A-Za-z_]\w*)\(.*\)$")  # `name()` or `name(args)`; a dotted one is someone else's
# a class: Block, DataLoaderLite, GPTConfig; a word all in capitals (GPT, HF_TOKEN) may be a constant or a variable
CAMEL = re.compile(r"^[A-Z](?=[A-Za-z0-9]*[a-z])[A-Za-z0-9]*$")


@functools.cache
def defined_names(script):
    """Every function, method and class the script defines at any depth, and what it imports from this project's
    modules beside it that they define (gpt2.py's MuonAdamW)."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and os.path.isfile(os.path.join(ROOT, f"{node.module}.py")):
            names |= {a.name for a in node.names} & defined_names(f"{node.module}.py")
    return names


def tour_errors(path, shown, script="gpt2.py"):
    """One line per `name()` or `CamelCase` name in the markdown file `path` that `script` does not define. A name
    from elsewhere is written with its module (`torch.compile()`, `transformers.GPT2LMHeadModel`); builtins pass."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_markdown(f.read())
    errors = []
    for line, text in code_spans(prose):
        called = CALLED.match(text.strip())
        name = called.group(1) if called else text.strip() if CAMEL.match(text.strip()) else None
        if name and name not in defined_names(script) and not hasattr(builtins, name):
            near = difflib.get_close_matches(name, defined_names(script), n=1)
            errors.append(f"{shown}:{line}: `{text}`: {script} defines no {name}" +
                          (f": did you mean {near[0]}?" if near else ""))
    return errors


# --- the docs as they are ---


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_line_is_taken_by_its_script(doc):
    errors = command_errors(os.path.join(ROOT, doc), doc)
    assert not errors, "commands their scripts refuse:\n" + "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_reaches_a_file_and_heading(doc):
    errors = link_errors(os.path.join(ROOT, doc), doc)
    assert not errors, "broken links:\n" + "\n".join(errors)


def test_the_tour_names_only_what_gpt2_defines():
    errors = tour_errors(os.path.join(ROOT, TOUR), TOUR)
    assert not errors, "names gpt2.py does not define:\n" + "\n".join(errors)


# --- the checks can fail ---


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_commands_are_found_in_every_form_and_nothing_else(tmp_path):
    doc = write(tmp_path, "forms.md", """\
Prose that says python gpt2.py without code is not a command, nor `gpt2.py`, nor `pip install -r requirements.txt`.
Inline, `python fineweb.py --out_dir=x` and a span that wraps: `python bench/bench_memory.py
--run=table` and a bare one, `bench/bench_train.py --compile=1`.

```bash
pip install -r requirements.txt && python demo.py --quick=1   # comment --not_a_setting
OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=2 gpt2.py --fsdp=1 \\
    --prompt="two words" 2>&1 | tee run.log
python -m torch.distributed.run --nnodes=1 hellaswag.py -m gpt2; python -m pytest tests -q
$ python -X importtime gpt2.py --help > /dev/null
fineweb.py config: --num_proc=2 (output, not a command)
```

```python
x = "python gpt2.py --would_fail=1"
```
""")
    found = [(c.line, c.script, c.args) for c in doc_commands(doc)]
    assert found == [
        (2, "fineweb.py", ["--out_dir=x"]),
        (2, "bench/bench_memory.py", ["--run=table"]),
        (3, "bench/bench_train.py", ["--compile=1"]),
        (6, "demo.py", ["--quick=1"]),
        (7, "gpt2.py", ["--fsdp=1", "--prompt=two words"]),
        (9, "hellaswag.py", ["-m", "gpt2"]),
        (10, "gpt2.py", ["--help"]),
    ]
    assert command_errors(doc, "forms.md") == []
    doc = write(tmp_path, "quote.md", "`python gpt2.py --prompt=\"unclosed`, but `it's fine` in prose\n")
    assert command_errors(doc, "quote.md") == ["quote.md:1: `python gpt2.py --prompt=\"unclosed`: a quote is not closed"]


def first_gpt2_command():
    """The first gpt2.py command in the docs that sets something as --name=value: (its script, its arguments)."""
    for doc in DOCS:
        for c in doc_commands(os.path.join(ROOT, doc)):
            if c.script == "gpt2.py" and c.whole and any(re.match(r"^--\w+=", a) for a in c.args):
                return c.script, c.args
    raise AssertionError("no gpt2.py command with a --name=value setting in the docs")


def test_a_renamed_setting_a_misspelt_script_and_a_refused_value_fail(tmp_path):
    script, args = first_gpt2_command()
    setting = next(a for a in args if re.match(r"^--\w+=", a))
    name = setting[2:].partition("=")[0]
    renamed = [a.replace(f"--{name}=", f"--{name}_x=") for a in args]
    bad_value = cli.merge_settings([*args, "--max_steps=-5"])  # replaces a --max_steps=N of the command's own
    commands = [shlex.join(["python", script, *args]), shlex.join(["python", script, *renamed]),
                shlex.join(["python", "gtp2.py", *args]), shlex.join(["torchrun", "--standalone", script, *bad_value])]
    doc = write(tmp_path, "broken.md", "```bash\n" + "\n".join(commands) + "\n```\n")

    errors = command_errors(doc, "broken.md")
    assert len(errors) == 3, errors  # the command as the docs have it is taken
    assert errors[0].startswith(f"broken.md:3: `{commands[1]}`: unknown setting '{name}_x'"), errors[0]
    assert errors[1].startswith(f"broken.md:4: `{commands[2]}`: no such script gtp2.py: did you mean gpt2.py?"), errors[1]
    # the refusal is gpt2.py's own rule for max_steps, and that rule is one that -5 breaks
    import gpt2

    rule = gpt2.RULES["max_steps"]
    assert not rule.holds(-5)
    assert errors[2].startswith(f"broken.md:5: `{commands[3]}`: --max_steps=-5: {rule.accepts}"), errors[2]


def test_a_relation_between_settings_and_an_alias_are_checked(tmp_path):
    doc = write(tmp_path, "more.md", "`python gpt2.py --n_embd=30 --n_head=4` and `python evaluate.py -m gpt2 "
                                     "--limit=-1`, `python hellaswag.py -m gpt2 --batch_size=4`\n")
    errors = command_errors(doc, "more.md")
    assert len(errors) == 2, errors
    assert "n_embd=30 is not divisible by n_head=4" in errors[0] and "--limit=-1" in errors[1], errors


def test_a_broken_link_or_anchor_fails(tmp_path):
    write(tmp_path, "other.md", "# Real heading\n\nSome text.\n\n## Muon at every scale: `--optimizer=muon --fsdp=1`\n")
    doc = write(tmp_path, "links.md", """\
# Links

[fine](other.md), [fine](other.md#real-heading), [fine](other.md#muon-at-every-scale---optimizermuon---fsdp1),
[fine](#links), [external](https://example.com/nowhere.md), `[in code](missing.md)`
[gone](missing.md) and [wrong heading](other.md#real-headings)
and [here](#no-such-heading).
""")
    errors = link_errors(doc, "links.md")
    assert errors == ["links.md:5: link to missing.md: no such file missing.md",
                      "links.md:5: link to other.md#real-headings: other.md has no heading #real-headings: did you mean "
                      "#real-heading?",
                      "links.md:6: link to #no-such-heading: links.md has no heading #no-such-heading"], errors


def test_a_name_the_tour_invents_fails(tmp_path):
    doc = write(tmp_path, "tour.md", "`DataLoaderLite` feeds `configure_optimizers()`, not `DataLoaderLight` or\n"
                                     "`train_stepp()` or `Blocks`; `Config` is; `torch.compile()`, `print()`, `GPT_X`\n"
                                     "are not checked.\n")
    errors = tour_errors(doc, "tour.md")
    assert len(errors) == 3, errors
    assert errors[0].startswith("tour.md:1: `DataLoaderLight`: gpt2.py defines no DataLoaderLight"), errors
    assert errors[1].startswith("tour.md:2: `train_stepp()`: gpt2.py defines no train_stepp"), errors
    assert errors[2].startswith("tour.md:2: `Blocks`: gpt2.py defines no Blocks"), errors
