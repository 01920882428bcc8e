"""Rows of the errors table: every rejected record, with its raw bytes."""

from __future__ import annotations

from typing import Any, Optional

ERRORS_TAG = "errors"


def error_row(
    *,
    source: str,
    record_index: Optional[int],
    stage: str,
    error: str,
    message: str,
    raw_record: Optional[bytes],
    image_id: Optional[str] = None,
) -> dict[str, Any]:
    """One row of `transforms.schemas.ERROR_SCHEMA`."""
    return {
        "source": source,
        "record_index": record_index,
        "image_id": image_id,
        "stage": stage,
        "error": error,
        "message": message,
        "raw_record": raw_record,
    }


class RecordError(Exception):
    """A record that cannot be explained: `error` is a short CamelCase kind."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error
        self.message = message
