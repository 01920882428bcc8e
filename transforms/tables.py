"""The table registry: every Parquet table a run writes, and what each one needs, in one place.

Everything that handles the tables reads `REGISTRY` in a loop: the graph (`pipeline.graph`: one
`Write<Table>` step per entry, fed by the `ExplainDataset` output of the table's name), the manifest
(`pipeline.runs.manifest`: the "tables" it lists, the rows it counts, the empty table an absent folder
reads as) and the launcher (`pipeline.graph.clear_outputs`, `build_job_only`). A new table is one
`Table` entry here plus the transform that makes its rows (docs/architecture.md, "A table").

The schemas themselves are in `transforms.schemas`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pyarrow as pa

from transforms.schemas import (
    CLASS_STATS_SCHEMA,
    CLUSTER_SCHEMA,
    ERROR_SCHEMA,
    EXEMPLAR_SCHEMA,
    HEATMAP_SCHEMA,
    MULTILABEL_CLASS_STATS_SCHEMA,
    MULTILABEL_HEATMAP_SCHEMA,
)


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of a run: the Parquet files `<run>/<name>/part-SSSSS-of-NNNNN.parquet`.

    Attributes:
      name: the table's folder, and the `ExplainDataset` output (`pipeline.graph`) that holds its rows.
      schema: its Arrow schema (`transforms.schemas`; `run_id` included).
      multilabel_schema: its schema in a multi-label run (`--label_format index|multi_hot`) when that
        differs; None: `schema` in every run.
      batches: its rows come as Arrow RecordBatches of the schema, not as dicts
        (`transforms.sinks.WriteParquetTable(batches=True)`).
      counted: the manifest counts its rows (`counts["rows"]`, read from the Parquet footers).
      derive: for a table made from the rows of another `ExplainDataset` output (`source`): a function
        of the run's `pipeline.options.AuditConfig` giving the PTransform that makes them (its Beam step
        is `Make<Table>`, inside ExplainDataset). None: the step that makes the rows is wired in
        `ExplainDataset` itself, as for the tables it was written with.
      source: the output `derive` reads (a table's name, or another output of `ExplainDataset`).
    """

    name: str
    schema: pa.Schema
    multilabel_schema: Optional[pa.Schema] = None
    batches: bool = False
    counted: bool = False
    derive: Optional[Callable] = None
    source: Optional[str] = None

    def __post_init__(self):
        if (self.derive is None) != (self.source is None):
            raise ValueError(f"Table {self.name!r}: give derive and source together (or neither)")

    @property
    def step(self) -> str:
        """The CamelCase name of its Beam steps: "class_stats" -> "ClassStats" (`WriteClassStats`)."""
        return "".join(part.capitalize() for part in self.name.split("_"))

    def schema_for(self, multilabel: bool = False) -> pa.Schema:
        """The schema the table is written with in a single- or multi-label run."""
        return self.multilabel_schema if multilabel and self.multilabel_schema is not None else self.schema

    def empty(self, columns: Optional[list[str]] = None) -> pa.Table:
        """The table with no rows (what a run without its files reads as), of `columns` when given."""
        empty = self.schema.empty_table()
        return empty.select(columns) if columns else empty


# In the order the graph writes them and the manifest lists them.
REGISTRY = (
    Table("heatmaps", HEATMAP_SCHEMA, MULTILABEL_HEATMAP_SCHEMA, batches=True, counted=True),
    Table("class_stats", CLASS_STATS_SCHEMA, MULTILABEL_CLASS_STATS_SCHEMA, counted=True),
    Table("clusters", CLUSTER_SCHEMA),
    Table("errors", ERROR_SCHEMA, counted=True),
    Table("exemplars", EXEMPLAR_SCHEMA),
)

TABLES = tuple(table.name for table in REGISTRY)
_BY_NAME = {table.name: table for table in REGISTRY}


def table_named(name: str) -> Table:
    """The registry's entry for `name` (KeyError when no table has that name)."""
    return _BY_NAME[name]
