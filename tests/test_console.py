"""Quiet start-up and the progress line (pipeline/console.py, pipeline/progress_line.py)."""

import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.console import is_noise
from pipeline.progress_line import is_local_runner, progress_line
from tests.helpers import good_examples, write_shard
from transforms import progress_tally as progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1795830954.650525    9975 cudart_stub.cc:31] Could not find cuda drivers on your machine",
    b"E0000 00:00:1795830965.353020    9975 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    b"W0000 00:00:1795830965.353020    9975 some.cc:1] a warning",
    b"I1128 01:02:03.456789  123 grpc.cc:99] grpc chatter",
]
PROGRESS = re.compile(r"records read [\d,]+ · images explained [\d,]+ · [\d.]+ images/s")


def child_env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    return env


@pytest.mark.parametrize("line", NOISE)
def test_noise_lines_are_recognised(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", [b"INFO pipeline.graph: Target layer: x", b"Traceback (most recent call last):",
                                  b"F0000 00:00:1.0 1 x.cc:1] fatal", b"error: --input: expected ..."])
def test_other_lines_are_kept(line):
    assert not is_noise(line)


def test_stderr_filter_drops_noise_of_this_process_and_its_children(tmp_path):
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from pipeline.console import quiet_console
        noise = {NOISE!r}
        with quiet_console(verbose=False):
            for line in noise:
                os.write(2, line + b"\\n")
            os.write(2, b"kept by the parent\\n")
            subprocess.run([sys.executable, "-c", "import os; os.write(2, {NOISE[2]!r} + b'\\\\nkept by the child\\\\n')"])
            print("stdout line", flush=True)
        os.write(2, b"after the block\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=child_env(), timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [b"kept by the parent", b"kept by the child", b"after the block"]
    assert done.stdout == b"stdout line\n"


def test_progress_line_text():
    line = progress_line({"records_read": 1204, "images_explained": 1150, "bytes_read": 250}, 30.0, 1000)
    assert line == "records read 1,204 · images explained 1,150 · 38.3 images/s · ETA 0:01:30"
    assert "ETA" not in progress_line({"records_read": 3}, 30.0, None)


def test_local_runners_only():
    assert is_local_runner([]) and is_local_runner(["--runner=DirectRunner"])
    assert not is_local_runner(["--runner=PortableRunner"]) and not is_local_runner(["--runner=DataflowRunner"])


def test_worker_tallies_add_up_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, str(tmp_path))
    progress.tally(records_read=2, bytes_read=100)
    progress.flush()
    (tmp_path / "other.json").write_text('{"records_read": 3, "images_explained": 1}')
    assert progress.read_tallies(str(tmp_path)) == {"records_read": 5, "bytes_read": 100, "images_explained": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path):
    folder = tmp_path_factory.mktemp("tiny")
    write_shard(str(folder), "t.tfrecord", good_examples(6, "t"))
    return ["-m", "pipeline", "--input", str(folder / "t.tfrecord"), "--model", model_path,
            "--batch_size", "4", "--no_report"]


def test_terminal_shows_the_progress_line(tiny, tmp_path, plain_run):  # plain_run: starts at once
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, *tiny, "--output", str(tmp_path)], stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env=child_env(), cwd=str(tmp_path))
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=60) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert PROGRESS.search(text), text
    assert "\rrecords read 6 · images explained 6 · " in text  # the last state, rewritten in place
    assert "cuInit" not in text and "I0000" not in text


@pytest.fixture(scope="module")
def plain_run(tiny, tmp_path_factory):
    """The command with its output piped, started in the background (a thread waits for it).

    Most of a run is its start-up on one core: test_terminal_shows_the_progress_line (first in this file)
    requests this fixture so that both commands start at once; the test of this run waits for it.
    """
    folder = tmp_path_factory.mktemp("plain")
    box = {}

    def target():
        box["done"] = subprocess.run([sys.executable, *tiny, "--output", str(folder)], capture_output=True,
                                     text=True, env=child_env(), timeout=300, cwd=str(folder))

    thread = threading.Thread(target=target, name="plain-run", daemon=True)
    thread.start()

    def result():
        thread.join(timeout=330)
        assert not thread.is_alive() and "done" in box, "the piped run did not finish (or raised)"
        return box["done"]

    return result


def test_plain_output_has_no_noise_and_no_progress(plain_run):
    done = plain_run()
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "Explained 6 of 6 records" in done.stdout
    # The job line passes the quiet mode, which silences Beam's own INFO logging.
    assert "INFO pipeline.graph: FnApiRunner: the job runs in this process (no job id)" in done.stderr
    for marker in ("cuInit", "E0000", "I0000", "W0000", "absl::InitializeLog"):
        assert marker not in text, text
    assert not PROGRESS.search(text) and "\r" not in text
