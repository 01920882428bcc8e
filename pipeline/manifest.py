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


def write_manifest(config, info, files, result, *, beam_args, timings) -> dict:
    """Writes `<output>/run_manifest.json` and returns it."""
    counts = count_outputs(config.output)
    counters = runner_counters(result)
    if "records_read" in counters:
        counts["records_read_by_runner"] = counters["records_read"]
        counts["balanced"] = counters["records_read"] == counts["records_read"]
    manifest = {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "state": str(getattr(result, "state", "")),
        "output": config.output,
        "tables": {t: f"{config.output}/{t}/" for t in TABLES},
        "shards": files,
        "counts": counts,
        "model": {"uri": config.model, "fingerprint": info.fingerprint, **info.as_json()},
        "options": config.as_json(),
        "beam_args": beam_args,
        "versions": library_versions(),
        "timings": timings,
    }
    with FileSystems.create(f"{config.output}/{MANIFEST_NAME}") as handle:
        handle.write(json.dumps(manifest, indent=2, default=str).encode("utf-8"))
    return manifest
