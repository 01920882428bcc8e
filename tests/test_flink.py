"""The audit on a real standalone Flink cluster (JobManager + TaskManager JVMs).

The cluster comes from scripts/flink/ (installed on first use: Java, the
Beam Flink job server, Flink 1.19 from apache-flink-libraries), everything
on 127.0.0.1, and an EXTERNAL Python worker pool running this project's
virtualenv. Every process is stopped by PID when the module ends, also
when a test fails.
"""

import json
import os
import sys
import threading
import time

import pytest

from pipeline.demo import make_example
from tests.helpers import png_bytes, write_shard
from tests.infra.audit_results import assert_same_results, audit, heatmap_key, local_audit, read_rows
from tests.infra.flink_cluster import flink_cluster

pytestmark = pytest.mark.cluster
RUN_TIMEOUT = 420


def run_in_thread(*args):
    """audit(*args) in a thread; returns (thread, box) where box gets "manifest" or "error"."""
    box = {}

    def target():
        try:
            box["manifest"] = audit(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def finished(thread, box, timeout=RUN_TIMEOUT):
    thread.join(timeout)
    assert not thread.is_alive(), f"the Flink run did not finish in {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["manifest"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.monotonic()
    with flink_cluster(tmp_path_factory.mktemp("flink"), beam_python=sys.executable, install=True) as c:
        c.start_seconds = time.monotonic() - started
        yield c
    assert c.leftover_pids() == [], "a cluster process outlived stop_cluster.sh"


def test_flink_run_equals_the_direct_run(cluster, dataset, model_path, tmp_path, tmp_path_factory):
    baseline = local_audit(dataset, model_path, tmp_path_factory)
    thread, box = run_in_thread(dataset["pattern"], model_path, str(tmp_path), *cluster.pipeline_args(parallelism=2))
    manifest = finished(thread, box)
    assert "--runner=PortableRunner" in manifest["beam_args"]
    assert_same_results(baseline, manifest)
    assert manifest["counts"]["records_read"] == dataset["records"]
    assert cluster.non_loopback_listeners() == []
    assert [job["state"] for job in cluster.jobs()] == ["FINISHED"]


@pytest.fixture(scope="module")
def bigger_dataset(tmp_path_factory):
    """240 images in 6 shards: long enough on one slot to kill a TaskManager mid-job."""
    folder = str(tmp_path_factory.mktemp("bigger"))
    for s in range(6):
        write_shard(folder, f"big-{s}.tfrecord", [
            make_example(png_bytes(32, 32, seed=1000 * s + i), label=i % 3, image_id=f"big-{s}-{i}")
            for i in range(40)])
    return {"pattern": os.path.join(folder, "big-*.tfrecord"), "records": 240}


def test_killed_taskmanager_restarts_with_exactly_the_expected_rows(cluster, bigger_dataset, model_path, tmp_path,
                                                                     tmp_path_factory):
    expected = audit(bigger_dataset["pattern"], model_path, str(tmp_path_factory.mktemp("bigger-local")))
    known = {job["jid"] for job in cluster.jobs()}
    thread, box = run_in_thread(bigger_dataset["pattern"], model_path, str(tmp_path),
                                *cluster.pipeline_args(parallelism=1), "--batch_size", "2")
    job = cluster.new_job(known, {"RUNNING"}, timeout=180)
    assert job is not None, "the job never reached RUNNING"
    time.sleep(8)  # let the SDK harness load the model and start writing
    assert thread.is_alive(), "the job ended before the TaskManager could be killed: make the data bigger"
    killed = cluster.kill_taskmanager()
    cluster.start_taskmanager()
    manifest = finished(thread, box)
    exceptions = cluster.rest(f"/v1/jobs/{job['jid']}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries"), f"no failover recorded after killing {killed}"
    got = sorted(map(heatmap_key, read_rows(manifest, "heatmaps")))
    assert got == sorted(map(heatmap_key, read_rows(expected, "heatmaps")))
    assert len(got) == len(set(got)) == bigger_dataset["records"]
    assert manifest["counts"]["images_explained"] == bigger_dataset["records"]
    assert_same_results(expected, manifest)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """One shard of 24 images whose 11th record is damaged (a flipped byte: read past, one error row)."""
    from transforms.records import write_records

    folder = str(tmp_path_factory.mktemp("one-shard"))
    records = [make_example(png_bytes(32, 32, seed=500 + i), label=i % 3, image_id=f"one-{i}") for i in range(24)]
    path = os.path.join(folder, "one.tfrecord")
    write_records(path, records)
    data = bytearray(open(path, "rb").read())
    data[sum(12 + len(r) + 4 for r in records[:10]) + 12 + 7] ^= 0x20
    open(path, "wb").write(bytes(data))
    return {"pattern": path, "records": 23}


def job_vertices(cluster, jid: str) -> list[dict]:
    """Every vertex of a job: name, plan description, parallelism and records received per subtask.

    Also written to <FLINK workdir>/vertices-<jid>.json for a look after a failure.
    """
    plan = {n["id"]: n for n in cluster.rest(f"/v1/jobs/{jid}/plan")["plan"]["nodes"]}
    vertices = []
    for vertex in cluster.rest(f"/v1/jobs/{jid}")["vertices"]:
        detail = cluster.rest(f"/v1/jobs/{jid}/vertices/{vertex['id']}")
        vertices.append({
            "id": vertex["id"],
            "name": vertex["name"],
            "description": plan.get(vertex["id"], {}).get("description", ""),
            "parallelism": vertex["parallelism"],
            "inputs": [i.get("ship_strategy") for i in plan.get(vertex["id"], {}).get("inputs", [])],
            "input_ids": [i.get("id") for i in plan.get(vertex["id"], {}).get("inputs", [])],
            "read_records": [t["metrics"]["read-records"] for t in sorted(detail["subtasks"], key=lambda t: t["subtask"])],
        })
    with open(os.path.join(str(cluster.workdir), f"vertices-{jid}.json"), "w") as handle:
        json.dump(vertices, handle, indent=1)
    return vertices


def test_one_shard_fans_out_to_both_subtasks(cluster, one_shard, model_path, tmp_path, tmp_path_factory):
    baseline = audit(one_shard["pattern"], model_path, str(tmp_path_factory.mktemp("one-shard-local")))
    assert baseline["options"]["reshuffle_records"] == "off"  # local runner: auto = off
    known = {job["jid"] for job in cluster.jobs()}
    thread, box = run_in_thread(one_shard["pattern"], model_path, str(tmp_path), *cluster.pipeline_args(parallelism=2))
    manifest = finished(thread, box)
    assert manifest["options"]["reshuffle_records"] == "on"  # cluster runner: auto = on
    (job,) = [j for j in cluster.jobs() if j["jid"] not in known]
    assert job["state"] == "FINISHED"
    vertices = job_vertices(cluster, job["jid"])
    # Flink names a fused stage by its common prefixes ("MapPartition at [12]{ExplainDataset, WriteErrors,
    # WriteHeatmaps}"), so the stage that decodes and explains is found as the one fed by the fan-out's shuffle.
    (shuffle,) = [v for v in vertices if v["name"].startswith("GroupReduce") and "FanOutRecords" in v["name"]]
    (explaining,) = [v for v in vertices if shuffle["id"] in v["input_ids"] and "ExplainDataset" in v["name"]]
    per_subtask = explaining["read_records"]  # records each subtask of the stage that runs the model received
    assert len(per_subtask) == 2 and all(n > 0 for n in per_subtask), explaining
    assert sum(per_subtask) == one_shard["records"], explaining
    assert_same_results(baseline, manifest)
    assert manifest["counts"]["images_explained"] == one_shard["records"]
    assert manifest["counts"]["shard_errors"] == 1


@pytest.mark.parametrize("launcher", ["killed", "no_wait"])
def test_the_job_completes_its_run_without_its_launcher(cluster, dataset, model_path, tmp_path, launcher):
    """Issue 22: the launcher SIGKILLed as soon as Flink reports the job RUNNING (or `--wait=false`, which
    exits after submitting): the job's last stage still writes the manifest (counts that add up), the
    comparison with the run before it, report.html, _SUCCESS, moves the run into place and adds its
    runs.json entry with the job's id."""
    import signal
    import subprocess

    from pipeline.runs.history import read_index

    output = tmp_path / "out"
    audit(dataset["pattern"], model_path, str(output), "--run_id", "2026-01-01")  # the run before it, local
    known = {job["jid"] for job in cluster.jobs()}
    args = [sys.executable, "-m", "pipeline", "--input", dataset["pattern"], "--model", model_path,
            "--output", str(output), "--run_id", "2026-01-02", "--compare_with_previous=true", "--quiet",
            "--batch_size", "4", "--max_image_pixels", "1000000", *cluster.pipeline_args(parallelism=2)]
    if launcher == "no_wait":
        args.append("--wait=false")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        job = cluster.new_job(known, {"RUNNING", "FINISHED"}, timeout=180)
        assert job is not None, f"no new job reached RUNNING in 180 s: {cluster.jobs()}"
        if launcher == "killed":
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
        else:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
            assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = cluster.new_job(known, {"FINISHED", "FAILED", "CANCELED"}, timeout=RUN_TIMEOUT)
    assert done is not None and done["jid"] == job["jid"] and done["state"] == "FINISHED", (done, cluster.jobs())
    run = output / "run=2026-01-02"
    assert (run / "_SUCCESS").exists() and (run / "report.html").exists()
    assert not [p for p in os.listdir(output) if p.startswith("_tmp-run=2026-01-02")]
    manifest = json.load(open(run / "run_manifest.json"))
    counts = manifest["counts"]
    assert counts["balanced"] is True
    assert counts["records_read"] == dataset["records"] == counts["images_explained"] + sum(
        counts["records_rejected"].values())
    assert manifest["comparison"]["baseline_run_id"] == "2026-01-01"
    (entry,) = [r for r in read_index(str(output)) if r["run_id"] == "2026-01-02"]
    assert entry["compared_with"] == "2026-01-01" and entry["comparison_flagged"] is not None
    assert entry["job"]["runner"] == "PortableRunner" and entry["job"]["id"], entry["job"]
