"""Live progress of a local run: worker-side tallies the launcher sums and prints.

Beam's counters (namespace gradcam_audit) are the progress on a cluster:
Flink's web UI and Dataflow's job page show them while the job runs. A local
run (FnApiRunner) reports counters only when it ends, so for the terminal the
launcher sets `PROGRESS_ENV` to a fresh folder and every worker process
(in-process, threads or the multi-processing workers, which inherit the
environment) adds to its own small JSON file there, at most every
`FLUSH_SECONDS`; `pipeline.progress` sums the files. Without the variable
(clusters, tests, non-terminal runs) `tally` costs one dictionary lookup.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import uuid

PROGRESS_ENV = "GRADCAM_AUDIT_PROGRESS_DIR"
FLUSH_SECONDS = 0.5

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_last_flush = 0.0
_folder = None  # the folder `_counts` belongs to (a new run, a new folder: counts start again)
_name = f"{uuid.uuid4().hex[:8]}.json"


def tally(**counts: int) -> None:
    """Adds `counts` (e.g. records_read=1) to this process's tally when a progress folder is set."""
    folder = os.environ.get(PROGRESS_ENV)
    if not folder:
        return
    global _folder
    with _lock:
        if folder != _folder:
            _folder = folder
            _counts.clear()
        _counts.update(counts)
    if time.monotonic() - _last_flush >= FLUSH_SECONDS:
        flush()


def flush() -> None:
    """Writes this process's tally to `<progress folder>/<pid>-<random>.json` (atomically)."""
    global _last_flush
    folder = os.environ.get(PROGRESS_ENV)
    if not folder:
        return
    with _lock:
        if folder != _folder:
            return
        _last_flush = time.monotonic()
        snapshot = dict(_counts)
        path = os.path.join(folder, f"{os.getpid()}-{_name}")
        temp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(temp, "w") as handle:
                json.dump(snapshot, handle)
            os.replace(temp, path)
        except OSError:  # the launcher removed the folder: the run is over
            pass


def read_tallies(folder: str) -> collections.Counter:
    """The sum of every process's tally in `folder`."""
    total: collections.Counter = collections.Counter()
    try:
        names = os.listdir(folder)
    except OSError:
        return total
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as handle:
                total.update(json.load(handle))
        except (OSError, ValueError):
            continue
    return total
