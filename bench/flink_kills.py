"""Does a lost machine ever fail the night? TaskManagers SIGKILLed at random moments of the job.

    python -m bench.flink_kills [--runs 10] [--images 480] [--parallelism 2] [--seed 0]

Starts the project's local Flink cluster (scripts/flink: JobManager, TaskManager, Beam job server and an
EXTERNAL Python worker pool, all on 127.0.0.1, stopped by PID at the end), audits a dataset once on the
local runner (the expected rows), then `--runs` times: submits the same audit to the cluster, waits until
Flink reports the job RUNNING, sleeps a random delay drawn uniformly over the job's measured length,
SIGKILLs the TaskManager, starts a new one, and waits for the job. Prints per run the delay, Flink's final
state, the number of restarts Flink recorded and whether the rows equal the local run's; and the count of
runs that finished with exactly those rows. The restart strategy is the cluster scripts' (exponential-delay,
scripts/flink/start_cluster.sh). Not part of the test suite (~2 min a run on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path


def _dataset(folder: str, images: int) -> str:
    from pipeline.demo import make_example
    from tests.helpers import png_bytes, write_shard

    per_shard = 40
    for s in range((images + per_shard - 1) // per_shard):
        write_shard(folder, f"kill-{s}.tfrecord", [
            make_example(png_bytes(32, 32, seed=1000 * s + i), label=i % 3, image_id=f"kill-{s}-{i}")
            for i in range(min(per_shard, images - s * per_shard))])
    return os.path.join(folder, "kill-*.tfrecord")


def _rows(manifest: dict) -> list:
    from tests.infra.audit_results import heatmap_key, read_rows

    return sorted(map(heatmap_key, read_rows(manifest, "heatmaps")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tests.helpers import small_functional
    from tests.infra.audit_results import audit
    from tests.infra.flink_cluster import flink_cluster

    work = tempfile.mkdtemp(prefix="flink_kills-")
    model = os.path.join(work, "small.keras")
    small_functional().save(model)
    pattern = _dataset(os.path.join(work, "data"), args.images)
    expected = _rows(audit(pattern, model, os.path.join(work, "local"), "--batch_size", "2"))
    rng = random.Random(args.seed)
    results = []
    with flink_cluster(Path(work) / "flink", beam_python=sys.executable, install=True) as cluster:
        # One undisturbed run on the cluster: how long a job runs once RUNNING.
        known = {j["jid"] for j in cluster.jobs()}
        started = time.monotonic()
        audit(pattern, model, os.path.join(work, "clean"), "--batch_size", "2",
              *cluster.pipeline_args(parallelism=args.parallelism))
        length = time.monotonic() - started
        print(f"an undisturbed cluster run: {length:.0f} s", flush=True)
        for i in range(args.runs):
            known = {j["jid"] for j in cluster.jobs()}
            box = {}

            def target(box=box, i=i):
                try:
                    box["manifest"] = audit(pattern, model, os.path.join(work, f"run-{i}"), "--batch_size", "2",
                                            *cluster.pipeline_args(parallelism=args.parallelism))
                except BaseException as exc:  # noqa: BLE001 - reported in the table
                    box["error"] = f"{type(exc).__name__}: {exc}"[:200]

            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            job = cluster.new_job(known, {"RUNNING"}, timeout=180)
            delay = rng.uniform(0.0, length * 0.8)
            time.sleep(delay)
            killed = cluster.kill_taskmanager() if job else None
            cluster.start_taskmanager()
            thread.join(900)
            final = cluster.new_job(known, {"FINISHED", "FAILED", "CANCELED"}, timeout=60)
            restarts = None
            if final:
                history = cluster.rest(f"/v1/jobs/{final['jid']}/exceptions").get("exceptionHistory", {})
                restarts = len(history.get("entries", []))
            same = "manifest" in box and _rows(box["manifest"]) == expected
            results.append(same)
            print(f"run {i}: kill after {delay:5.1f} s (pid {killed}), Flink {final['state'] if final else '?'}, "
                  f"failovers {restarts}, rows {'== local' if same else 'DIFFER'} {box.get('error', '')}", flush=True)
    print(f"{sum(results)} of {len(results)} runs finished with exactly the local run's rows")


if __name__ == "__main__":
    main()
