"""Run one computation in a fresh child process, so that a native crash there fails one test, not the run.

Why: TensorFlow's oneDNN kernels take CPU-specific paths. On AVX-512 CPUs (seen on an AMD EPYC and an
Intel Sapphire Rapids), an *eager* GradientTape through the `fer` package's trained Keras 2 model aborts
the process (SIGABRT or SIGSEGV in oneDNN's `jit_1x1:avx512_core` backward-weights convolution, the
filter gradient of a strided 1x1 convolution at batch 1). The same computation runs with oneDNN's
custom ops off (`TF_ENABLE_ONEDNN_OPTS=0`: TensorFlow's Eigen kernels) or with oneDNN capped at AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2`). The job never asks for a filter gradient (its compiled CAM function
differentiates the target layer's output only; `tests/test_cam_methods.py::
test_the_compiled_cam_function_computes_no_filter_gradient`), so only the tests' eager references meet it.

`in_child(func, *args, env=REFERENCE_ENV)` runs `func(*args)` in a spawned process whose environment
is set before TensorFlow loads there, and returns its result; a child that dies raises `ChildCrashed`
naming the signal, which fails the calling test alone. The whole suite is also run with pytest-xdist
(`-n 1` in pyproject.toml): a test that crashes its worker in-process is reported as failed and a new
worker runs the rest.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from typing import Any, Callable, Optional

# Where an eager reference cannot abort: oneDNN's custom ops off (Eigen kernels on every CPU).
REFERENCE_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


class ChildCrashed(AssertionError):
    """The child process died (a native crash or a kill) before it returned."""


class ChildFailed(AssertionError):
    """The child process raised: the message carries its traceback."""


@contextlib.contextmanager
def _environment(env: dict):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(connection, func, args) -> None:
    try:
        connection.send((True, func(*args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises it
        connection.send((False, traceback.format_exc()))
    finally:
        connection.close()


def _describe(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def in_child(func: Callable[..., Any], *args, env: Optional[dict] = None, timeout: float = 600.0) -> Any:
    """func(*args) in a spawned child process with `env` (default `REFERENCE_ENV`) added to its environment.

    `func` must be importable by name (a module-level function) and its arguments and result picklable.

    Raises:
      ChildCrashed: the child died (e.g. "died with signal SIGABRT") or did not answer within `timeout` s.
      ChildFailed: `func` raised; the message holds the child's traceback.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run, args=(sender, func, args), daemon=True)
    with _environment(REFERENCE_ENV if env is None else env):
        process.start()
    sender.close()
    name = getattr(func, "__qualname__", repr(func))
    try:
        if not receiver.poll(timeout):
            process.kill()
            process.join()
            raise ChildCrashed(f"{name} gave no answer within {timeout:.0f} s in its child process")
        ok, value = receiver.recv()
    except EOFError:
        process.join()
        raise ChildCrashed(f"{name} died in its child process with {_describe(process.exitcode)}") from None
    finally:
        receiver.close()
    process.join()
    if not ok:
        raise ChildFailed(f"{name} raised in its child process:\n{value}")
    return value
