"""Columns of Arrow record batches of heatmap rows as numpy arrays (what the batched steps compute on)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def cam_matrix(batch: pa.RecordBatch, rows: np.ndarray, size: int) -> np.ndarray:
    """The `cam` lists of `rows` of an Arrow batch of heatmap rows as one [len(rows), size] float32
    matrix (each of length `size`), read off the list column's offsets."""
    cams = batch.column("cam")
    offsets = np.asarray(cams.offsets)
    values = cams.values.to_numpy(zero_copy_only=False)
    return values[offsets[rows][:, None] + np.arange(size)[None, :]]


def numpy_column(batch: pa.RecordBatch, name: str, dtype=np.float64) -> np.ndarray:
    """An Arrow column as numpy, nulls as NaN (floats) or -1 (ints); booleans read as floats are 0.0 / 1.0."""
    column = batch.column(name)
    if pa.types.is_boolean(column.type) and np.issubdtype(dtype, np.floating):
        column = column.cast(pa.float64())
    if column.null_count:
        column = column.fill_null(-1 if np.issubdtype(dtype, np.integer) else np.nan)
    return column.to_numpy(zero_copy_only=False).astype(dtype)
