"""The audit through Beam's portable job API: a local job service + an EXTERNAL SDK worker pool.

The same job API as Flink's job server, without a JVM: two processes started
by the test on 127.0.0.1 (tests/infra/portable.py), stopped by PID. Every
wait has a timeout; `ss -ltnp` is polled during the run to check that no
process of the test listens beyond loopback.
"""

import threading
import time

import pytest

from tests.infra.audit_results import assert_same_results, audit, local_audit
from tests.infra.portable import PortableCluster
from tests.infra.servers import ListenerWatch

pytestmark = pytest.mark.cluster  # starts a job service and a worker pool (~25 s with the run)

RUN_TIMEOUT = 240


def audit_with_timeout(timeout, *args):
    """audit(*args) in a thread; (manifest, seconds), or raises TimeoutError / the run's error."""
    box = {}

    def target():
        try:
            box["manifest"] = audit(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=target, name="portable-audit", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"the portable run did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["manifest"], time.monotonic() - started


@pytest.fixture(scope="module")
def portable_run(dataset, model_path, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("portable-logs"))
    output = str(tmp_path_factory.mktemp("portable-out"))
    cluster = PortableCluster(logs)
    try:
        cluster.start()
        with ListenerWatch(*cluster.servers) as watch:
            try:
                manifest, seconds = audit_with_timeout(
                    RUN_TIMEOUT, dataset["pattern"], model_path, output, *cluster.pipeline_args())
            except BaseException as exc:
                tails = "\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail(30)}" for s in cluster.servers)
                raise AssertionError(f"portable run failed: {exc!r}\n{tails}") from exc
        harnesses = set(cluster.worker_pool.note_descendants())
    finally:
        cluster.stop()
    return {"manifest": manifest, "seconds": seconds, "listeners": watch.found,
            "non_loopback": watch.non_loopback(), "leftovers": cluster.leftovers(), "harnesses": harnesses,
            "ports": (cluster.job_port, cluster.pool_port)}


def test_portable_run_equals_the_in_process_run(portable_run, dataset, model_path, tmp_path_factory):
    baseline = local_audit(dataset, model_path, tmp_path_factory)
    manifest = portable_run["manifest"]
    assert manifest["beam_args"][:1] == ["--runner=PortableRunner"] or "--runner=PortableRunner" in manifest["beam_args"]
    assert_same_results(baseline, manifest)
    assert manifest["counts"]["records_read"] == dataset["records"]


def test_servers_listen_on_loopback_only_and_are_gone(portable_run):
    assert portable_run["non_loopback"] == [], portable_run["non_loopback"]
    ports = {port for _, port, _, _ in portable_run["listeners"]}
    assert set(portable_run["ports"]) <= ports  # the watch did see both servers
    assert portable_run["harnesses"], "the worker pool started no SDK harness: did the job run elsewhere?"
    assert portable_run["leftovers"] == []
