"""What a run prints on the console: quiet start-up unless --verbose.

On a CPU machine TensorFlow's C++ side writes absl-format lines straight to
file descriptor 2 before any Python setting can stop them
(`I0000 ... cudart_stub.cc ... Could not find cuda drivers`,
`E0000 ... cuda_platform.cc ... failed call to cuInit`), and so do gRPC and
the SDK worker processes Beam starts. By default `quiet_console`:

* sets TF_CPP_MIN_LOG_LEVEL=3 (unless already set) before TensorFlow loads;
* points descriptor 2 at a pipe whose reader thread drops absl/glog-format
  INFO, WARNING and ERROR lines (`[IWE]MMDD hh:mm:ss.uuuuuu ...`) and absl's
  "All log messages before absl::InitializeLog()" notice, and passes every
  other line (Python logging, warnings, tracebacks, FATAL lines) through
  unchanged to the real stderr; child processes inherit the pipe;
* drops Beam's "Resource module is not available" warning.

`--verbose` keeps all of it (and Beam's INFO logging). `terminal()` is the
real stderr, for the progress line (`pipeline.progress_line`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from typing import Iterator, Optional

_NOISE = re.compile(
    rb"^(?:[IWE]\d{4} [\d:.]+\s+\d+ [^\]]*\] |"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR|"
    rb"To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags)"
)
_BEAM_NOISE = ("Resource module is not available for current platform",)

_terminal: Optional[io.TextIOBase] = None


def is_noise(line: bytes) -> bool:
    """Whether one stderr line is TensorFlow/absl/gRPC start-up noise."""
    return bool(_NOISE.match(line))


def terminal() -> io.TextIOBase:
    """The real stderr (not the filtering pipe) as a text stream."""
    return _terminal or sys.stderr


class _DropBeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in _BEAM_NOISE)


def _forward(read_fd: int, write_fd: int) -> None:
    pending = b""
    with open(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
            if kept:
                os.write(write_fd, kept)
    if pending and not is_noise(pending):
        os.write(write_fd, pending)
    os.close(write_fd)  # the thread's own copy of the real stderr


def wants_verbose(argv: list[str]) -> bool:
    """--verbose, --verbose=true (read before the parser runs: it decides the console's set-up)."""
    from pipeline.argtypes import flag_value

    return flag_value(argv, "--verbose")


@contextlib.contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """Sets up logging and, unless `verbose`, filters start-up noise from stderr for the block."""
    global _terminal
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    drop = _DropBeamNoise()
    for handler in logging.getLogger().handlers:
        handler.addFilter(drop)
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    _terminal = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True)
    reader = threading.Thread(target=_forward, args=(read_fd, os.dup(saved)), daemon=True, name="stderr-filter")
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer here closes; children that still hold it keep it open
        reader.join(timeout=2)
        os.close(saved)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(drop)
        _terminal.close()
        _terminal = None
