"""Parquet sinks for the four tables (local or any Beam filesystem)."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

TABLES = ("heatmaps", "class_stats", "clusters", "errors", "exemplars")


def table_prefix(output: str, table: str) -> str:
    """`<output>/<table>/part`: the shard prefix of one table."""
    return f"{output.rstrip('/')}/{table}/part"


class WriteParquetTable(beam.PTransform):
    """Writes dict rows to `<output>/<table>/part-SSSSS-of-NNNNN.parquet`."""

    def __init__(self, output: str, table: str, schema: pa.Schema, codec: str = "snappy"):
        super().__init__()
        self._prefix = table_prefix(output, table)
        self._schema = schema
        self._codec = codec

    def expand(self, rows):
        return rows | "WriteToParquet" >> beam.io.WriteToParquet(
            self._prefix,
            self._schema,
            codec=self._codec,
            file_name_suffix=".parquet",
        )
