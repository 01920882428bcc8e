"""Live progress of a local run: worker-side tallies the launcher sums and prints.

Beam's counters (namespace gradcam_audit) are the progress on a cluster:
Flink's web UI and Dataflow's job page show them while the job runs. A local
run (FnApiRunner) reports counters only when it ends, so for the terminal the
launcher sets `PROGRESS_ENV` to a fresh folder and every worker process
(in-process, threads or the multi-processing workers, which inherit the
environment) adds to its own small JSON file there, at most every
`FLUSH_SECONDS`; `pipeline.progress_line` sums the files. Without the variable
(clusters, tests, non-terminal runs) nothing is written; `tally` itself is a
Counter update either way (the environment is read at flushes only).
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
_counts: collections.Counter = collections.Counter()  # this run's totals (the progress folder's)
_pending: collections.Counter = collections.Counter()  # tallied since the last flush
_last_flush = 0.0
_folder = None  # the folder `_counts` belongs to (a new run, a new folder: counts start again)
_name = f"{uuid.uuid4().hex[:8]}.json"


def tally(**counts: int) -> None:
    """Adds `counts` (e.g. records_read=1) to this process's tally; they reach the progress folder (when
    one is set) at the next `flush`, at most `FLUSH_SECONDS` later. Per element this is a Counter
    update: the environment is read only when flushing."""
    with _lock:
        _pending.update(counts)
    if time.monotonic() - _last_flush >= FLUSH_SECONDS:
        flush()


def flush() -> None:
    """Writes this process's tally to `<progress folder>/<pid>-<random>.json` (atomically); without a
    progress folder the pending counts are dropped."""
    global _last_flush, _folder
    folder = os.environ.get(PROGRESS_ENV)
    with _lock:
        _last_flush = time.monotonic()
        pending = dict(_pending)
        _pending.clear()
        if not folder:
            return
        if folder != _folder:  # a new run, a new folder: its counts start at zero
            _folder = folder
            _counts.clear()
        _counts.update(pending)
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
