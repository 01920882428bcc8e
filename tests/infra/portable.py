"""Beam's portable runner on one machine, loopback only: a job service and an EXTERNAL worker pool.

    with PortableCluster(log_dir) as cluster:       # two processes, started and stopped by PID
        run([..., *cluster.pipeline_args()])

Both servers run through this file's `__main__` (`python tests/infra/portable.py
job_service --port P` / `worker_pool --port W`), which starts Beam's own
entry points (`local_job_service_main`, `worker_pool_main`) after making
every gRPC server of the process bind 127.0.0.1:

* `worker_pool_main` binds `[::]:W` (all interfaces) and has no flag for it;
* the job service binds `localhost:P`, but while a job runs it opens the
  control/data/state/logging servers of its worker handlers on `[::]:0`
  (apache_beam/runners/portability/fn_api_runner/worker_handlers.py).

`grpc.server` is wrapped before Beam is imported, so each
`add_insecure_port("[::]:N")` / `("localhost:N")` / `("0.0.0.0:N")` binds
`127.0.0.1:N` instead. The pool starts every SDK harness with the `python`
found on PATH: the venv's bin/ goes first on PATH (a python without Beam and
the project makes the harness die while the runner waits forever). SIGTERM
becomes a normal exit so the pool's atexit hook stops its harnesses; the
process group is killed by PID anyway.
"""

from __future__ import annotations

import os
import sys

BIND_HOST = "127.0.0.1"


def loopback_only_grpc(host: str = BIND_HOST) -> None:
    """Makes every grpc.server(...) created from now on in this process bind `host`."""
    import grpc

    if getattr(grpc.server, "_loopback_only", False):
        return
    make_server = grpc.server

    class _Server:
        def __init__(self, server):
            self._server = server

        def add_insecure_port(self, address):
            port = address.rsplit(":", 1)[1]
            bound = self._server.add_insecure_port(f"{host}:{port}")
            if not bound:
                raise RuntimeError(f"could not bind {host}:{port} (asked for {address})")
            return bound

        def __getattr__(self, name):
            return getattr(self._server, name)

    def server(*args, **kwargs):
        return _Server(make_server(*args, **kwargs))

    server._loopback_only = True
    grpc.server = server


def _main(argv: list) -> None:
    import argparse
    import logging
    import signal

    parser = argparse.ArgumentParser(description="Beam job service / worker pool bound to 127.0.0.1")
    parser.add_argument("role", choices=["job_service", "worker_pool"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loopback_only_grpc()
    if args.role == "job_service":
        from apache_beam.runners.portability import local_job_service_main

        local_job_service_main.run(["--port", str(args.port)])
    else:
        from apache_beam.runners.worker import worker_pool_main

        worker_pool_main.main([f"--service_port={args.port}"])


# --- the test side -------------------------------------------------------------------

class PortableCluster:
    """A job service and an EXTERNAL worker pool, each a process on 127.0.0.1."""

    def __init__(self, log_dir: str, *, env: dict | None = None, start_timeout: float = 90.0):
        from tests.infra.servers import Server, free_port

        self.job_port = free_port()
        self.pool_port = free_port()
        self.start_timeout = start_timeout
        env = dict(os.environ if env is None else env)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        me = os.path.abspath(__file__)
        self.job_service = Server("beam-job-service", [sys.executable, me, "job_service", "--port", self.job_port],
                                  os.path.join(log_dir, "job-service.log"), env=env, cwd=repo)
        self.worker_pool = Server("beam-worker-pool", [sys.executable, me, "worker_pool", "--port", self.pool_port],
                                  os.path.join(log_dir, "worker-pool.log"), env=env, cwd=repo)

    @property
    def servers(self) -> tuple:
        return self.job_service, self.worker_pool

    def start(self) -> "PortableCluster":
        try:
            for server in self.servers:
                server.start()
            self.job_service.wait_for_port(self.job_port, timeout=self.start_timeout)
            self.worker_pool.wait_for_port(self.pool_port, timeout=self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        errors = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - stop the other one anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    def leftovers(self) -> list:
        return [p for server in self.servers for p in server.leftovers()]

    def pipeline_args(self) -> list:
        return ["--runner=PortableRunner", f"--job_endpoint={BIND_HOST}:{self.job_port}",
                "--environment_type=EXTERNAL", f"--environment_config={BIND_HOST}:{self.pool_port}"]

    def __enter__(self) -> "PortableCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    _main(sys.argv[1:])
