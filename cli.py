"""
The command line every script shares: `--name=value` settings over a config dataclass, and one-line errors.

Each script (gpt2.py, hellaswag.py, fineweb.py, demo.py, bench/) keeps its settings in a dataclass at its top and
ends with `run_cli(main, Config(), sys.argv[1:])`. A mistake the user can fix is raised as a UserError anywhere in
the run and printed as one line, `error: ...`, with exit status 1 (a traceback only with --debug=1). This module
imports nothing heavy, so fineweb.py's worker processes and a script's --help never pay for torch.
"""

import dataclasses
import sys


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
        setattr(cfg, name, parse_value(name, text, type(getattr(cfg, name))))
        overridden.add(name)
    return overridden


def parse_value(name, text, kind):
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


def run_cli(main, cfg, argv):
    """Runs main(cfg, overridden_names) after applying argv; a UserError ends it as one line, exit 1."""
    try:
        overridden = apply_overrides(cfg, argv)
        main(cfg, overridden)
    except UserError as e:
        if getattr(cfg, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
