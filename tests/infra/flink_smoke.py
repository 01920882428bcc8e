"""End-to-end proof of the local Flink path (not collected by pytest).

    python -m tests.infra.flink_smoke --workdir /tmp/flink-smoke [--fault] [--mode portable|uber_jar]

Starts a cluster with tests.infra.flink_cluster, runs through it
  1. beam.Create(range(100)) | Map | WriteToText, and checks the 100 lines;
  2. ReadFromTFRecord over 4 small TFRecord files, and checks the 100 records;
  3. with --fault: a slow Map (200 x 0.2 s, parallelism 1) during which the
     TaskManager is killed with SIGKILL and a new one is started; checks that
     the job still finishes with exactly the 200 expected lines;
samples the listening sockets of every cluster process while jobs run (all
must be on loopback), stops the cluster, checks that no process is left, and
prints timings as JSON. Exit code 0 only if every check passed.

The running python must have apache-beam (ideally the job server's version,
2.62.0); the worker pool uses --beam-python (default: this python).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
import time
from pathlib import Path

from tests.infra.flink_cluster import flink_cluster


class _SocketSampler(threading.Thread):
    def __init__(self, cluster, interval=0.5):
        super().__init__(daemon=True)
        self.cluster, self.interval = cluster, interval
        self.seen, self.bad = set(), set()
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            try:
                for addr, port, pid in self.cluster.listening_sockets():
                    self.seen.add((addr, port, pid))
                    if addr not in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"):
                        self.bad.add((addr, port, pid))
            except Exception:  # a process vanished mid-scan
                pass
            self._stop_evt.wait(self.interval)

    def stop(self):
        self._stop_evt.set()
        self.join(10)


def _lines(pattern):
    return [line.rstrip("\n") for f in sorted(glob.glob(pattern)) for line in open(f)]


def run_tiny(args, out):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(args)) as p:
        _ = p | beam.Create(range(100)) | beam.Map(lambda x: x * x) | beam.io.WriteToText(out + "/part")
    got = sorted(int(x) for x in _lines(out + "/part*"))
    return got == sorted(x * x for x in range(100)), len(got)


def run_tfrecord(args, work):
    import apache_beam as beam
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from apache_beam.options.pipeline_options import PipelineOptions

    os.makedirs(work + "/in", exist_ok=True)
    expected = []
    for i in range(4):
        with open(f"{work}/in/data-{i}.tfrecord", "wb") as f:
            for j in range(25):
                rec = f"rec-{i}-{j}".encode()
                _TFRecordUtil.write_record(f, rec)
                expected.append(rec.decode().upper())
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        _ = (p | beam.io.ReadFromTFRecord(work + "/in/*.tfrecord")
               | beam.Map(lambda b: b.decode().upper())
               | beam.io.WriteToText(work + "/out/part"))
    got = sorted(_lines(work + "/out/part*"))
    return got == sorted(expected), len(got)


def run_fault(cluster, args, out, kill_after=30, timeout=600):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    result = {}

    progress = out + "_progress"
    os.makedirs(progress, exist_ok=True)

    def slow(x):  # nested, so it is pickled by value (no import of this module on workers)
        import os
        import time
        import uuid
        time.sleep(0.2)
        open(os.path.join(progress, "%d.%s" % (x, uuid.uuid4().hex)), "w").close()  # one file per call
        return x

    def job():
        try:
            with beam.Pipeline(options=PipelineOptions(args)) as p:
                _ = p | beam.Create(list(range(200))) | beam.Map(slow) | beam.io.WriteToText(out + "/part")
            result["ok"] = True
        except Exception as e:  # reported below
            result["error"] = repr(e)

    t0 = time.monotonic()
    th = threading.Thread(target=job, daemon=True)
    th.start()
    timeline = []
    jid = None
    while time.monotonic() - t0 < 300 and jid is None:
        running = [j for j in cluster.jobs() if j["state"] == "RUNNING"]
        jid = running[0]["jid"] if running else None
        time.sleep(0.5)
    if jid is None:
        th.join(timeout)
        return {"error": "job never reached RUNNING", **result}
    timeline.append(("job RUNNING", round(time.monotonic() - t0, 1)))
    # kill once the Map is visibly under way (kill_after elements done)
    while time.monotonic() - t0 < 300 and len(os.listdir(progress)) < kill_after and th.is_alive():
        time.sleep(0.2)
    done_before_kill = len(os.listdir(progress))
    killed = cluster.kill_taskmanager()
    t_kill = time.monotonic()
    timeline.append((f"kill -9 TaskManager pid {killed} ({done_before_kill}/200 elements through the Map)",
                     round(t_kill - t0, 1)))
    noticed = None
    while time.monotonic() - t_kill < 60:
        state = cluster.rest(f"/v1/jobs/{jid}")["state"]
        if state != "RUNNING" or cluster.overview()["taskmanagers"] == 0:
            noticed = round(time.monotonic() - t_kill, 1)
            timeline.append((f"failure noticed (job {state}, TMs {cluster.overview()['taskmanagers']})",
                             round(time.monotonic() - t0, 1)))
            break
        time.sleep(0.2)
    new_pid = cluster.start_taskmanager()
    timeline.append((f"new TaskManager pid {new_pid} registered", round(time.monotonic() - t0, 1)))
    th.join(timeout)
    timeline.append(("client returned", round(time.monotonic() - t0, 1)))
    got = sorted(int(x) for x in _lines(out + "/part*"))
    info = cluster.rest(f"/v1/jobs/{jid}")
    exc = cluster.rest(f"/v1/jobs/{jid}/exceptions").get("exceptionHistory", {}).get("entries", [])
    return {
        **result,
        "exact_output": got == list(range(200)),
        "lines": len(got),
        "distinct": len(set(got)),
        "map_calls_before_kill": done_before_kill,
        "map_calls_total": len(os.listdir(progress)),
        "final_state": info.get("state"),
        "job_duration_s": round(info.get("duration", 0) / 1000, 1),
        "failure_noticed_after_s": noticed,
        "exceptions": [e.get("exceptionName") for e in exc],
        "timeline": timeline,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--beam-python", default=sys.executable)
    ap.add_argument("--mode", default="portable", choices=["portable", "uber_jar"])
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--skip-jobs", action="store_true", help="only start and stop")
    a = ap.parse_args(argv)

    import apache_beam

    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"client_beam": apache_beam.__version__, "mode": a.mode, "checks": {}}
    t = time.monotonic()
    cluster_ref = None
    try:
        with flink_cluster(work / "cluster", beam_python=a.beam_python) as cluster:
            cluster_ref = cluster
            report["start_s"] = round(time.monotonic() - t, 1)
            sampler = _SocketSampler(cluster)
            sampler.start()
            if not a.skip_jobs:
                t = time.monotonic()
                ok, n = run_tiny(cluster.pipeline_args(1, a.mode), str(work / "tiny"))
                report["tiny_job_s"] = round(time.monotonic() - t, 1)
                report["checks"]["tiny_output"] = ok
                t = time.monotonic()
                ok, n = run_tfrecord(cluster.pipeline_args(2, a.mode), str(work / "tfrecord"))
                report["tfrecord_job_s"] = round(time.monotonic() - t, 1)
                report["checks"]["tfrecord_output"] = ok
                if a.fault:
                    t = time.monotonic()
                    report["fault"] = run_fault(cluster, cluster.pipeline_args(1, a.mode), str(work / "fault"))
                    report["fault_s"] = round(time.monotonic() - t, 1)
                    report["checks"]["fault_exact_output"] = report["fault"].get("exact_output", False)
            sampler.stop()
            report["listening_sockets_seen"] = len(sampler.seen)
            report["non_loopback_listeners"] = sorted(map(list, sampler.bad))
            report["checks"]["loopback_only"] = not sampler.bad and bool(sampler.seen)
            t = time.monotonic()
    finally:
        report["teardown_s"] = round(time.monotonic() - t, 1)
        if cluster_ref is not None:
            time.sleep(0.5)
            left = cluster_ref.leftover_pids()
            report["leftover_pids"] = left
            report["checks"]["nothing_left"] = not left
        print(json.dumps(report, indent=2))
    return 0 if report["checks"] and all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
