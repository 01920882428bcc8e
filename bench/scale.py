"""Scale rehearsal: the launcher-side steps on synthetic run folders of N heatmap rows.

    python -m bench.scale [--rows 1000000,10000000] [--workdir DIR] [--keep] [--json PATH]

For each N it writes a run folder the way the job would (the real Parquet
schemas; heatmaps of 7x7 float32 CAMs, ResNet-sized, written in row groups
of `CHUNK` rows, files of at most `ROWS_PER_FILE` rows; plus small
class_stats, exemplars with real JPEG thumbnails, errors, run_manifest.json),
then times, each in a fresh Python process so its peak RSS is its own:

  manifest  pipeline.runs.manifest.count_outputs + attention_summary (what the
            launcher does after the job), checked against the synthesised counts
  compare   python -m pipeline.compare --baseline B --current RUN (writes comparison.json)
  report    python -m pipeline.report RUN (with that comparison)

Seconds are the whole command's wall time (imports included); peak RSS is the
process's VmHWM (/proc/self/status, reset by exec, unlike ru_maxrss). The
baseline of `compare` is a small synthetic run (compare reads class_stats and
manifests only, never the heatmaps). Results: a table on stdout and JSON
(default bench/results/scale.json).

Acceptance (issue 10): report <= 60 s and <= 1.5 GB at 1 M rows; peak RSS at
10 M rows within 1.2x of the 1 M figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO, "bench", "results", "scale.json")
CHUNK = 100_000  # rows per row group (Beam's WriteToParquet flushes ~64 MB row groups: ~200k such rows)
ROWS_PER_FILE = 1_000_000
CAM = (7, 7)  # ResNet50's conv5 output at 224x224
NUM_CLASSES = 10
SHORTCUT_CLASS = 3
STRATEGIES = 3  # clusters per class in the synthetic clusters table
SHARD_RECORDS = 10_000  # records per (imaginary) source shard
STEPS = ("manifest", "compare", "report")
REPORT_LIMIT_SECONDS = 60.0
REPORT_LIMIT_MB = 1536.0
RSS_RATIO_LIMIT = 1.2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------- synthesis ----


def _heatmap_chunk(rng: np.random.Generator, start: int, n: int, num_classes: int) -> pa.Table:
    """`n` heatmap rows (rank 0) with plausible, self-consistent values."""
    from transforms.schemas import HEATMAP_SCHEMA

    h, w = CAM
    index = np.arange(start, start + n)
    label = rng.integers(0, num_classes, n)
    wrong = rng.random(n) < 0.2
    predicted = np.where(wrong, rng.integers(0, num_classes, n), label)
    score = rng.uniform(0.2, 1.0, n).astype(np.float32)
    cam = rng.random((n, h * w), dtype=np.float32)
    peak = cam.argmax(axis=1)
    peak_y = ((peak // w + 0.5) / h).astype(np.float32)
    peak_x = ((peak % w + 0.5) / w).astype(np.float32)
    peak_cell = (np.minimum((peak_y * 3).astype(np.int32), 2) * 3 + np.minimum((peak_x * 3).astype(np.int32), 2))
    boxed = rng.random(n) < 0.5
    no_box = ~boxed
    box_mass = rng.random(n).astype(np.float32)
    box_area = rng.uniform(0.05, 0.6, n).astype(np.float32)
    border_mass = rng.uniform(0.2, 0.8, n).astype(np.float32)
    peak_in_box = rng.random(n) < 0.6
    shards = index // SHARD_RECORDS
    dictionary = pa.array([f"gs://bench-bucket/data/train-{k:05d}.tfrecord"
                           for k in range(int(shards[0]), int(shards[-1]) + 1)])
    source = pa.DictionaryArray.from_arrays(pa.array(shards - shards[0], pa.int32()), dictionary).cast(pa.string())

    def const(value, type_):
        return pa.array(np.full(n, value), type_)

    columns = {
        "image_id": pa.array([f"img-{i:09d}" for i in index]),
        "source": source,
        "record_index": pa.array(index % SHARD_RECORDS, pa.int64()),
        "label": pa.array(label, pa.int64()),
        "predicted_class": pa.array(predicted, pa.int64()),
        "predicted_score": pa.array(score),
        "target_rank": const(0, pa.int32()),
        "target_class": pa.array(predicted, pa.int64()),
        "target_score": pa.array(score),
        "target_logit": pa.array(rng.normal(0, 3, n).astype(np.float32)),
        "method": pa.array(["gradcam"] * n),
        "target_layer": pa.array(["conv5_block3_out"] * n),
        "cam": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * h * w, h * w, dtype=np.int32)),
                                        pa.array(cam.ravel())),
        "cam_height": const(h, pa.int32()),
        "cam_width": const(w, pa.int32()),
        "cam_max": pa.array(cam.max(axis=1)),
        "peak_y": pa.array(peak_y),
        "peak_x": pa.array(peak_x),
        "entropy": pa.array(rng.uniform(2, 3.9, n).astype(np.float32)),
        "border_mass": pa.array(border_mass),
        "box_mass": pa.array(box_mass, mask=no_box),
        "peak_in_box": pa.array(peak_in_box, mask=no_box),
        "num_boxes": pa.array(boxed.astype(np.int32)),
        "image_height": const(375, pa.int32()),
        "image_width": const(500, pa.int32()),
        "confident_wrong": pa.array((predicted != label) & (score >= 0.8)),
        "low_confidence": pa.array(score < 0.5),
        "attention_outside_box": pa.array(~peak_in_box & (box_mass < 0.5), mask=no_box),
        "attention_on_border": pa.array(border_mass >= 0.6),
        "peak_cell": pa.array(peak_cell.astype(np.int32)),
        "box_cell": pa.array(rng.integers(0, 9, n).astype(np.int32), mask=no_box),
        "box_area": pa.array(box_area, mask=no_box),
        "box_concentration": pa.array(box_mass / box_area, mask=no_box),
        "cluster_id": pa.array(rng.integers(0, 3, n).astype(np.int32)),
    }
    # The sampled columns (faithfulness_*, deletion_*) stay null, as on the ~98% of rows not sampled.
    return pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.nulls(n, f.type)
                                 for f in HEATMAP_SCHEMA], schema=HEATMAP_SCHEMA)


def _class_stats(rng: np.random.Generator, num_classes: int, rows: int) -> pa.Table:
    from transforms.schemas import CLASS_STATS_SCHEMA

    out = []
    for c in range(num_classes):
        mean_cam = rng.random(CAM[0] * CAM[1]).astype(np.float32)
        shortcut = c == SHORTCUT_CLASS
        row = dict.fromkeys(CLASS_STATS_SCHEMA.names)
        row.update({
            "class_id": c, "class_name": f"class{c}", "num_labelled": rows // num_classes,
            "num_predicted": rows // num_classes, "num_correct": int(rows // num_classes * 0.8),
            "accuracy": 0.8 + rng.uniform(-0.05, 0.05), "precision": 0.8, "mean_predicted_score": 0.6,
            "num_targeted": rows // num_classes, "mean_target_score": 0.6, "mean_cam": mean_cam.tolist(),
            "cam_height": CAM[0], "cam_width": CAM[1], "mean_peak_y": 0.5, "mean_peak_x": 0.5,
            "mean_entropy": 3.5, "mean_border_mass": 0.5, "mean_box_mass": 0.5, "pointing_accuracy": 0.6,
            "top_confusions": [{"predicted_class": (c + 1) % num_classes, "count": 5}],
            "share_confident_wrong": 0.04, "share_low_confidence": 0.37, "share_attention_outside_box": 0.15,
            "share_attention_on_border": 0.33, "share_flagged": 0.6, "peak_cell": 0 if shortcut else 4,
            "peak_cell_share": 0.7 if shortcut else 0.2, "box_cell_share": 0.05 if shortcut else 0.2,
            "shortcut_score": 0.65 if shortcut else 0.0, "shortcut": shortcut,
        })
        out.append(row)
    return pa.Table.from_pylist(out, schema=CLASS_STATS_SCHEMA)


def _exemplars(rng: np.random.Generator, totals: dict, num_classes: int, per_kind: int = 8) -> pa.Table:
    """Exemplar rows with real JPEG tiles (synthetic 224x224 images under random CAMs)."""
    from transforms.exemplars import flag_kind, shortcut_kind, strategy_kind
    from transforms.schemas import EXEMPLAR_SCHEMA
    from transforms.thumbnails import encode_jpeg, overlay

    rows = []
    kinds = [(flag_kind(f), totals[f]) for f in totals] + [(shortcut_kind(SHORTCUT_CLASS), 1234)]
    kinds += [(strategy_kind(c, k), 999) for c in range(num_classes) for k in range(STRATEGIES)]
    for kind, total in kinds:
        for rank in range(min(per_kind, total)):
            image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            cam = rng.random(CAM).astype(np.float32)
            rows.append({
                "kind": kind, "rank": rank, "score": 1.0 - rank / 10, "kind_total": total,
                "image_id": f"img-{rank:09d}", "source": "gs://bench-bucket/data/train-00000.tfrecord",
                "record_index": rank, "label": 1, "predicted_class": SHORTCUT_CLASS, "predicted_score": 0.9,
                "target_class": SHORTCUT_CLASS, "box_mass": 0.3, "box_concentration": 0.8, "border_mass": 0.7,
                "peak_cell": 0,
                "cam": cam.ravel().tolist(), "cam_height": CAM[0], "cam_width": CAM[1],
                "thumbnail": encode_jpeg(overlay(image, cam, [(0.2, 0.2, 0.8, 0.8)])),
            })
    return pa.Table.from_pylist(rows, schema=EXEMPLAR_SCHEMA)


def _clusters(rng: np.random.Generator, num_classes: int, rows: int) -> pa.Table:
    """STRATEGIES clusters per class (the clusters table holds a few rows per class at any size)."""
    from transforms.schemas import CLUSTER_SCHEMA

    out = []
    for c in range(num_classes):
        for k in range(STRATEGIES):
            out.append({
                "class_id": c, "cluster_id": k, "size": rows // num_classes // STRATEGIES, "share": 1 / STRATEGIES,
                "mean_cam": rng.random(CAM[0] * CAM[1]).astype(np.float32).tolist(), "cam_height": CAM[0],
                "cam_width": CAM[1], "mean_box_concentration": 1.5, "mean_border_mass": 0.4, "peak_cell": 4,
                "exemplar_ids": [f"img-{i:09d}" for i in range(6)], "eigengap": 0.5,
                "suspicious": c == SHORTCUT_CLASS and k == 0,
                "reason": "synthetic" if c == SHORTCUT_CLASS and k == 0 else None,
            })
    return pa.Table.from_pylist(out, schema=CLUSTER_SCHEMA)


def _errors(n: int) -> pa.Table:
    from transforms.schemas import ERROR_SCHEMA

    rows = [{"source": "gs://bench-bucket/data/train-00000.tfrecord", "record_index": i, "image_id": None,
             "stage": "decode", "error": "NotAnImage", "message": "not an image", "raw_record": b"x" * 100}
            for i in range(n)]
    rows.append({"source": "gs://bench-bucket/data/train-99999.tfrecord", "record_index": 7, "image_id": None,
                 "stage": "read", "error": "CorruptRecord", "message": "CRC mismatch", "raw_record": b"y" * 100})
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def _stamped(table: pa.Table, run_id: str) -> pa.Table:
    """`table` with every row's run_id set, as the job's sink sets it (`transforms.sinks.with_run_id`)."""
    from transforms.sinks import with_run_id

    return pa.Table.from_batches([with_run_id(b, run_id) for b in table.to_batches()], schema=table.schema)


def synthesize_run(run_dir: str, rows: int, *, num_classes: int = NUM_CLASSES, seed: int = 0,
                   chunk: int = CHUNK, rows_per_file: int = ROWS_PER_FILE, num_errors: int = 100,
                   run_id: str = "bench") -> dict:
    """Writes a run folder of `rows` heatmap rows; returns the counts the manifest must report."""
    from pipeline.runs.manifest import save_manifest

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(run_dir, "heatmaps"), exist_ok=True)
    totals = dict.fromkeys(("confident_wrong", "low_confidence", "attention_outside_box", "attention_on_border"), 0)
    played = hits = 0
    files = max(1, -(-rows // rows_per_file))
    start = 0
    for part in range(files):
        stop = min(rows, start + rows_per_file)
        path = os.path.join(run_dir, "heatmaps", f"part-{part:05d}-of-{files:05d}.parquet")
        writer = None
        for begin in range(start, stop, chunk):
            table = _stamped(_heatmap_chunk(rng, begin, min(chunk, stop - begin), num_classes), run_id)
            for flag in totals:
                totals[flag] += int(np.sum(table.column(flag).fill_null(False).to_numpy()))
            boxed = table.column("peak_in_box").drop_null().to_numpy()
            played, hits = played + len(boxed), hits + int(boxed.sum())
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="snappy")
            writer.write_table(table)
        if writer is not None:
            writer.close()
        start = stop
    for name, table in (("class_stats", _class_stats(rng, num_classes, rows)),
                        ("exemplars", _exemplars(rng, totals, num_classes)),
                        ("clusters", _clusters(rng, num_classes, rows)), ("errors", _errors(num_errors))):
        os.makedirs(os.path.join(run_dir, name), exist_ok=True)
        pq.write_table(_stamped(table, run_id), os.path.join(run_dir, name, "part-00000-of-00001.parquet"))
    counts = {
        "records_read": rows + num_errors, "images_explained": rows,
        "records_rejected": {"decode": num_errors, "compute": 0}, "shard_errors": 1,
        "errors_by_kind": {"decode/NotAnImage": num_errors, "read/CorruptRecord": 1},
        "rows": {"heatmaps": rows, "class_stats": num_classes, "errors": num_errors + 1},
    }
    attention = {"pointing_accuracy": hits / played if played else None, "pointing_images": played,
                 "shortcut_classes": [SHORTCUT_CLASS]}
    save_manifest(run_dir, {
        "run_id": run_id, "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output": run_dir, "run_dir": run_dir, "counts": counts, "attention": attention,
        "model": {"uri": "synthetic://resnet50", "fingerprint": f"synthetic-{seed}",
                  "target_layer": "conv5_block3_out"},
        "options": {"method": "gradcam", "target": "predicted", "image_key": "image/encoded"},
    })
    return {"counts": counts, "attention": attention, "flag_totals": totals}


# ----------------------------------------------------------- measurement ----


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_step(step: str, run_dir: str, baseline: str) -> dict:
    """Runs one launcher step in this process; returns its result summary and peak RSS."""
    started = time.time()
    if step == "manifest":
        from pipeline.runs.manifest import attention_summary, count_outputs

        out = {"counts": count_outputs(run_dir), "attention": attention_summary(run_dir)}
    elif step == "compare":
        from pipeline.runs.compare import main as compare_main

        out = {"exit_status": compare_main(["--baseline", baseline, "--current", run_dir, "--quiet"])}
    elif step == "report":
        from pipeline.report.page import main as report_main

        out = {"exit_status": report_main([run_dir]),
               "report_bytes": os.path.getsize(os.path.join(run_dir, "report.html"))}
    else:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    return {**out, "step_seconds": round(time.time() - started, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_step_process(step: str, run_dir: str, baseline: str) -> dict:
    """`measure_step` in a fresh Python process; adds the command's wall time (imports included)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "_measure", step, run_dir, baseline],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bench.scale step {step} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(wall, 3)
    return result


