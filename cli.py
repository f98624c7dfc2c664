"""
The command line every script shares: settings over a config dataclass, --help, and one-line errors.

Each script (gpt2.py, hellaswag.py, fineweb.py, demo.py, bench/) keeps its settings in a dataclass at its top and
ends with `run_cli(main, Config(), sys.argv[1:])`. A setting is typed --name=value or --name value, with - or _ in
the name alike; a bool is also a bare --name (true) or --no-name (false). A mistake the user can fix is raised as a
UserError anywhere in the run and printed as one line, `error: ...`, with exit status 1 (a traceback only with
--debug=1). This module imports nothing heavy, so fineweb.py's worker processes and a script's --help never pay for
torch.

-h/--help is read from the script's own text, never a second copy: the opening paragraph of its docstring, then
each field of its Config with its type, its default, its trailing comment and what its RULES entry accepts, under
the Config's own section comments. A script whose imports are heavy answers it before them:
`if __name__ == "__main__": answer_help(__file__)` above its imports reads the file and exits, so torch is never
imported; run_cli answers it too, for scripts that are quick to import.

What each setting accepts is declared once, beside its Config: RULES maps every field to a Rule (at_least(1),
one_of("cpu", "cuda"), ...), RELATIONS lists what must hold between fields, and check_settings(cfg, RULES,
RELATIONS) checks them all before the script does any work. A field without a rule is a test failure.
"""

import ast
import dataclasses
import difflib
import json
import operator
import os
import shutil
import sys
import textwrap
import time
import tokenize
from collections import deque
from collections.abc import Callable
from types import UnionType
from typing import Any, NamedTuple, get_args

HELP = ("-h", "--help")
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}  # what --help evaluates in a default or a rule


class UserError(ValueError):
    """A mistake the user can fix. The command line shows its message as one line, no traceback."""


