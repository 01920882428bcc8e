"""`--custom_objects`: the user's Python file that defines a model's custom layers.

A model built from classes of the user's own (keras.io's Vision Transformer
example has `Patches` and `PatchEncoder` layers) loads only when Keras is
given those classes. The launcher reads the file once (local or any Beam
filesystem) and the job carries its *source* with the model's settings, so
every worker (DirectRunner processes, Flink task managers, Dataflow VMs) runs
the same code without the file being installed there. The file runs as a
module of its own in each process, once; every class and function it
defines is passed to Keras as a custom object under its own name (classes
decorated with `keras.saving.register_keras_serializable` also register
themselves). This runs the user's code, as importing it would: pass only
your own files. Keras safe mode stays on for what the model file holds.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import types
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

from transforms.errors import AuditError, one_line

# (file name, source text) pairs: plain strings, so they pickle with the job's settings.
CustomCode = tuple[tuple[str, str], ...]

_MODULES: dict[str, types.ModuleType] = {}
_LOCK = threading.Lock()


def read_custom_code(paths: Sequence[str] | str | None) -> CustomCode:
    """The source of each `.py` file (comma-separated when a string), run once here so that a file that
    cannot run fails at launch with one line (exit status 2), not in a worker."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    code: list[tuple[str, str]] = []
    for path in paths or ():
        if not path.endswith(".py"):
            raise AuditError(f"--custom_objects {path}: expected a Python file (.py) that defines the classes")
        try:
            with FileSystems.open(path) as handle:
                source = handle.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"--custom_objects {path}: cannot be read ({one_line(exc)})") from None
        code.append((path, source))
    custom_objects(tuple(code))  # runs each file now: its errors are the launch's
    return tuple(code)


def source_digest(source: str) -> str:
    """SHA-256 of a file's source: names its module here and the file in the run's manifest."""
    return hashlib.sha256(source.encode()).hexdigest()


def _module_name(path: str, source: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    safe = "".join(ch if ch.isalnum() else "_" for ch in stem)
    return f"gradcam_custom_{safe}_{source_digest(source)[:12]}"


def _run_module(path: str, source: str) -> types.ModuleType:
    """The file as a module (registered in sys.modules, so its classes can be found by their module),
    run once per process and source."""
    name = _module_name(path, source)
    with _LOCK:
        if name in _MODULES:
            return _MODULES[name]
        module = types.ModuleType(name)
        module.__file__ = path
        sys.modules[name] = module
        try:
            exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - the user's own file, by option
        except Exception as exc:  # noqa: BLE001 - whatever the user's file raises is one line at launch
            del sys.modules[name]
            raise AuditError(f"--custom_objects {path}: running it failed ({one_line(exc)})") from None
        _MODULES[name] = module
        return module


def custom_objects(code: CustomCode) -> dict[str, object]:
    """{name: class or function} defined by the files, for Keras' `custom_objects` (empty without files)."""
    found: dict[str, object] = {}
    for path, source in code:
        module = _run_module(path, source)
        for name, value in vars(module).items():
            if (isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == module.__name__
                    and not name.startswith("_")):
                found[name] = value
    return found
