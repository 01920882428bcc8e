"""Where a CAM puts its mass: per-image attention statistics (numpy).

A map of h x w cells is read as a piecewise-constant density over the image
(each cell covers 1/h x 1/w of it), so overlaps with boxes and with the
border band are exact at any layer resolution.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

BORDER_FRACTION = 0.125  # the band along each edge that counts as "border"


def cell_overlap(height: int, width: int, box) -> np.ndarray:
    """Share of each cell of an h x w grid inside box (ymin, xmin, ymax, xmax)."""
    ymin, xmin, ymax, xmax = box

    def axis(n: int, lo: float, hi: float) -> np.ndarray:
        start = np.arange(n) / n
        return np.clip(np.minimum(start + 1.0 / n, hi) - np.maximum(start, lo), 0.0, None) * n

    return np.outer(axis(height, ymin, ymax), axis(width, xmin, xmax))


def attention_stats(cam: np.ndarray, boxes=()) -> dict[str, Optional[float]]:
    """Statistics of one map cam[h, w] (non-negative, as after a CAM's ReLU).

    Returns:
      peak_y, peak_x: centre of the hottest cell, as fractions of the image.
      entropy: of the normalised map, divided by log(h * w) (0 = one cell,
        1 = uniform).
      border_mass: share of mass within BORDER_FRACTION of an edge.
      box_mass: share of mass inside the union of the boxes (None without boxes).
      peak_in_box: pointing game: is the peak inside a box (None without boxes).
      All None when the map has no mass (e.g. all zeros after the ReLU).
    """
    height, width = cam.shape
    total = float(cam.sum())
    result = dict.fromkeys(("peak_y", "peak_x", "entropy", "border_mass", "box_mass", "peak_in_box"))
    if not total > 0.0 or not math.isfinite(total):
        return result
    p = cam / total
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    peak_y, peak_x = (row + 0.5) / height, (col + 0.5) / width
    nonzero = p[p > 0]
    inner = cell_overlap(height, width, (BORDER_FRACTION,) * 2 + (1 - BORDER_FRACTION,) * 2)
    result.update(
        peak_y=float(peak_y),
        peak_x=float(peak_x),
        entropy=float(-(nonzero * np.log(nonzero)).sum() / math.log(height * width)),
        border_mass=float(1.0 - (p * inner).sum()),
    )
    if boxes:
        union = np.max([cell_overlap(height, width, box) for box in boxes], axis=0)
        result["box_mass"] = float((p * union).sum())
        result["peak_in_box"] = any(
            b[0] <= peak_y <= b[2] and b[1] <= peak_x <= b[3] for b in boxes
        )
    return result
