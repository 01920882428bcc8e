"""Beam Python SDK worker pool (EXTERNAL environment) bound to loopback only.

`python -m apache_beam.runners.worker.worker_pool_main --service_port=W`
has no bind-address flag: it binds `[::]:W` (all interfaces). This wrapper
runs the same servicer but rewrites the bind address to --host (default
127.0.0.1). It also

* puts this interpreter's bin/ first on PATH: the pool starts each SDK
  harness as a plain `python -c ...` found on PATH, and a python without
  Beam (or without the project) makes the harness die while the runner waits
  forever;
* turns SIGTERM into a normal exit so the pool's atexit hook stops the
  harness processes it started.

Usage: python scripts/flink/loopback_worker_pool.py --service_port=50000 [--host=127.0.0.1]
Works with apache-beam 2.62 .. 2.77 (same worker_pool_main layout).
"""

import argparse
import logging
import os
import signal
import sys

import grpc
from apache_beam.runners.worker import worker_pool_main


class _LoopbackServer:
    """Delegates to a grpc.Server but binds every port on one host."""

    def __init__(self, server, host):
        self._server = server
        self._host = host

    def add_insecure_port(self, address):
        port = address.rsplit(":", 1)[1]
        bound = self._server.add_insecure_port("%s:%s" % (self._host, port))
        if not bound:
            raise RuntimeError("could not bind %s:%s" % (self._host, port))
        return bound

    def __getattr__(self, name):
        return getattr(self._server, name)


class _GrpcOnHost:
    """Stands in for the `grpc` module inside worker_pool_main only."""

    def __init__(self, host):
        self._host = host

    def server(self, *args, **kwargs):
        return _LoopbackServer(grpc.server(*args, **kwargs), self._host)

    def __getattr__(self, name):
        return getattr(grpc, name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service_port", type=int, required=True)
    parser.add_argument("--container_executable", default=None)
    args = parser.parse_args(argv)

    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    def _on_term(signum, frame):
        sys.exit(0)  # runs the pool's atexit hook (stops harness processes)

    signal.signal(signal.SIGTERM, _on_term)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    worker_pool_main.grpc = _GrpcOnHost(args.host)
    worker_argv = ["--service_port=%d" % args.service_port]
    if args.container_executable:
        worker_argv.append("--container_executable=%s" % args.container_executable)
    logging.info("worker pool on %s:%d, harness python %s", args.host, args.service_port, sys.executable)
    worker_pool_main.main(worker_argv)


if __name__ == "__main__":
    main()
