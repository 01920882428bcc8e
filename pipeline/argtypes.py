"""Option types shared by every command line of the project.

Booleans: `add_boolean(parser, "--name", ...)` makes an option that takes the
bare flag (`--name`), an explicit value (`--name=true`, `--name=false`,
`--name false`; also 1/0, yes/no, on/off, any case), as Dataflow templates,
Airflow and other schedulers pass booleans. A bad value is argparse's usual
error ("argument --name: expected true or false, got 'maybe'"), which the
project's parsers print as one line with exit status 2. `negate=True` makes
the "off" spelling of an option (`--no_report`, `--no_report=false`).

`exit_status` checks an exit status given on the command line (0-255).
`add_settings_arguments` adds the options of a settings dataclass
(`transforms/settings.py`), with the number checks below.
`OneLineParser` is the project's argparse parser: a bad option is one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from transforms.settings import option_fields

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
BOOLEAN_METAVAR = "true|false"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr ("error: ... (see --help)"), exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no, on/off; any case) -> bool; argparse.ArgumentTypeError otherwise."""
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BooleanAction(argparse.Action):
    """`--name` alone sets True (False with negate); `--name=<bool>` sets the value (inverted with negate)."""

    def __init__(self, option_strings, dest, negate: bool = False, default=None, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=parse_bool,
                         required=required, help=help, metavar=BOOLEAN_METAVAR)
        self.negate = negate

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (not values) if self.negate else values)


def _number(kind, accept, expected: str):
    """An argparse type: `kind(text)` (int or float) that `accept` takes, else "expected <expected>"."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")  # NaN fails the comparison
share = _number(float, lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1")
count = _number(int, lambda v: v >= 0, "a whole number >= 0")
whole = _number(int, lambda v: True, "a whole number")
number = _number(float, lambda v: True, "a number")

# transforms.settings.option(kind=...) -> the argparse type that checks it
KIND_TYPES = {"share": share, "count": count, "positive": positive_int, "non_negative": non_negative_float,
              "number": number, "int": whole}


def add_settings_arguments(parser, cls, prefix: str = "") -> None:
    """One option per option field of the settings dataclass `cls` (`transforms.settings.option`):
    `--<prefix><field>` (or the field's own name), its default (or its `env` variable's value), help and
    check."""
    for name, field in option_fields(cls, prefix):
        meta = field.metadata
        default = os.environ.get(meta["env"], field.default) if meta.get("env") else field.default
        if meta["kind"] is None:
            add_boolean(parser, f"--{name}", default=default, help=meta["help"], dest=name)
            continue
        kwargs = {"type": meta.get("check") or KIND_TYPES.get(meta["kind"])}
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(f"--{name}", default=default, help=meta["help"],
                            **{k: v for k, v in kwargs.items() if v is not None})


def add_boolean(parser, name: str, *, default=False, help: Optional[str] = None,
                dest: Optional[str] = None, negate: bool = False) -> None:
    """Adds a boolean option (see the module docstring) to an argparse parser or group (or Beam's).

    `default` is a bool, or argparse.SUPPRESS for a second spelling of an option
    (`--no_report`) that leaves the default to the first one.
    """
    kwargs = {"dest": dest} if dest else {}
    parser.add_argument(name, action=BooleanAction, negate=negate, default=default, help=help, **kwargs)


def flag_value(argv: list, name: str, default: bool = False) -> bool:
    """The value of boolean option `name` in a raw argv, before parsing (the last one given wins).

    For the few settings needed before the parser runs (--verbose decides the
    console's set-up); a bad value reads as `default` here and is refused by
    the parser afterwards.
    """
    value = default
    for i, arg in enumerate(argv):
        if arg == name:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = True
            if following is not None and not following.startswith("-"):
                try:
                    value = parse_bool(following)
                except argparse.ArgumentTypeError:
                    value = default
        elif arg.startswith(name + "="):
            try:
                value = parse_bool(arg.split("=", 1)[1])
            except argparse.ArgumentTypeError:
                value = default
    return value


def exit_status(text: str) -> int:
    """An exit status given on the command line: a whole number 0-255."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"expected an exit status between 0 and 255, got {text!r}")
    return value
