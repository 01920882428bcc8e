"""The progress line of a local run on a terminal.

    records read 1,204 · images explained 1,150 · 38.2 images/s · ETA 0:02:10

Shown on stderr, rewritten in place (carriage return) every
`REFRESH_SECONDS`, only when stderr is a terminal and the runner runs in
this machine's processes (FnApiRunner / DirectRunner / Prism); nothing on a
pipe or a file. The numbers are the workers' tallies
(`transforms.progress_tally`). The ETA comes from the bytes read so far out of
the shards' total size (known up front from the file listing, so no record
count is needed): the reader and the model run fused in one stage locally,
so the fraction of bytes read is the fraction of the work done. Clusters
report the same numbers as Beam counters (namespace gradcam_audit):
records_read, images_explained, shard_bytes_read.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import threading
import time
from typing import Iterator, Optional

from transforms.progress_tally import PROGRESS_ENV, read_tallies

REFRESH_SECONDS = 0.5
LOCAL_RUNNERS = ("direct", "fnapi", "prism")


def is_local_runner(beam_args: list[str]) -> bool:
    from pipeline.options import DEFAULT_RUNNER
    from pipeline.runners import runner_of

    name = (runner_of(beam_args) or DEFAULT_RUNNER).lower()
    return any(local in name for local in LOCAL_RUNNERS)


def progress_line(counts: dict, elapsed: float, total_bytes: Optional[int]) -> str:
    """The text of the line: records read, images explained, images/s and, once estimable, the ETA."""
    read = counts.get("records_read", 0)
    explained = counts.get("images_explained", 0)
    parts = [f"records read {read:,}", f"images explained {explained:,}"]
    parts.append(f"{explained / elapsed:.1f} images/s" if elapsed > 0 else "- images/s")
    done = counts.get("bytes_read", 0)
    if total_bytes and done and elapsed > 1:
        fraction = min(1.0, done / total_bytes)
        left = elapsed * (1 - fraction) / fraction
        parts.append(f"ETA {datetime.timedelta(seconds=round(left))}")
    return " · ".join(parts)


def total_size(files: list[str]) -> Optional[int]:
    from apache_beam.io.filesystems import FileSystems

    try:
        return sum(m.size_in_bytes for r in FileSystems.match(files) for m in r.metadata_list)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def show_progress(beam_args: list[str], files: list[str], stream=None) -> Iterator[None]:
    """Prints the progress line on `stream` (default: the real stderr) while the block runs.

    Does nothing unless `stream` is a terminal and the runner is local.
    """
    from pipeline.console import terminal

    stream = stream or terminal()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty or not is_local_runner(beam_args) or os.environ.get(PROGRESS_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="gradcam-progress-")
    os.environ[PROGRESS_ENV] = folder
    total = total_size(files)
    started = time.monotonic()
    stop = threading.Event()

    def draw(end: str = "") -> None:
        line = progress_line(read_tallies(folder), time.monotonic() - started, total)
        stream.write(f"\r{line}\x1b[K{end}")
        stream.flush()

    def loop() -> None:
        while not stop.wait(REFRESH_SECONDS):
            draw()

    drawer = threading.Thread(target=loop, daemon=True, name="progress-line")
    draw()
    drawer.start()
    try:
        yield
    finally:
        stop.set()
        drawer.join(timeout=2)
        draw("\n")
        del os.environ[PROGRESS_ENV]
        shutil.rmtree(folder, ignore_errors=True)
