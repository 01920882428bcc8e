"""Dict rows -> Arrow batches (`ToRecordBatches`) and batches -> Parquet (`WriteParquetTable(batches=True)`)."""

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.helpers import parquet_schema, read_parquet_dir
from transforms.schemas import RUN_ID_FIELD, SCHEMA_VERSION, SCHEMA_VERSION_KEY
from transforms.sinks import ToRecordBatches, WriteParquetTable, _GatherTables

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("cam", pa.list_(pa.float32()), nullable=False),
    pa.field("score", pa.float64()),
])


def _rows(n):
    # Every 7th row lacks the nullable "score"; every row has a key the schema does not know.
    return [{"image_id": f"im-{i:04d}", "cam": [float(i), 0.5], "extra": i,
             **({} if i % 7 == 0 else {"score": i / 10})} for i in range(n)]


def test_rows_become_batches_of_the_schema_and_are_written_as_one_table(tmp_path):
    rows = _rows(300)
    want = [{"image_id": r["image_id"], "cam": r["cam"], "score": r.get("score")} for r in rows]
    with TestPipeline() as p:
        batches = p | beam.Create(rows) | ToRecordBatches(SCHEMA, rows=64)
        assert_that(batches | beam.Map(lambda b: b.schema.equals(SCHEMA) and 0 < b.num_rows <= 64) | beam.Distinct(),
                    equal_to([True]), label="BatchesOfTheSchema")
        assert_that(batches | beam.FlatMap(lambda b: b.to_pylist()), equal_to(want), label="EveryRowOnce")
        batches | WriteParquetTable(str(tmp_path), "t", SCHEMA, batches=True, run_id="2026-01-01")
    # the sink adds the run's id to every row, and the schema version to the files' metadata
    written = parquet_schema(str(tmp_path / "t"))
    assert written.equals(SCHEMA.append(RUN_ID_FIELD))
    assert written.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    table = read_parquet_dir(str(tmp_path / "t"))
    assert sorted(table.to_pylist(), key=lambda r: r["image_id"]) == [{**r, "run_id": "2026-01-01"} for r in want]


def test_dict_rows_get_the_run_id_and_the_version(tmp_path):
    rows = [{"image_id": f"im-{i}", "cam": [0.5], "score": None} for i in range(5)]
    with TestPipeline() as p:
        p | beam.Create(rows) | WriteParquetTable(str(tmp_path), "t", SCHEMA.append(RUN_ID_FIELD), run_id="nightly")
    written = parquet_schema(str(tmp_path / "t"))
    assert written.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert read_parquet_dir(str(tmp_path / "t")).column("run_id").to_pylist() == ["nightly"] * 5


def test_the_run_id_is_required():
    with pytest.raises(ValueError, match="run id"):
        WriteParquetTable("/tmp/x", "t", SCHEMA, run_id="")


def test_gather_tables_makes_a_table_per_limit_and_one_with_the_rest():
    batches = [pa.RecordBatch.from_pylist(_rows(300)[i:i + 50], schema=SCHEMA) for i in range(0, 300, 50)]
    empty = pa.RecordBatch.from_pylist([], schema=SCHEMA)
    gather = _GatherTables(SCHEMA, limit=2 * batches[0].nbytes)  # a table every 2 batches
    gather.start_bundle()
    tables = [t for b in [batches[0], empty, *batches[1:]] for t in gather.process(b)]
    rest = [wv.value for wv in gather.finish_bundle()]
    assert [t.num_rows for t in tables] == [100, 100, 100] and rest == []
    gather.start_bundle()
    tables = [t for b in batches[:3] for t in gather.process(b)]
    rest = [wv.value for wv in gather.finish_bundle()]
    assert [t.num_rows for t in tables] == [100] and [t.num_rows for t in rest] == [50]
    assert pa.concat_tables([*tables, *rest]).to_pylist() == pa.Table.from_batches(batches[:3]).to_pylist()


def test_small_record_batches_are_coalesced_in_order_into_batches_of_the_size():
    """CoalesceRecordBatches (the job's BatchRows, after FormatHeatmapRows' one batch per explained batch):
    within a bundle, batches of exactly `rows` rows in the rows' order, the bundle's rest last; empty
    batches dropped."""
    from transforms.sinks import _Coalesce

    rows = [{"image_id": r["image_id"], "cam": r["cam"], "score": r.get("score")} for r in _rows(300)]
    sizes = [32, 0, 32, 17, 64, 1, 96, 58]
    assert sum(sizes) == len(rows)
    small, start = [], 0
    for n in sizes:
        small.append(pa.RecordBatch.from_pylist(rows[start:start + n], schema=SCHEMA))
        start += n
    coalesce = _Coalesce(64)
    coalesce.start_bundle()
    out = [b for s in small for b in coalesce.process(s)] + [w.value for w in coalesce.finish_bundle()]
    assert [b.num_rows for b in out] == [64, 64, 64, 64, 44]
    assert all(b.schema.equals(SCHEMA) for b in out)
    assert [r for b in out for r in b.to_pylist()] == rows