def apply_overrides(cfg, argv):
    """Sets fields of the dataclass `cfg` from the command line's settings; returns the names set.

    --name=value or --name value (the name with - or _ alike); a bool also as a bare --name (true) or --no-name
    (false). Values are parsed as literals of the field's type (never evaluated as code); bools take 0/1/true/false.
    What could be read two ways is an error: a value that looks like a setting, a setting given twice with two values.
    """
    # a field declared int | str takes a number or a word (micro_batch_size: 64 or auto); others the default's type
    kinds = {f.name: f.type if isinstance(f.type, UnionType) else type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    given = {}  # name -> (the argument as typed, its value)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        typed, sep, text = arg.removeprefix("--").partition("=")
        name = typed.replace("-", "_")
        if not arg.startswith("--") or not typed:
            raise UserError(bad_argument(arg, argv[i - 2] if i > 1 else "", kinds))
        if name not in kinds and name.startswith("no_") and kinds.get(name[3:]) is bool:
            if sep:
                raise UserError(f"{arg}: --{typed} takes no value; write --{typed} or --{name[3:]}={text}")
            name, text = name[3:], "false"
        elif name not in kinds:
            raise UserError(unknown_setting(typed, kinds))
        elif not sep and kinds[name] is bool:
            text = "true"
        elif not sep:  # --name value
            if i == len(argv):
                raise UserError(f"--{typed} needs a value: write --{name}=VALUE or --{name} VALUE")
            if argv[i].startswith("--"):
                raise UserError(f"--{typed} is followed by {argv[i]!r}, a setting, not a value: write --{name}=VALUE "
                                f"(--{name}= for an empty one)")
            text = argv[i]
            arg = f"{arg} {text}"
            i += 1
        value = parse_value(name, text, kinds[name])
        if name in given and given[name][1] != value:
            raise UserError(f"--{name} is given twice, as {given[name][0]} and {arg}: keep one")
        given[name] = (arg, value)
        setattr(cfg, name, value)
    return set(given)


def bad_argument(arg, before, kinds):
    """The message for an argument that is not a setting, with the setting it probably meant."""
    flag = before.removeprefix("--").replace("-", "_")
    if before.startswith("--") and kinds.get(flag) is bool and arg.lower() in ("0", "1", "true", "false"):
        return (f"bad argument {arg!r} after {before}: a bool setting takes its value after =, as {before}={arg}; "
                f"a bare {before} means true")
    if arg.lstrip("-").partition("=")[0].replace("-", "_") in kinds:
        return f"bad argument {arg!r}: write --name=value or --name value, as --{arg.lstrip('-')}"
    return f"bad argument {arg!r}: write --name=value or --name value (--help lists the settings)"


def unknown_setting(typed, names):
    """The message for a name that is no setting: the three nearest settings, those that contain it first, then by
    spelling."""
    name = typed.replace("-", "_")
    likeness = {n: difflib.SequenceMatcher(None, name, n).ratio() for n in names}
    near = [n for n in names if likeness[n] >= 0.6 or (len(name) > 1 and name in n) or (len(n) > 2 and n in name)]
    near.sort(key=lambda n: (name in n, likeness[n]), reverse=True)  # stable: equally near ones keep the Config's order
    if not near:
        return f"unknown setting {typed!r}: --help lists the settings"
    return f"unknown setting {typed!r}: did you mean {', '.join(near[:3])}? (--help lists them all)"


def merge_settings(args):
    """`args` with each --name=value setting once, at its last value, where it first appeared: for a program that
    builds a command line from defaults and overrides (a person who types a setting twice with two values gets an
    error). Only the --name=value form is merged; other arguments pass through."""
    setting = lambda a: a.startswith("--") and "=" in a
    last = {a.partition("=")[0].replace("-", "_"): a for a in args if setting(a)}
    out, seen = [], set()
    for a in args:
        key = a.partition("=")[0].replace("-", "_")
        if not setting(a):
            out.append(a)
        elif key not in seen:
            seen.add(key)
            out.append(last[key])
    return out


def parse_value(name, text, kind):
    if isinstance(kind, UnionType):  # the first of its types that reads the text: int | str takes 64 or auto
        for option in get_args(kind):
            try:
                return parse_value(name, text, option)
            except UserError:
                pass
        raise UserError(f"--{name}={text}: expected {' or '.join(option.__name__ for option in get_args(kind))}")
    if kind is bool:
        if text.lower() in ("1", "true"):
            return True
        if text.lower() in ("0", "false"):
            return False
    elif kind is str:
        return text
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    accepted = "0, 1, true or false" if kind is bool else f"a{'n' * (kind is int)} {kind.__name__}"
    raise UserError(f"--{name}={text}: expected {accepted}")


# --- what each setting accepts ---


class Rule(NamedTuple):
    """What one setting accepts: `holds(value)` is True for a good value; `accepts` says it in words; `example` is a
    good value to suggest when the default is not one; `bad` are values it refuses (the tests try each); `brief` says
    it in a few words for --help ("" = accepts, less its "must be ")."""

    holds: Callable[[Any], bool]
    accepts: str
    example: Any = None
    bad: tuple = ()
    brief: str = ""


def at_least(low):
    bad = tuple(sorted({low - 1, -1}))  # zero and negative
    return Rule(lambda v: v >= low, f"must be at least {low}", low, bad, f">= {low}")


def above(low):
    return Rule(lambda v: v > low, f"must be > {low}", None, (low, low - 1), f"> {low}")


def between(low, high, example):
    """low <= value < high."""
    return Rule(lambda v: low <= v < high, f"must be at least {low} and below {high}", example, (low - 1, high),
                f">= {low} and < {high}")


def one_of(*words):
    accepted = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    return Rule(lambda v: v in words, f"expected {accepted}", words[0], ("nonsense",), f"one of {', '.join(words)}")


ANY = Rule(lambda v: True, "anything")  # a path, a name or a text that only its use can check
NOT_EMPTY = Rule(lambda v: v != "", "must not be empty", None, ("",), "not empty")


def rule_brief(rule):
    """What --help says a rule accepts; "" for ANY, which accepts anything."""
    return "" if rule is ANY else rule.brief or rule.accepts.removeprefix("must be ")


class Relation(NamedTuple):
    """What must hold between settings: `holds(cfg)`, else the one-line `error(cfg)`, which names the first of
    `names`. `bad` is a set of overrides that breaks it (the tests try it on the defaults)."""

    names: tuple
    holds: Callable[[Any], bool]
    error: Callable[[Any], str]
    bad: dict


def check_settings(cfg, rules, relations=()):
    """Raises a UserError for the first setting of cfg that its rule refuses, then for the first broken relation.

    The message names the setting and its value, says what is accepted and suggests a value that works (the
    default when it does, else the rule's example)."""
    for field in dataclasses.fields(cfg):
        if field.name not in rules:  # a programming error, not the user's: a traceback is right
            raise KeyError(f"{type(cfg).__name__}.{field.name} has no rule: add one to the RULES beside it")
        rule, value = rules[field.name], getattr(cfg, field.name)
        if not rule.holds(value):
            good = field.default if rule.holds(field.default) else rule.example
            raise UserError(f"--{field.name}={value}: {rule.accepts}, e.g. --{field.name}={good}")
    for relation in relations:
        if not relation.holds(cfg):
            raise UserError(relation.error(cfg))


# --- --help, read from the script's own text ---


def answer_help(path, argv=None):
    """Prints the help of the script at `path` and exits 0 if argv (default sys.argv[1:]) asks for it. A script whose
    imports are heavy calls this above them, `if __name__ == "__main__": answer_help(__file__)`: the help is read
    from the file's text, so nothing the script imports is loaded."""
    if any(a in HELP for a in (sys.argv[1:] if argv is None else argv)):
        show_help(script_help(path))


def show_help(text):
    """Prints the help and exits 0, also when its reader stops early (--help | head)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's own flush is quiet
    sys.exit(0)


def script_help(path, config=None):
    """The --help of the script at `path`: its docstring's opening paragraph, then every field of its config class
    (`config`, else the class it passes to run_cli) with its type, default, trailing comment and what its RULES entry
    accepts, grouped under the class's own comment lines. Nothing of the script is imported or run."""
    source = Source(path)
    config = config or source.config_name()
    cls = next((n for n in source.tree.body if isinstance(n, ast.ClassDef) and n.name == config), None)
    if cls is None:
        raise LookupError(f"{path} defines no class {config}")  # a programming error: a traceback is right
    rules, fields, (trailing, headings) = source.rules(), source.fields(cls), source.comments(cls)
    entries = []  # a heading (str), or a field's (name, type, default, meaning, what it accepts)
    for row in range(cls.lineno + 1, cls.end_lineno + 1):
        if row in headings:
            entries.append(headings[row])
        field = fields.get(row)
        if field is not None:
            name = field.target.id
            entries.append((name, ast.unparse(field.annotation), source.default(field.value),
                            trailing.get(field.end_lineno, ""), rules.get(name, "")))
    shown = os.path.relpath(path)
    lines = [f"usage: python {path if shown.startswith('..') else shown} [--name=value | --name value | --flag | "
             f"--no-flag] ...", "", source.purpose(), "",
             "settings (- and _ alike in names; a bool also as a bare --name, true, or --no-name, false):"]
    width = max(60, min(shutil.get_terminal_size().columns, 120))
    column = min(max(len(f"  --{e[0]} {e[1].upper()}") for e in entries if isinstance(e, tuple)), 28) + 2
    wrap = lambda text: textwrap.wrap(text, width - column, break_long_words=False, break_on_hyphens=False)
    for entry in entries:
        if isinstance(entry, str):
            lines += ["", entry]
            continue
        name, kind, default, meaning, accepts = entry
        head = f"  --{name} {kind.upper()}"
        text = wrap(meaning)
        tail = f"(default: {default}{f'; {accepts}' if accepts else ''})"  # kept whole unless it fills a line
        if text and len(text[-1]) + 1 + len(tail) <= width - column:
            text[-1] += f" {tail}"
        else:
            text += wrap(tail)
        if len(head) + 2 > column:
            lines.append(head)
        else:
            lines.append(head.ljust(column) + text.pop(0))
        lines += [" " * column + line for line in text]
    return "\n".join(lines)


class Source:
    """A script's text as --help reads it: its syntax tree, its comments, and the values of its literal constants."""

    def __init__(self, path):
        self.path = path
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.tree, self.lines = ast.parse(text), text.split("\n")
        self.constants, self.imported = {}, {}  # name -> its expression; name -> (module, its name there)
        self.modules = {}  # name -> the module an `import` binds to it
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                self.imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
            elif isinstance(node, ast.Import):
                self.modules.update({a.asname or a.name: a.name for a in node.names})
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.constants[node.targets[0].id] = node.value

    def comments(self, node):
        """The comments of the statement `node` (a class), their texts without the #: ({row: a trailing comment},
        {row: a comment on a row of its own}). Only its rows are tokenized: the whole of gpt2.py would take longer."""
        trailing, own = {}, {}
        rows = iter(line + "\n" for line in self.lines[node.lineno - 1:node.end_lineno])
        for token in tokenize.generate_tokens(lambda: next(rows, "")):
            if token.type == tokenize.COMMENT:
                alone = not token.line[:token.start[1]].strip()
                (own if alone else trailing)[node.lineno - 1 + token.start[0]] = token.string.lstrip("#").strip()
        return trailing, own

    def config_name(self):
        """The class of the settings the script passes to run_cli: run_cli(main, Config(), ...)."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "run_cli":
                return node.args[1].func.id
        raise LookupError(f"{self.path} calls no run_cli(main, Config(), argv)")

    def purpose(self):
        return (ast.get_docstring(self.tree) or "").strip().split("\n\n")[0]

    def fields(self, cls):
        return {n.lineno: n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}

    def value(self, node):
        """The value of an expression of literals, arithmetic and the module's constants (those it imports from a
        script beside it too); ValueError for anything else, which is never run."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self.value(e) for e in node.elts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -self.value(node.operand) if isinstance(node.op, ast.USub) else self.value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            return ARITHMETIC[type(node.op)](self.value(node.left), self.value(node.right))
        if isinstance(node, ast.Name):
            return self.constant(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Name) and node.value.value.id in self.modules:  # gpt2.Config.seed
            source = self.beside(self.modules[node.value.value.id])
            cls = next((n for n in source.tree.body if isinstance(n, ast.ClassDef) and n.name == node.value.attr), None)
            field = next((f for f in source.fields(cls).values() if f.target.id == node.attr), None) if cls else None
            if field is not None and field.value is not None:
                return source.value(field.value)
        raise ValueError(f"{ast.unparse(node)} is not a literal")

    def beside(self, module):
        """The Source of a script this one imports: beside it, or on sys.path."""
        for folder in [os.path.dirname(os.path.abspath(self.path)), *sys.path]:
            if os.path.isfile(os.path.join(folder or ".", f"{module}.py")):
                return Source(os.path.join(folder or ".", f"{module}.py"))
        raise ValueError(f"{module}.py is not beside {self.path}")

    def constant(self, name):
        if name in self.constants:
            return self.value(self.constants[name])
        if name in self.imported:
            module, original = self.imported[name]
            return self.beside(module).constant(original)
        raise ValueError(f"{name} is not a constant of {self.path}")

    def default(self, node):
        """A default as it is typed on the command line: a number as the source writes it, a text quoted when it is
        empty or holds spaces."""
        value = self.value(node)
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return json.dumps(value) if not value or value != value.strip() or " " in value else value
        if isinstance(node, ast.Constant) and node.lineno == node.end_lineno:  # as written: 6e-4, 10_485_760
            return self.lines[node.lineno - 1].encode()[node.col_offset:node.end_col_offset].decode()
        return str(value)

    def rules(self):
        """{name: what its rule accepts} from the module's RULES dict; each rule is made by calling this module's own
        builder (at_least, one_of, ...) on literal arguments, or read from a Rule(...)'s `accepts` text."""
        found = next((n.value for n in self.tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                      and [getattr(t, "id", "") for t in n.targets] == ["RULES"]), None)
        if found is None:
            return {}
        builders = {"at_least": at_least, "above": above, "between": between, "one_of": one_of}
        rules = {}
        for key, node in zip(found.keys, found.values, strict=True):
            called = getattr(node, "func", node)
            name = getattr(called, "id", getattr(called, "attr", ""))
            if name in ("ANY", "NOT_EMPTY"):
                rule = {"ANY": ANY, "NOT_EMPTY": NOT_EMPTY}[name]
            elif name in builders:
                rule = builders[name](*(self.value(a) for a in node.args))
            elif name == "Rule":
                accepts = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords if k.arg == "accepts")
                brief = next((k.value for k in node.keywords if k.arg == "brief"), ast.Constant(""))
                rule = Rule(None, self.value(accepts), brief=self.value(brief))
            else:
                raise ValueError(f"{self.path}: RULES[{ast.unparse(key)}] is {ast.unparse(node)}, which --help cannot read")
            rules[self.value(key)] = rule_brief(rule)
        return rules


