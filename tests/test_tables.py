"""The table registry (`transforms.tables`, issue 23): its entries, and a table added by one entry alone
(with its transform) being written, listed, counted and read like the others."""

from __future__ import annotations

import sys

import apache_beam as beam
import pyarrow as pa
import pytest

from pipeline.graph import run
from pipeline.runs.manifest import read_table
from tests.helpers import parquet_schema
from transforms import schemas, tables
from transforms.tables import REGISTRY, TABLES, Table, table_named

JOB_TABLES = ("heatmaps", "class_stats", "clusters", "errors", "exemplars")  # wired in ExplainDataset itself


def test_the_registry_holds_the_tables_in_their_order():
    first = REGISTRY[:len(JOB_TABLES)]  # a new table is appended after them
    assert TABLES[:len(JOB_TABLES)] == JOB_TABLES and len(set(TABLES)) == len(TABLES)
    assert [t.step for t in first] == ["Heatmaps", "ClassStats", "Clusters", "Errors", "Exemplars"]
    assert [t.name for t in first if t.counted] == ["heatmaps", "class_stats", "errors"]
    assert [t.name for t in first if t.batches] == ["heatmaps"]
    assert all(t.derive is None for t in first) and all(table_named(t.name) is t for t in REGISTRY)
    with pytest.raises(KeyError):
        table_named("comparison")  # a file of the run (pipeline.runs.compare), not a table of the job


def test_schemas_single_and_multi_label():
    assert table_named("heatmaps").schema_for(False) is schemas.HEATMAP_SCHEMA
    assert table_named("heatmaps").schema_for(True) is schemas.MULTILABEL_HEATMAP_SCHEMA
    assert table_named("class_stats").schema_for(True) is schemas.MULTILABEL_CLASS_STATS_SCHEMA
    assert table_named("errors").schema_for(True) is schemas.ERROR_SCHEMA
    for table in REGISTRY:
        for multilabel in (False, True):
            assert table.schema_for(multilabel).field("run_id") == schemas.RUN_ID_FIELD


def test_empty_table_is_the_single_label_schema_or_its_columns():
    assert table_named("heatmaps").empty().schema.equals(schemas.HEATMAP_SCHEMA)
    empty = table_named("class_stats").empty(["class_id", "shortcut"])
    assert empty.num_rows == 0 and empty.column_names == ["class_id", "shortcut"]


def test_derive_and_source_go_together():
    with pytest.raises(ValueError, match="derive and source"):
        Table("t", schemas.ERROR_SCHEMA, derive=lambda config: beam.Map(dict))
    with pytest.raises(ValueError, match="derive and source"):
        Table("t", schemas.ERROR_SCHEMA, source="class_stats")


# A table made from another table's rows: one row per class, the images it predicted.
PREDICTED_SCHEMA = pa.schema([pa.field("class_id", pa.int64(), nullable=False),
                              pa.field("num_predicted", pa.int64(), nullable=False), schemas.RUN_ID_FIELD])
PREDICTED = Table("predicted", PREDICTED_SCHEMA, counted=True, source="class_stats",
                  derive=lambda config: beam.Map(lambda s: {"class_id": s["class_id"],
                                                            "num_predicted": s["num_predicted"]}))


def register(monkeypatch, table: Table) -> None:
    """Adds `table` to the registry for the test, in every module that imported the registry by name."""
    registry = (*REGISTRY, table)
    names = tuple(t.name for t in registry)
    for module in list(sys.modules.values()):
        if getattr(module, "REGISTRY", None) is REGISTRY:
            monkeypatch.setattr(module, "REGISTRY", registry)
        if getattr(module, "TABLES", None) is TABLES:
            monkeypatch.setattr(module, "TABLES", names)
    monkeypatch.setitem(tables._BY_NAME, table.name, table)


def test_a_table_added_by_one_entry_is_written_listed_and_counted(dataset, model_path, tmp_path, monkeypatch):
    register(monkeypatch, PREDICTED)
    _, manifest = run(["--input", dataset["pattern"], "--model", model_path, "--output", str(tmp_path),
                       "--batch_size", "4", "--max_image_pixels", "1000000", "--run_id", "test", "--report=false"])
    run_dir = manifest["output"]
    assert manifest["tables"]["predicted"] == f"{run_dir}/predicted/"
    stats = read_table(run_dir, "class_stats", ["class_id", "num_predicted"]).to_pylist()
    rows = read_table(run_dir, "predicted").to_pylist()
    assert sorted(rows, key=lambda r: r["class_id"]) == sorted(
        [{**s, "run_id": "test"} for s in stats], key=lambda r: r["class_id"])
    assert manifest["counts"]["rows"]["predicted"] == len(rows) == len(stats)
    assert parquet_schema(f"{run_dir}/predicted").equals(PREDICTED_SCHEMA)
    assert read_table(str(tmp_path / "nothing"), "predicted").schema.equals(PREDICTED_SCHEMA)
