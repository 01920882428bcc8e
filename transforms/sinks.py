"""Parquet sinks for the tables (local or any Beam filesystem), and dict rows <-> Arrow batches."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms import window

from transforms.schemas import RUN_ID_FIELD, versioned

# Arrow data a writer gathers per bundle before it makes one Parquet row group of it (as Beam's
# WriteToParquet: 64 MiB).
ROW_GROUP_BYTES = 64 * 1024 * 1024


def table_prefix(output: str, table: str) -> str:
    """`<output>/<table>/part`: the shard prefix of one table."""
    return f"{output.rstrip('/')}/{table}/part"


class ToRecordBatches(beam.PTransform):
    """PCollection[dict row] -> PCollection[pa.RecordBatch] of up to `rows` rows each (`schema`'s
    columns; a key the schema lacks is dropped, a nullable column a row lacks is null).

    Batches are made within a bundle (Beam's BatchElements), so nothing waits for other workers."""

    def __init__(self, schema: pa.Schema, rows: int = 512):
        super().__init__()
        self._schema = schema
        self._rows = rows

    def expand(self, rows):
        schema = self._schema
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=self._rows, max_batch_size=self._rows)
            | "ToArrow" >> beam.Map(lambda batch: pa.RecordBatch.from_pylist(batch, schema=schema))
        )


class _Coalesce(beam.DoFn):
    """Arrow RecordBatches -> RecordBatches of exactly `rows` rows, in order (the bundle's last, fewer);
    empty batches are dropped."""

    def __init__(self, rows: int):
        self._rows = rows

    def start_bundle(self):
        self._pending: list = []
        self._count = 0

    def _take(self, n: int) -> pa.RecordBatch:
        table = pa.Table.from_batches(self._pending)
        head, rest = table.slice(0, n).combine_chunks(), table.slice(n)
        self._pending, self._count = rest.to_batches(), rest.num_rows
        (batch,) = head.to_batches()  # one chunk per column: one batch
        return batch

    def process(self, batch: pa.RecordBatch):
        if batch.num_rows == 0:
            return
        if not self._count and batch.num_rows == self._rows:
            yield batch
            return
        self._pending.append(batch)
        self._count += batch.num_rows
        while self._count >= self._rows:
            yield self._take(self._rows)

    def finish_bundle(self):
        if self._count:
            yield window.GlobalWindows.windowed_value(self._take(self._count))


class CoalesceRecordBatches(beam.PTransform):
    """PCollection[pa.RecordBatch] -> PCollection[pa.RecordBatch] of `rows` rows each (the last of a bundle
    fewer), the rows in their order: small batches (one per explained batch) gathered into the batches
    the steps after them take, whose cost is per batch. Within a bundle, as `ToRecordBatches`."""

    def __init__(self, rows: int = 512):
        super().__init__()
        self._rows = rows

    def expand(self, batches):
        return batches | "Coalesce" >> beam.ParDo(_Coalesce(self._rows))


class _GatherTables(beam.DoFn):
    """RecordBatches -> a pa.Table per ROW_GROUP_BYTES of them (and one with the rest of the bundle)."""

    def __init__(self, schema: pa.Schema, limit: int = ROW_GROUP_BYTES):
        self._schema = schema
        self._limit = limit

    def start_bundle(self):
        self._batches, self._bytes = [], 0

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._bytes = [], 0
        return table

    def process(self, batch: pa.RecordBatch):
        if batch.num_rows:
            self._batches.append(batch)
            self._bytes += batch.nbytes
        if self._bytes >= self._limit:
            yield self._table()

    def finish_bundle(self):
        if self._batches:
            yield window.GlobalWindows.windowed_value_at_end_of_window(self._table())


def with_run_id(batch: pa.RecordBatch, run_id: str) -> pa.RecordBatch:
    """`batch` with its `run_id` column set to `run_id` in every row (added at the end when it has none)."""
    column = pa.array([run_id] * batch.num_rows, pa.string())
    index = batch.schema.get_field_index("run_id")
    if index < 0:
        return pa.RecordBatch.from_arrays([*batch.columns, column], schema=batch.schema.append(RUN_ID_FIELD))
    arrays = [column if i == index else batch.column(i) for i in range(batch.num_columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


class WriteParquetTable(beam.PTransform):
    """Writes dict rows (or, with `batches`, Arrow RecordBatches of `schema`) to
    `<output>/<table>/part-SSSSS-of-NNNNN.parquet`.

    Every row gets `run_id` (a plain setting of the launcher, the same in every row: the column that lets
    many runs' tables be read together); the files' schema metadata records
    `transforms.schemas.SCHEMA_VERSION`."""

    def __init__(self, output: str, table: str, schema: pa.Schema, codec: str = "snappy", batches: bool = False,
                 *, run_id: str):
        super().__init__()
        if not run_id:
            raise ValueError(f"WriteParquetTable({table!r}): expected the run id, got {run_id!r}")
        self._prefix = table_prefix(output, table)
        self._schema = schema if "run_id" in schema.names else schema.append(RUN_ID_FIELD)
        self._codec = codec
        self._batches = batches
        self._run_id = str(run_id)

    def expand(self, rows):
        run_id = self._run_id
        written = versioned(self._schema)
        if self._batches:
            return (
                rows
                | "AddRunId" >> beam.Map(with_run_id, run_id)
                | "GatherTables" >> beam.ParDo(_GatherTables(self._schema))
                | "WriteToParquet" >> beam.io.WriteToParquetBatched(
                    self._prefix, written, codec=self._codec, file_name_suffix=".parquet")
            )
        return (
            rows
            | "AddRunId" >> beam.Map(lambda row: {**row, "run_id": run_id})
            | "WriteToParquet" >> beam.io.WriteToParquet(
                self._prefix,
                written,
                codec=self._codec,
                file_name_suffix=".parquet",
            )
        )
