"""A real local Flink session cluster for tests (loopback only).

Wraps scripts/flink/{install,start_cluster,start_taskmanager,stop_cluster}.sh:

    from tests.infra.flink_cluster import flink_cluster

    with flink_cluster(tmp_path / "flink") as cluster:
        options = PipelineOptions(cluster.pipeline_args(parallelism=1))
        with beam.Pipeline(options=options) as p:
            ...

The cluster is one JobManager JVM, one TaskManager JVM (more with
`cluster.start_taskmanager()`), the Beam Flink job server JVM and a Beam
Python SDK worker pool (EXTERNAL environment), all bound to 127.0.0.1 on
free ports picked here. Everything is stopped by recorded PID when the
`with` block ends, also on errors.

The worker pool (and so every SDK harness) inherits this process's
environment (pass more with `extra_env`, e.g. STORAGE_EMULATOR_HOST) and has
the repo root prepended to PYTHONPATH, so functions pickled by reference
(Beam 2.62's default pickler is dill) import on the workers as they do here.

Needs `scripts/flink/install.sh` to have run (`ensure_installed()` runs it).
The job server is Beam FLINK_BEAM_VERSION (2.62.0) on Flink 1.19: the
submitting Python and the worker pool's Python should have the same
apache-beam version (see `beam_version()`).

No pytest import here; standard library only at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO_ROOT / "scripts" / "flink"

# Keep in step with scripts/flink/env.sh.
FLINK_BEAM_VERSION = os.environ.get("FLINK_BEAM_VERSION", "2.62.0")
FLINK_MINOR = os.environ.get("FLINK_MINOR", "1.19")
FLINK_VERSION = os.environ.get("FLINK_VERSION", "1.19.3")
LOOPBACK = "127.0.0.1"


def default_install_dir() -> Path:
    return Path(os.environ.get("FLINK_CLUSTER_DIR", REPO_ROOT / ".cluster"))


def job_server_jar(install_dir: Path | None = None) -> Path:
    install_dir = Path(install_dir or default_install_dir())
    return install_dir / "jars" / f"beam-runners-flink-{FLINK_MINOR}-job-server-{FLINK_BEAM_VERSION}.jar"


def is_installed(install_dir: Path | None = None) -> bool:
    install_dir = Path(install_dir or default_install_dir())
    return (
        job_server_jar(install_dir).is_file()
        and (install_dir / f"flink-{FLINK_VERSION}" / "lib" / f"flink-dist-{FLINK_VERSION}.jar").is_file()
        and (install_dir / "lib" / "libloopback_bind.so").is_file()
    )


def ensure_installed(install_dir: Path | None = None, timeout: float = 1800) -> Path:
    """Runs scripts/flink/install.sh unless everything is already there."""
    install_dir = Path(install_dir or default_install_dir())
    if not is_installed(install_dir):
        env = dict(os.environ, FLINK_CLUSTER_DIR=str(install_dir))
        subprocess.run(["bash", str(SCRIPTS_DIR / "install.sh")], env=env, check=True, timeout=timeout)
    return install_dir


def beam_version(python: str) -> str | None:
    """apache-beam version importable by `python` (None if not importable)."""
    try:
        out = subprocess.run(
            [python, "-c", "import apache_beam; print(apache_beam.__version__)"],
            capture_output=True, text=True, timeout=120, check=True,
        )
        return out.stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class FlinkCluster:
    """One running (or startable) cluster; see `flink_cluster()`."""

    workdir: Path
    install_dir: Path = field(default_factory=default_install_dir)
    beam_python: str = ""
    rest_port: int = 0
    rpc_port: int = 0
    job_port: int = 0
    artifact_port: int = 0
    worker_pool_port: int = 0
    taskmanager_slots: int = 2
    start_timeout: float = 180.0
    extra_env: dict = field(default_factory=dict)
    # name -> (pid, kernel start time) of every process this object saw recorded
    _seen: dict = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.install_dir = Path(self.install_dir).resolve()
        if not self.beam_python:
            venv_python = REPO_ROOT / ".venv" / "bin" / "python"
            self.beam_python = os.environ.get("BEAM_PYTHON") or (
                str(venv_python) if venv_python.exists() else "python3")
        for name in ("rest_port", "rpc_port", "job_port", "artifact_port", "worker_pool_port"):
            if not getattr(self, name):
                setattr(self, name, free_port())

    # --- paths and endpoints --------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.rest_port}"

    @property
    def job_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.job_port}"

    @property
    def worker_pool_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.worker_pool_port}"

    @property
    def job_server_jar(self) -> Path:
        return job_server_jar(self.install_dir)

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            FLINK_CLUSTER_DIR=str(self.install_dir),
            FLINK_RUNTIME_DIR=str(self.workdir),
            FLINK_REST_PORT=str(self.rest_port),
            FLINK_RPC_PORT=str(self.rpc_port),
            BEAM_JOB_PORT=str(self.job_port),
            BEAM_ARTIFACT_PORT=str(self.artifact_port),
            BEAM_EXPANSION_PORT="-1",
            BEAM_WORKER_POOL_PORT=str(self.worker_pool_port),
            BEAM_PYTHON=self.beam_python,
            FLINK_TM_SLOTS=str(self.taskmanager_slots),
            FLINK_START_TIMEOUT=str(int(self.start_timeout)),
        )
        env.update({k: str(v) for k, v in self.extra_env.items()})
        return env

    # --- submitting -------------------------------------------------------
    def pipeline_args(self, parallelism: int = 1, mode: str = "portable", extra=()) -> list[str]:
        """Beam pipeline args that submit to this cluster.

        mode="portable" (default): PortableRunner -> the cluster's job server.
        mode="uber_jar": FlinkRunner builds a jar with the pipeline and posts
            it to Flink's REST API itself (no job server involved).
        Both run the Python code in the cluster's EXTERNAL worker pool.
        """
        env_args = [
            "--environment_type=EXTERNAL",
            f"--environment_config={self.worker_pool_endpoint}",
            f"--parallelism={parallelism}",
        ]
        if mode == "portable":
            runner = ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}"]
        elif mode == "uber_jar":
            runner = [
                "--runner=FlinkRunner",
                f"--flink_master={LOOPBACK}:{self.rest_port}",
                f"--flink_version={FLINK_MINOR}",
                f"--flink_job_server_jar={self.job_server_jar}",
                "--flink_submit_uber_jar",
            ]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return runner + env_args + list(extra)

    # --- lifecycle ----------------------------------------------------------
    def _script(self, name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPTS_DIR / name), *args], env=self.env(), timeout=timeout,
            capture_output=True, text=True,
        )

    def _record_pids(self) -> None:
        for name, pid in self.pids().items():
            start = _proc_start_time(pid)
            if start is not None:
                self._seen.setdefault(name + ":" + str(pid), (pid, start))

    def start(self) -> "FlinkCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            res = self._script("start_cluster.sh", timeout=self.start_timeout * 5)
        finally:
            self._record_pids()
        if res.returncode != 0:
            raise RuntimeError(
                f"start_cluster.sh failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        return self

    def start_taskmanager(self) -> int:
        """Starts one more TaskManager, waits until it registers; returns its PID."""
        before = set(self.pids())
        try:
            res = self._script("start_taskmanager.sh", timeout=self.start_timeout + 60)
        finally:
            self._record_pids()
        if res.returncode != 0:
            raise RuntimeError(f"start_taskmanager.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        new = [n for n in self.pids() if n not in before and n.startswith("taskmanager-")]
        return self.pids()[new[0]] if new else -1

    def stop(self, timeout: float = 120) -> None:
        """stop_cluster.sh, then SIGKILL anything recorded that is still alive."""
        self._record_pids()
        try:
            self._script("stop_cluster.sh", timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        for pid, start in self._seen.values():
            if _alive(pid) and _proc_start_time(pid) == start:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """PIDs (and their process groups' members) still alive after stop()."""
        left = []
        for pid, start in self._seen.values():
            if _alive(pid) and _proc_start_time(pid) == start:
                left.append(pid)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, 0)  # a group member outlived its leader
                    left.append(-pid)
        return left

    # --- inspection -----------------------------------------------------
    def pids(self) -> dict[str, int]:
        """name -> PID from run/*.pid (live or not)."""
        out = {}
        for f in sorted(self.run_dir.glob("*.pid")):
            with contextlib.suppress(ValueError, OSError):
                out[f.stem] = int(f.read_text().strip())
        return out

    def taskmanager_pids(self, alive_only: bool = True) -> dict[str, int]:
        return {n: p for n, p in self.pids().items()
                if n.startswith("taskmanager-") and (not alive_only or _alive(p))}

    def kill_taskmanager(self, name: str | None = None, sig: int = signal.SIGKILL) -> int:
        """Kills one live TaskManager JVM (default: the newest) with `sig`."""
        tms = self.taskmanager_pids()
        if not tms:
            raise RuntimeError("no live TaskManager")
        name = name or sorted(tms, key=lambda n: int(n.rsplit("-", 1)[1]))[-1]
        os.kill(tms[name], sig)
        return tms[name]

    def rest(self, path: str) -> dict:
        with urllib.request.urlopen(self.rest_url + path, timeout=10) as resp:
            return json.loads(resp.read().decode())

    def overview(self) -> dict:
        return self.rest("/v1/overview")

    def jobs(self) -> list[dict]:
        return self.rest("/v1/jobs/overview").get("jobs", [])

    def new_job(self, known: set, states: set, timeout: float, poll: float = 0.2) -> dict | None:
        """The first job whose id is not in `known` and whose state is in `states`, polled every `poll` s;
        None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [j for j in self.jobs() if j["jid"] not in known and j["state"] in states]
            if found:
                return found[0]
            time.sleep(poll)
        return None

    def process_group_pids(self) -> set[int]:
        """Every live PID in the process groups of the recorded processes."""
        groups = set(self.pids().values())
        out = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ProcessLookupError):
                    if os.getpgid(int(entry.name)) in groups:
                        out.add(int(entry.name))
        return out

    def listening_sockets(self) -> list[tuple[str, int, int]]:
        """(local address, port, pid) of TCP listeners owned by the cluster's processes (uses `ss`)."""
        pids = self.process_group_pids()
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) < 6:
                continue
            addr, _, port = cols[3].rpartition(":")
            for pid in map(int, re.findall(r"pid=(\d+)", line)):
                if pid in pids:
                    found.append((addr, int(port), pid))
        return found

    def non_loopback_listeners(self) -> list[tuple[str, int, int]]:
        ok = {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}
        return [s for s in self.listening_sockets() if s[0] not in ok]


@contextlib.contextmanager
def flink_cluster(workdir, *, install_dir=None, beam_python=None, taskmanager_slots=2,
                  start_timeout=180.0, install=False, extra_env=None):
    """Starts a loopback-only Flink cluster under `workdir`; always stops it by PID.

    install=True runs scripts/flink/install.sh first if anything is missing.
    beam_python: the python of the SDK worker pool (default: BEAM_PYTHON,
    then <repo>/.venv/bin/python); it must have apache-beam and the project.
    """
    install_dir = Path(install_dir or default_install_dir())
    if install:
        ensure_installed(install_dir)
    elif not is_installed(install_dir):
        raise RuntimeError(f"Flink path not installed in {install_dir}: run scripts/flink/install.sh")
    cluster = FlinkCluster(
        workdir=Path(workdir), install_dir=install_dir, beam_python=beam_python or "",
        taskmanager_slots=taskmanager_slots, start_timeout=start_timeout, extra_env=dict(extra_env or {}),
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
