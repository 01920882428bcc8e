"""gs:// without the cloud: gcp-storage-emulator as a subprocess on 127.0.0.1.

    with GcsEmulator(bucket="audit", log_dir=tmp) as gcs:   # started, env set, Beam pre-seeded
        gcs.upload_file("model.keras", "gs://audit/models/model.keras")
        ... run the pipeline with gs:// paths ...
    # stopped by PID, env and Beam's credential cache restored

* The emulator: `gcp-storage-emulator start --host=127.0.0.1 --port=<free>
  --in-memory --default-bucket=<bucket>` (the venv's console script).
* STORAGE_EMULATOR_HOST=http://127.0.0.1:<port>: google-cloud-storage's
  anonymous client (which Beam's gcsio falls back to) talks to it.
* Beam first retries `google.auth.default()` for ~25 s per process before
  going anonymous. In this process `preseed_beam_credentials()` fills Beam's
  credential cache with "none"; other processes (workers, a CLI run) get the
  same from `tests/infra/gcs_site/sitecustomize.py` via `subprocess_env()`.
* TensorFlow's own gs:// (tf.io.gfile) ignores the emulator: the project reads
  models and shards through Beam's FileSystems, which does not.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
from typing import Optional

from tests.infra.servers import LOOPBACK, Server, free_port

SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_site")


def emulator_executable() -> str:
    """The venv's gcp-storage-emulator script (beside this python), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    found = beside if os.path.exists(beside) else shutil.which("gcp-storage-emulator")
    if not found:
        raise RuntimeError("gcp-storage-emulator not installed (pip install -e '.[test]')")
    return found


@contextlib.contextmanager
def preseed_beam_credentials():
    """Makes Beam's gcsio use an anonymous client at once in this process (restored on exit)."""
    from apache_beam.internal.gcp import auth

    saved = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    try:
        yield
    finally:
        with auth._Credentials._credentials_lock:
            auth._Credentials._credentials_init, auth._Credentials._credentials = saved


class GcsEmulator:
    """One in-memory emulator with one bucket; a context manager (start/stop by PID)."""

    def __init__(self, bucket: str, log_dir: str, port: Optional[int] = None):
        self.bucket = bucket
        self.port = port or free_port()
        self.host = f"http://{LOOPBACK}:{self.port}"
        self.server = Server(
            "gcp-storage-emulator",
            [emulator_executable(), "start", f"--host={LOOPBACK}", f"--port={self.port}", "--in-memory",
             f"--default-bucket={bucket}"],
            os.path.join(str(log_dir), f"gcs-emulator-{self.port}.log"),
        )
        self._exit = contextlib.ExitStack()

    # --- life cycle ---------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "GcsEmulator":
        self.server.start()
        try:
            self.server.wait_for_port(self.port, timeout=timeout)
            self._exit.enter_context(_env("STORAGE_EMULATOR_HOST", self.host))
            self._exit.enter_context(preseed_beam_credentials())
            self.client().bucket(self.bucket).reload(timeout=10)  # the default bucket exists
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self._exit.close()
        finally:
            self.server.stop()

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients and files -------------------------------------------------------------
    def client(self):
        """An anonymous google-cloud-storage client on the emulator."""
        from google.cloud import storage

        with _env("STORAGE_EMULATOR_HOST", self.host):
            return storage.Client.create_anonymous_client()

    def uri(self, *parts: str) -> str:
        return "gs://" + "/".join([self.bucket, *(p.strip("/") for p in parts)])

    def upload_file(self, local: str, uri: str) -> str:
        bucket, name = split_uri(uri)
        self.client().bucket(bucket).blob(name).upload_from_filename(local, timeout=60)
        return uri

    def upload_glob(self, pattern: str, prefix_uri: str) -> list:
        """Uploads every file matching `pattern` under `prefix_uri/<file name>`; returns the URIs."""
        return [self.upload_file(path, f"{prefix_uri.rstrip('/')}/{os.path.basename(path)}")
                for path in sorted(glob.glob(pattern))]

    def list(self, prefix_uri: str) -> list:
        """Every object URI under a gs:// prefix, sorted."""
        bucket, prefix = split_uri(prefix_uri)
        return sorted(f"gs://{bucket}/{b.name}" for b in self.client().list_blobs(bucket, prefix=prefix, timeout=30))

    def read(self, uri: str) -> bytes:
        bucket, name = split_uri(uri)
        return self.client().bucket(bucket).blob(name).download_as_bytes(timeout=60)

    def write(self, uri: str, data: bytes) -> None:
        bucket, name = split_uri(uri)
        self.client().bucket(bucket).blob(name).upload_from_string(data, timeout=60)

    def subprocess_env(self, base: Optional[dict] = None) -> dict:
        """Environment for a child process that uses gs:// on this emulator without the auth delay."""
        env = dict(os.environ if base is None else base)
        env["STORAGE_EMULATOR_HOST"] = self.host
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE_DIR, env.get("PYTHONPATH")) if p)
        return env


def split_uri(uri: str) -> tuple:
    if not uri.startswith("gs://"):
        raise ValueError(f"expected a gs:// URI, got {uri!r}")
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name


@contextlib.contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
