"""
The command line every script shares: `--name=value` settings over a config dataclass, and one-line errors.

Each script (gpt2.py, hellaswag.py, fineweb.py, demo.py, bench/) keeps its settings in a dataclass at its top and
ends with `run_cli(main, Config(), sys.argv[1:])`. A mistake the user can fix is raised as a UserError anywhere in
the run and printed as one line, `error: ...`, with exit status 1 (a traceback only with --debug=1). This module
imports nothing heavy, so fineweb.py's worker processes and a script's --help never pay for torch.

What each setting accepts is declared once, beside its Config: RULES maps every field to a Rule (at_least(1),
one_of("cpu", "cuda"), ...), RELATIONS lists what must hold between fields, and check_settings(cfg, RULES,
RELATIONS) checks them all before the script does any work. A field without a rule is a test failure.
"""

import dataclasses
import sys
from collections.abc import Callable
from types import UnionType
from typing import Any, NamedTuple, get_args


class UserError(ValueError):
    """A mistake the user can fix. The command line shows its message as one line, no traceback."""


def apply_overrides(cfg, argv):
    """Sets fields of the dataclass `cfg` from --name=value arguments; returns the names set.

    Values are parsed as literals of the field's type (never evaluated as code); bools take
    0/1/true/false.
    """
    fields = [f.name for f in dataclasses.fields(cfg)]
    accepted = ", ".join(fields)
    overridden = set()
    for arg in argv:
        name, sep, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise UserError(f"bad argument {arg!r}: write --name=value, with name one of: {accepted}")
        if name not in fields:
            raise UserError(f"unknown setting {name!r}: accepted settings are {accepted}")
        declared = next(f.type for f in dataclasses.fields(cfg) if f.name == name)
        kind = declared if isinstance(declared, UnionType) else type(getattr(cfg, name))  # int | str: a number or a word
        setattr(cfg, name, parse_value(name, text, kind))
        overridden.add(name)
    return overridden


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
    good value to suggest when the default is not one; `bad` are values it refuses (the tests try each)."""

    holds: Callable[[Any], bool]
    accepts: str
    example: Any = None
    bad: tuple = ()


def at_least(low):
    return Rule(lambda v: v >= low, f"must be at least {low}", low, tuple(sorted({low - 1, -1})))  # zero and negative


def above(low):
    return Rule(lambda v: v > low, f"must be > {low}", None, (low, low - 1))


def between(low, high, example):
    """low <= value < high."""
    return Rule(lambda v: low <= v < high, f"must be at least {low} and below {high}", example, (low - 1, high))


def one_of(*words):
    accepted = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    return Rule(lambda v: v in words, f"expected {accepted}", words[0], ("nonsense",))


ANY = Rule(lambda v: True, "anything")  # a path, a name or a text that only its use can check
NOT_EMPTY = Rule(lambda v: v != "", "must not be empty", None, ("",))


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


def run_cli(main, cfg, argv):
    """Runs main(cfg, overridden_names) after applying argv; a UserError ends it as one line, exit 1."""
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


def expand_aliases(argv):
    """-m NAME is --model=NAME, the short form hellaswag.py and evaluate.py accept; everything else is --name=value."""
    out = []
    args = iter(argv)
    for arg in args:
        if arg == "-m":
            arg = f"--model={next(args, '')}"
        out.append(arg)
    return out
