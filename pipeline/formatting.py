"""Text helpers shared by the report's pages: escaping, numbers, class names, data: URIs.

One place for what `pipeline.report.page` and `pipeline.report.strategies` both
write into their HTML, so neither imports the other's private helpers.
"""

from __future__ import annotations

import base64
import html

import numpy as np


def esc(value) -> str:
    """`value` as HTML text ("" for None)."""
    return html.escape("" if value is None else str(value))


def fmt(value, spec: str = ".2f") -> str:
    """A number as text with `spec`; "-" for None, NaN or infinity."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def class_name(names: dict, class_id) -> str:
    """"<id> <name>" of a class ("<id>" without a name, "-" for None); `names`: {class id: name}."""
    if class_id is None:
        return "-"
    name = names.get(int(class_id))
    return f"{class_id} {name}" if name else str(class_id)


def data_uri(data: bytes, mime: str) -> str:
    """`data` as a data: URI (the report embeds every image)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
