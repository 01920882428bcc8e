"""The run manifest: counts read back from the written tables, and what ran.

Counts come from the Parquet files themselves (not from runner metrics, which
some runners do not report), so they describe exactly what was written:
records_read == images_explained + sum(records_rejected).
"""

from __future__ import annotations

import collections
import datetime
import json
import platform
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.schemas import STAGES
from transforms.sinks import TABLES

MANIFEST_NAME = "run_manifest.json"


def read_table(output: str, table: str, columns: Optional[list[str]] = None) -> pa.Table:
    """Reads `<output>/<table>/*.parquet` (local or gs://) into one Arrow table."""
    paths = sorted(m.path for m in FileSystems.match([f"{output}/{table}/*.parquet"])[0].metadata_list)
    tables = []
    for path in paths:
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(pa.BufferReader(handle.read()), columns=columns))
    if not tables:
        from transforms import schemas

        schema = {"heatmaps": schemas.HEATMAP_SCHEMA, "class_stats": schemas.CLASS_STATS_SCHEMA,
                  "errors": schemas.ERROR_SCHEMA}[table]
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables(tables)


def count_outputs(output: str) -> dict:
    """Counts per table and the record accounting."""
    heat = read_table(output, "heatmaps", ["target_rank"]).column("target_rank").to_pylist()
    errors = read_table(output, "errors", ["stage", "error"]).to_pylist()
    by_stage = collections.Counter(e["stage"] for e in errors)
    by_error = collections.Counter(f"{e['stage']}/{e['error']}" for e in errors)
    explained = sum(1 for rank in heat if rank == 0)
    rejected = {stage: by_stage.get(stage, 0) for stage in STAGES if stage != "read"}
    return {
        "records_read": explained + sum(rejected.values()),
        "images_explained": explained,
        "records_rejected": rejected,
        "shard_errors": by_stage.get("read", 0),
        "errors_by_kind": dict(sorted(by_error.items())),
        "rows": {
            "heatmaps": len(heat),
            "class_stats": read_table(output, "class_stats", ["class_id"]).num_rows,
            "errors": len(errors),
        },
    }


def runner_counters(result) -> dict:
    """The job's own counters (namespace gradcam_audit), where the runner reports them."""
    try:
        metrics = result.metrics().query()
    except (NotImplementedError, AttributeError, ValueError):
        return {}
    counters = collections.Counter()
    for counter in metrics.get("counters", []):
        if counter.key.metric.namespace == "gradcam_audit":
            counters[counter.key.metric.name] += counter.committed or counter.attempted or 0
    return dict(counters)


def library_versions() -> dict:
    import apache_beam
    import keras
    import numpy
    import tensorflow

    return {
        "python": platform.python_version(),
        "apache_beam": apache_beam.__version__,
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "pyarrow": pa.__version__,
        "numpy": numpy.__version__,
    }


def attention_summary(output: str) -> dict:
    """Dataset-wide pointing game and the classes flagged as possible shortcuts."""
    hits = read_table(output, "heatmaps", ["target_rank", "peak_in_box"]).to_pylist()
    played = [r["peak_in_box"] for r in hits if r["target_rank"] == 0 and r["peak_in_box"] is not None]
    stats = read_table(output, "class_stats", ["class_id", "shortcut"]).to_pylist()
    return {
        "pointing_accuracy": sum(played) / len(played) if played else None,
        "pointing_images": len(played),
        "shortcut_classes": sorted(r["class_id"] for r in stats if r["shortcut"]),
    }


def faithfulness_summary(output: str) -> Optional[dict]:
    """The job's faithfulness.json (mean gap with its bootstrap interval, sanity check), or None.

    Computed in the job (transforms/faithfulness.py) from sufficient statistics
    and a bounded sample: the launcher reads one small JSON file, not the heatmaps.
    """
    from transforms.faithfulness import FAITHFULNESS_SUMMARY

    return read_json(f"{output.rstrip('/')}/{FAITHFULNESS_SUMMARY}")


def write_manifest(config, info, files, result, *, beam_args, timings, run: Optional[dict] = None,
                   write_to: Optional[str] = None) -> dict:
    """Writes `<write_to>/run_manifest.json` and returns it.

    Args:
      run: {"run_id", "run_dir", "started_at"}: where the run will live once
        swapped in (`pipeline.history`); the manifest's "output" and "tables"
        name that final folder.
      write_to: the folder the tables were written to and the manifest goes
        to (the run's temp folder); default `config.output`.
    """
    write_to = (write_to or config.output).rstrip("/")
    run = run or {}
    final = run.get("run_dir", write_to)
    counts = count_outputs(write_to)
    counters = runner_counters(result)
    if "records_read" in counters:
        counts["records_read_by_runner"] = counters["records_read"]
        counts["balanced"] = counters["records_read"] == counts["records_read"]
    manifest = {
        "run_id": run.get("run_id"),
        "started_at": run.get("started_at"),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "state": str(getattr(result, "state", "")),
        "output": final,
        "output_root": config.output,
        "run_dir": final,
        "tables": {t: f"{final}/{t}/" for t in TABLES},
        "shards": files,
        "counts": counts,
        "attention": attention_summary(write_to),
        "faithfulness": faithfulness_summary(write_to),
        "model": {"uri": config.model, "fingerprint": info.fingerprint, **info.as_json()},
        "options": config.as_json(),
        "beam_args": beam_args,
        "versions": library_versions(),
        "timings": timings,
    }
    save_manifest(write_to, manifest)
    return manifest


def read_json(path: str) -> Optional[dict]:
    """A JSON file through Beam's FileSystems (local or remote), or None when it does not exist."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON through Beam's FileSystems."""
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(value, indent=2, default=str).encode("utf-8"))


def save_manifest(folder: str, manifest: dict) -> None:
    """(Re)writes `<folder>/run_manifest.json`."""
    write_json(f"{folder.rstrip('/')}/{MANIFEST_NAME}", manifest)


def load_manifest(folder: str) -> dict:
    """Reads `<folder>/run_manifest.json` (FileNotFoundError when absent)."""
    path = f"{folder.rstrip('/')}/{MANIFEST_NAME}"
    manifest = read_json(path)
    if manifest is None:
        raise FileNotFoundError(path)
    return manifest
