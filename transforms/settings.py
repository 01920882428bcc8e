"""Settings dataclasses that are also command-line options: each default is written once.

A field made with `option(default, help, ...)` is a setting of its dataclass
(`FlagThresholds`, `StrategySettings`, `CheckSettings`, `CompareThresholds`)
and an option of `python -m pipeline` (and of `python -m pipeline.compare`
for the comparison's thresholds): `pipeline.argtypes.add_settings_arguments`
adds one option per such field, with the field's default and help, and
`settings_from` builds the dataclass back from parsed options or from a run
manifest's "options". Adding an option to a settings group is one field.

`kind` names the value check: "share" (0..1), "count" (whole >= 0),
"positive" (whole >= 1), "non_negative" (number >= 0), "number" (any
float), "int" (any whole number), "text" (a string, or one of `choices`),
or None for a bool (a true|false option). `check` (an argparse type: text ->
value, raising argparse.ArgumentTypeError) replaces the kind's check, and
`env` names an environment variable whose value, when set, is the default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

KINDS = ("share", "count", "positive", "non_negative", "number", "int", "text")


def option(default: Any, help: str, *, name: Optional[str] = None, kind: Optional[str] = None,
           check: Optional[Callable[[str], Any]] = None, choices: Optional[Sequence[str]] = None,
           env: Optional[str] = None):
    """A dataclass field that is also the option `--<prefix><field name>` (or `--<name>`)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind is None and not isinstance(default, bool):
        raise ValueError("an option without a kind is a bool: give a bool default")
    metadata = {"option": name, "help": help, "kind": kind, "check": check,
                "choices": list(choices) if choices is not None else None, "env": env}
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(cls, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(option name without dashes, field) for every option field of the settings dataclass `cls`."""
    for field in dataclasses.fields(cls):
        if "help" in field.metadata:
            yield field.metadata["option"] or prefix + field.name, field


def settings_from(cls, options: Mapping | Any, prefix: str = ""):
    """`cls` from option values: a mapping (a manifest's "options") or an object with them as attributes
    (an argparse namespace). An option missing or None (a run made before it existed) keeps its default."""
    get = options.get if isinstance(options, Mapping) else (lambda name: getattr(options, name, None))
    values = {field.name: get(name) for name, field in option_fields(cls, prefix)}
    return cls(**{key: value for key, value in values.items() if value is not None})


def settings_options(settings, prefix: str = "") -> dict:
    """The option values that give `settings` (the flat names a manifest's "options" holds)."""
    return {name: getattr(settings, field.name) for name, field in option_fields(type(settings), prefix)}
