"""Audit flags: per image (heatmap columns) and per class (class_stats columns).

Per image, computed from one heatmap row (rank 0 and topk rows alike):

  confident_wrong        the label is known, the prediction differs from it
                         and predicted_score >= CONFIDENT (0.8). None without
                         a label.
  low_confidence         predicted_score < LOW_CONFIDENCE (0.5): the model
                         gives no class even half of the probability.
  attention_outside_box  relative to the objects' size: the image has boxes,
                         the CAM's peak (of the map upsampled to the image)
                         misses every box by more than the pointing-game
                         tolerance (`peak_in_box` False; 15 px at the image's
                         resolution, Zhang et al. 2016) AND box_concentration
                         (box_mass / box_area) <= OUTSIDE_BOX_CONCENTRATION
                         (1.0): the boxes get no more of the mass than a flat
                         map would give them. An absolute mass threshold
                         (the rule before: under half the mass inside) calls
                         good maps bad when objects are small: a dog covering
                         13% of a photo that holds 39% of the mass is 3x a
                         flat map. None without boxes or without CAM mass.
                         Options: --outside_box_concentration,
                         --pointing_tolerance.
  attention_on_border    at least BORDER_MASS (0.6) of the CAM's mass lies in
                         the band within `attention.BORDER_FRACTION` (12.5%)
                         of an edge. That band is 43.75% of the image, so a
                         flat map scores 0.44. None without CAM mass.
  peak_cell              the ninth of the image (3x3 grid, 0..8 row-major,
                         0 = top-left, 4 = centre) holding the CAM's peak.
  box_cell               the ninth holding the centre of the image's largest
                         box (None without boxes).

Per class (over the rows whose CAM explains the class, i.e. the rows that
also make its mean CAM; with --target predicted, the images predicted as it):

  share_<flag>           the share of those rows with the flag set (among
                         the rows where it could be computed); share_flagged:
                         any of the four flags.
  peak_cell, peak_cell_share
                         the most common ninth of the peaks, and the share of
                         rows whose peak falls there.
  box_cell_share         the share of rows with boxes whose largest box's
                         centre falls in that same ninth: how much the
                         objects' own positions explain the concentration.
  shortcut_score         peak_cell_share - box_cell_share. Without boxes the
                         objects' spread is unknown: the score is then
                         peak_cell_share - 1/9 (objects assumed spread evenly)
                         and the centre ninth never scores (most photos are
                         centred).
  shortcut               True when the class has at least SHORTCUT_MIN_IMAGES
                         (10) rows, peak_cell_share >= SHORTCUT_PEAK_SHARE
                         (0.5) and shortcut_score >= SHORTCUT_SCORE (0.3):
                         attention sits in the same place on most of the
                         class's images, wherever the objects are.

On the demo (400 images, the marker class 2 "triangle"), the shortcut model
puts the peak of 74% of its triangles in the top-left ninth, where no box
centre ever lies (score 0.74); the other classes peak most often in the
centre ninth (46-49% of their images), where 42-55% of their box centres
are (scores -0.07 to 0.04). A model trained without the marker has no class
above 0.15.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from transforms.attention import POINTING_TOLERANCE_PX
from transforms.settings import option, settings_from

CONFIDENT = 0.8
LOW_CONFIDENCE = 0.5
OUTSIDE_BOX_CONCENTRATION = 1.0
BORDER_MASS = 0.6
SHORTCUT_MIN_IMAGES = 10
SHORTCUT_PEAK_SHARE = 0.5
SHORTCUT_SCORE = 0.3

IMAGE_FLAGS = ("confident_wrong", "low_confidence", "attention_outside_box", "attention_on_border")
CENTRE_CELL = 4
NUM_CELLS = 9

@dataclasses.dataclass(frozen=True)
class FlagThresholds:
    """The thresholds of every flag (defaults: the module constants above); the `option` fields are also
    options of `python -m pipeline` (`transforms/settings.py`)."""

    confident: float = CONFIDENT
    low_confidence: float = LOW_CONFIDENCE
    outside_box_concentration: float = option(
        OUTSIDE_BOX_CONCENTRATION,
        "attention_outside_box: set when the CAM peak misses every box and box_mass / box_area is at most "
        "this (1 = what a flat map gives the boxes)", kind="non_negative")
    pointing_tolerance_px: float = option(
        POINTING_TOLERANCE_PX,
        "Pointing game: a peak within this many image pixels of a box is a hit (Zhang et al. 2016: 15)",
        name="pointing_tolerance", kind="non_negative")
    border_mass: float = BORDER_MASS
    shortcut_min_images: int = SHORTCUT_MIN_IMAGES
    shortcut_peak_share: float = SHORTCUT_PEAK_SHARE
    shortcut_score: float = SHORTCUT_SCORE

    @classmethod
    def from_options(cls, options: Mapping) -> "FlagThresholds":
        """The thresholds a run used, from its option values (`AuditConfig` fields or a manifest's "options").

        An option missing or None (a run made before the option existed) keeps its default.
        """
        return settings_from(cls, options)


DEFAULT_THRESHOLDS = FlagThresholds()


def cell_of(y: Optional[float], x: Optional[float]) -> Optional[int]:
    """The ninth (0..8, row-major on a 3x3 grid) holding point (y, x) in [0, 1]."""
    if y is None or x is None:
        return None
    row = min(max(int(y * 3), 0), 2)
    col = min(max(int(x * 3), 0), 2)
    return row * 3 + col


def largest_box_cell(boxes: Sequence) -> Optional[int]:
    """The ninth holding the centre of the largest box (ymin, xmin, ymax, xmax)."""
    if not boxes:
        return None
    box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    return cell_of((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def image_flags(
    *,
    label: Optional[int],
    predicted_class: int,
    predicted_score: float,
    attention: dict,
    boxes: Sequence = (),
    thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
) -> dict:
    """The flag columns of one heatmap row.

    Args:
      attention: `transforms.attention.attention_stats` of the row's CAM
        (peak_y, peak_x, border_mass, box_concentration, peak_in_box; None
        when the map has no mass).
      boxes: the image's boxes as fractions (ymin, xmin, ymax, xmax).
    """
    t = thresholds
    has_mass = attention.get("peak_y") is not None
    outside = None
    if boxes and has_mass and attention.get("box_concentration") is not None:
        outside = bool(not attention["peak_in_box"] and attention["box_concentration"] <= t.outside_box_concentration)
    return {
        "confident_wrong": None if label is None else bool(
            predicted_class != label and predicted_score >= t.confident
        ),
        "low_confidence": bool(predicted_score < t.low_confidence),
        "attention_outside_box": outside,
        "attention_on_border": bool(attention["border_mass"] >= t.border_mass) if has_mass else None,
        "peak_cell": cell_of(attention.get("peak_y"), attention.get("peak_x")),
        "box_cell": largest_box_cell(boxes),
    }


def shortcut_signal(
    peak_cells: np.ndarray, box_cells: np.ndarray, thresholds: FlagThresholds = DEFAULT_THRESHOLDS
) -> dict:
    """The class-level shortcut columns from two 9-bin histograms.

    Args:
      peak_cells: [9] counts of rows per ninth holding the CAM peak.
      box_cells: [9] counts of rows (with boxes) per ninth holding the
        largest box's centre.

    Returns:
      peak_cell, peak_cell_share, box_cell_share, shortcut_score, shortcut
      (all None but shortcut=False when no row had a peak).
    """
    t = thresholds
    peaks = np.asarray(peak_cells, np.float64)
    boxes = np.asarray(box_cells, np.float64)
    total = peaks.sum()
    if total <= 0:
        return {"peak_cell": None, "peak_cell_share": None, "box_cell_share": None,
                "shortcut_score": None, "shortcut": False}
    cell = int(peaks.argmax())
    share = float(peaks[cell] / total)
    box_total = boxes.sum()
    if box_total > 0:
        box_share = float(boxes[cell] / box_total)
        score = share - box_share
    else:
        box_share = None
        score = 0.0 if cell == CENTRE_CELL else share - 1.0 / NUM_CELLS
    flagged = bool(total >= t.shortcut_min_images and share >= t.shortcut_peak_share and score >= t.shortcut_score)
    return {"peak_cell": cell, "peak_cell_share": share, "box_cell_share": box_share,
            "shortcut_score": float(score), "shortcut": flagged}


CELL_NAMES = (
    "top-left", "top", "top-right",
    "left", "centre", "right",
    "bottom-left", "bottom", "bottom-right",
)
