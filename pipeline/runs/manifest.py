"""The run manifest: counts read back from the written tables, and what ran.

Counts come from the Parquet files themselves (not from runner metrics, which
some runners do not report), so they describe exactly what was written:
records_read == images_explained + sum(records_rejected); the job's own count of
the records its read step emitted must equal that (counts["balanced"]). Built by
the job's last stage (`pipeline.finalize`), not by the launcher.

Memory does not grow with the run: row counts come from the Parquet footers,
the rest from a few projected columns scanned in record batches
(`iter_batches`), never from whole tables turned into Python objects.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import platform
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.schemas import SCHEMA_VERSION, STAGES, check_schema_version, version_of
from transforms.tables import REGISTRY, TABLES, table_named

MANIFEST_NAME = "run_manifest.json"


BATCH_ROWS = 65_536  # rows per record batch when a launcher-side step scans a big table


def table_files(output: str, table: str) -> list[str]:
    """The Parquet files of `<output>/<table>/` (local or gs://), sorted."""
    return sorted(m.path for m in FileSystems.match([f"{output}/{table}/*.parquet"])[0].metadata_list)


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A ParquetFile on a local path or any Beam filesystem (read lazily, never whole); AuditError when
    it was written with a table schema version this release does not know (`transforms.schemas`)."""
    if "://" not in path:
        with pq.ParquetFile(path) as parquet:
            check_schema_version(version_of(parquet.schema_arrow.metadata), path)
            yield parquet
        return
    with FileSystems.open(path) as handle, pq.ParquetFile(handle) as parquet:
        check_schema_version(version_of(parquet.schema_arrow.metadata), path)
        yield parquet


def read_table(output: str, table: str, columns: Optional[list[str]] = None) -> pa.Table:
    """Reads `<output>/<table>/*.parquet` (local or gs://) into one Arrow table.

    For the small tables (class_stats, exemplars, errors of a healthy run) and tests;
    launcher code scans heatmaps with `iter_batches` instead. A table without files reads as its
    registry entry's empty table (`transforms.tables`).
    """
    tables = []
    for path in table_files(output, table):
        with open_parquet(path) as parquet:
            tables.append(parquet.read(columns=columns))
    return pa.concat_tables(tables) if tables else table_named(table).empty(columns)


def iter_batches(output: str, table: str, columns: list[str], batch_size: Optional[int] = None
                 ) -> Iterator[pa.RecordBatch]:
    """The `columns` of a table in record batches (default `BATCH_ROWS` rows): memory of one row
    group's projected columns, whatever the table's size."""
    for path in table_files(output, table):
        with open_parquet(path) as parquet:
            yield from parquet.iter_batches(batch_size=batch_size or BATCH_ROWS, columns=columns)


def count_rows(output: str, table: str) -> int:
    """Rows of a table, from the Parquet footers alone."""
    total = 0
    for path in table_files(output, table):
        with open_parquet(path) as parquet:
            total += parquet.metadata.num_rows
    return total


def count_values(output: str, table: str, columns: list[str]) -> collections.Counter:
    """How often each combination of `columns` occurs (tuples as keys), scanned in batches."""
    counts = collections.Counter()
    for batch in iter_batches(output, table, columns):
        if batch.num_rows:
            grouped = pa.Table.from_batches([batch]).group_by(columns).aggregate([([], "count_all")])
            for row in grouped.to_pylist():  # one row per distinct combination
                counts[tuple(row[c] for c in columns)] += row["count_all"]
    return counts


def count_outputs(output: str) -> dict:
    """Counts per table and the record accounting (footers and batched column scans only)."""
    explained = sum(count for (rank,), count in count_values(output, "heatmaps", ["target_rank"]).items()
                    if rank == 0)
    errors = count_values(output, "errors", ["stage", "error"])
    by_stage = collections.Counter()
    for (stage, _), count in errors.items():
        by_stage[stage] += count
    by_error = {f"{stage}/{error}": count for (stage, error), count in errors.items()}
    rejected = {stage: by_stage.get(stage, 0) for stage in STAGES if stage != "read"}
    return {
        "records_read": explained + sum(rejected.values()),
        "images_explained": explained,
        "records_rejected": rejected,
        "shard_errors": by_stage.get("read", 0),
        "errors_by_kind": dict(sorted(by_error.items())),
        "rows": {table.name: count_rows(output, table.name) for table in REGISTRY if table.counted},
    }


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
    """Dataset-wide pointing game (rank-0 rows with boxes) and the classes flagged as possible shortcuts."""
    import pyarrow.compute as pc

    played = hits = 0
    for batch in iter_batches(output, "heatmaps", ["target_rank", "peak_in_box"]):
        first = pc.equal(batch.column("target_rank"), 0)
        boxed = pc.and_(first, pc.is_valid(batch.column("peak_in_box")))
        played += pc.sum(boxed).as_py() or 0
        hits += pc.sum(pc.and_(boxed, batch.column("peak_in_box"))).as_py() or 0
    stats = read_table(output, "class_stats", ["class_id", "shortcut"])
    return {
        "pointing_accuracy": hits / played if played else None,
        "pointing_images": played,
        "shortcut_classes": sorted(r["class_id"] for r in stats.to_pylist() if r["shortcut"]),
    }


def faithfulness_summary(output: str) -> Optional[dict]:
    """The job's faithfulness.json (mean gap with its bootstrap interval, sanity check), or None.

    Computed in the job (transforms/checks.py) from sufficient statistics
    and a bounded sample: the launcher reads one small JSON file, not the heatmaps.
    """
    from transforms.checks import FAITHFULNESS_SUMMARY

    return read_json(f"{output.rstrip('/')}/{FAITHFULNESS_SUMMARY}")


def build_manifest(settings: dict, folder: str, final: str, *, job: Optional[dict], timings: dict,
                   records_read: Optional[int] = None) -> dict:
    """The manifest of the run whose tables are in `folder` (pipeline.finalize, in the job or the command).

    Args:
      settings: `pipeline.finalize.launch_settings` (plain values: options, model, shards, ...).
      folder: where the tables are (the run's temp folder, or the run folder itself).
      final: where the run lives once moved into place; the manifest's "output" and "tables" name it.
      job: {"runner", "id", "url"}: which runner job made the run (`pipeline.finalize.job_of`).
      records_read: the job's own count of the records its read step emitted: the tables must account
        for every one of them (counts["balanced"]).
    """
    folder = folder.rstrip("/")
    counts = count_outputs(folder)
    if records_read is not None:
        counts["records_read_by_runner"] = records_read
        counts["balanced"] = records_read == counts["records_read"]
    return {
        "run_id": settings["run_id"],
        "schema_version": SCHEMA_VERSION,  # of the tables (transforms.schemas); runs before it had none (0)
        "attempt": settings["attempt"],
        "started_at": settings.get("started_at"),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "state": "DONE",
        "job": job,
        "output": final,
        "output_root": settings["output"],
        "run_dir": final,
        "tables": {t: f"{final}/{t}/" for t in TABLES},
        "shards": settings.get("shards"),
        "counts": counts,
        "attention": attention_summary(folder),
        "faithfulness": faithfulness_summary(folder),
        "model": settings.get("model"),
        "options": settings.get("options"),
        "beam_args": settings.get("beam_args"),
        "versions": library_versions(),
        "timings": timings,
    }


def read_json(path: str) -> Optional[dict]:
    """A JSON file through Beam's FileSystems (local or remote), or None when it does not exist."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON, whole: readers never see half a file.

    Local files go through a temp file and a rename; on object stores
    (gs://, through Beam's FileSystems) one object write already is whole.
    """
    data = json.dumps(value, indent=2, default=str).encode("utf-8")
    if FileSystems.get_scheme(path) not in (None, "file"):
        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    import os
    import uuid

    local = path[len("file://"):] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    temp = f"{local}.tmp-{uuid.uuid4().hex[:10]}"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, local)


def save_manifest(folder: str, manifest: dict) -> None:
    """(Re)writes `<folder>/run_manifest.json`."""
    write_json(f"{folder.rstrip('/')}/{MANIFEST_NAME}", manifest)


def load_manifest(folder: str) -> dict:
    """Reads `<folder>/run_manifest.json` (FileNotFoundError when absent; AuditError when the run's
    schema version is unknown to this release)."""
    path = f"{folder.rstrip('/')}/{MANIFEST_NAME}"
    manifest = read_json(path)
    if manifest is None:
        raise FileNotFoundError(path)
    check_schema_version(manifest.get("schema_version", 0), path)
    return manifest