def run_cli(main, cfg, argv):
    """Runs main(cfg, overridden_names) after applying argv; -h/--help prints the script's help instead, exit 0; a
    UserError ends it as one line, exit 1."""
    if any(a in HELP for a in argv):
        show_help(script_help(sys.modules[type(cfg).__module__].__file__, type(cfg).__name__))
    try:
        overridden = apply_overrides(cfg, argv)
        main(cfg, overridden)
    except UserError as e:
        if getattr(cfg, "debug", False):
            raise
        # one write with its newline: ranks that stop together (torchrun) then never splice their lines together
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(1)


# --- progress of a long loop ---


class Progress:
    """Where a long loop stands, for its one-line reports: units done of the total, the percent, the wall time elapsed
    and an ETA from the times of the latest units.

        progress = Progress(cfg.max_steps, done=start_step, skip=1)  # a resumed run counts from where it is
        progress.update(step + 1, seconds=dt)  # after each step: its own time, evaluations left out
        print(f"step {progress.count()} | ... | {progress.times()}")
        # step  1200/19073 (6.3%) | ... | elapsed 1:02:03 | eta 16:20:00

    The ETA is the units left times the median time per unit over the latest `window` updates that count. The median,
    not the mean: one slow step among twenty (a checkpoint written, a data stall, a recompile) would move a mean, and
    the ETA, by a twentieth of its length, and the median not at all; a real change of speed shows once it holds for
    half the window. What does not count: the first `skip` updates that complete units (compilation, warm-up), and
    update(..., timed=False) (units found done already); a caller that times its own units passes `seconds`, which
    leaves out whatever else it did (an evaluation). An update that completes no unit carries its time to the next
    that does. total=None (fineweb.py when a source's row count is unknown): a count without percent or ETA.
    """

    def __init__(self, total, done=0, skip=1, window=20, clock=time.monotonic):
        self.total, self.done, self.skip, self.clock = total, done, skip, clock
        self.start = self.last = clock()  # `last`: the previous update, where the time of the next units starts
        self.recent = deque(maxlen=window)  # seconds per unit of the latest updates that count
        self.carried = 0.0  # seconds of updates that completed no unit

    def update(self, done, seconds=None, timed=True):
        """`done` units are complete now. `seconds`: how long the units since the previous update took (default: the
        clock since then). timed=False: they were done already and take no time; neither they nor the time since the
        previous update go into the rate."""
        now = self.clock()
        if seconds is None:
            seconds = now - self.last
        self.last = now
        units, self.done = done - self.done, done
        if not timed:
            self.carried = 0.0
        elif units <= 0:
            self.carried += seconds
        elif self.skip > 0:
            self.skip -= 1
            self.carried = 0.0
        else:
            self.recent.append((self.carried + seconds) / units)
            self.carried = 0.0

    def eta(self):
        """Seconds left, or None while no rate is known (or no total)."""
        if self.total is None:
            return None
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        if not self.recent:
            return None
        ranked = sorted(self.recent)
        return left * (ranked[len(ranked) // 2] + ranked[~(len(ranked) // 2)]) / 2  # the median: the middle one or two

    def count(self):
        """ 1200/19073 (6.3%): done padded to the total's width, so that the lines stay aligned; 100.0% only once all
        are done (99.96% of them shows 99.9%)."""
        if self.total is None:
            return str(self.done)
        percent = round(100 * self.done / self.total, 1) if self.total > 0 else 100.0
        if self.done < self.total:
            percent = min(percent, 99.9)
        return f"{self.done:{len(str(self.total))}d}/{self.total} ({percent:.1f}%)"

    def times(self):
        """elapsed 1:02:03 | eta 16:20:00 (eta ? until a rate is known)."""
        eta = self.eta()
        return f"elapsed {hms(self.clock() - self.start)} | eta {'?' if eta is None else hms(eta)}"


def hms(seconds):
    """A duration as h:mm:ss, or with days as 2d 03:04:05."""
    days, rest = divmod(round(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}d {h:02d}:{m:02d}:{s:02d}" if days else f"{h}:{m:02d}:{s:02d}"


def expand_aliases(argv):
    """-m NAME is --model=NAME, the short form hellaswag.py and evaluate.py accept; everything else is --name=value."""
    out = []
    args = iter(argv)
    for arg in args:
        if arg == "-m":
            arg = f"--model={next(args, '')}"
        out.append(arg)
    return out