def _folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files) / 2**20


def measure_scale(rows_list: list[int], workdir: str, *, keep: bool = False) -> dict:
    """Synthesises a run per N and times the three steps; the results dict (see module docstring)."""
    baseline = os.path.join(workdir, "run=baseline")
    synthesize_run(baseline, 10_000, seed=1, run_id="baseline")
    results = {}
    for rows in rows_list:
        run_dir = os.path.join(workdir, f"run={rows}")
        log(f"synthesising {rows:,} heatmap rows in {run_dir}")
        started = time.time()
        truth = synthesize_run(run_dir, rows, run_id=str(rows))
        entry = {"rows": rows, "synth_seconds": round(time.time() - started, 1),
                 "parquet_mb": round(_folder_mb(run_dir), 1)}
        for step in STEPS:
            entry[step] = run_step_process(step, run_dir, baseline)
            log(f"  {step}: {entry[step]['wall_seconds']:.1f} s, peak RSS {entry[step]['peak_rss_mb']:.0f} MB")
        got = entry["manifest"]
        entry["counts_match"] = got["counts"] == truth["counts"] and got["attention"] == truth["attention"]
        results[str(rows)] = entry
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return results


def verdicts(results: dict) -> dict:
    """The acceptance checks that the measured sizes allow."""
    out = {}
    one = results.get("1000000")
    if one:
        out["report_1M_seconds<=60"] = one["report"]["wall_seconds"] <= REPORT_LIMIT_SECONDS
        out["report_1M_rss<=1.5GB"] = one["report"]["peak_rss_mb"] <= REPORT_LIMIT_MB
    ten = results.get("10000000")
    if one and ten:
        for step in STEPS:
            ratio = ten[step]["peak_rss_mb"] / one[step]["peak_rss_mb"]
            out[f"{step}_rss_10M/1M<=1.2"] = ratio <= RSS_RATIO_LIMIT
    out["counts_match"] = all(e["counts_match"] for e in results.values())
    return out


def table(results: dict) -> str:
    lines = [f"{'rows':>11} {'parquet MB':>10} " + " ".join(f"{s + ' s':>11} {s + ' MB':>11}" for s in STEPS)]
    for e in results.values():
        lines.append(f"{e['rows']:>11,} {e['parquet_mb']:>10.0f} "
                     + " ".join(f"{e[s]['wall_seconds']:>11.1f} {e[s]['peak_rss_mb']:>11.0f}" for s in STEPS))
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":  # the child process of run_step_process
        print(json.dumps(measure_step(*argv[1:4])))
        return {}
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="Comma-separated heatmap row counts")
    parser.add_argument("--workdir", default=None, help="Where the run folders go (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="Keep the synthesised run folders")
    parser.add_argument("--json", default=DEFAULT_JSON, help="Where to write the results")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gradcam-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        results = measure_scale([int(r) for r in args.rows.split(",")], workdir, keep=args.keep)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    out = {"meta": {"command": " ".join(["python -m bench.scale", *argv]),
                    "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]},
           "runs": results, "verdicts": verdicts(results)}
    print(table(results))
    print(json.dumps(out["verdicts"], indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
