"""`FormatHeatmapRows`: one explained image -> K heatmap rows (or an error row)."""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np

from transforms.attention import attention_stats, pointing_game
from transforms.checks import FAITHFULNESS_NULLS
from transforms.error_rows import ERRORS_TAG, error_row
from transforms.flags import DEFAULT_THRESHOLDS, FlagThresholds, image_flags
from transforms.model_handler import Explained
from transforms.progress_tally import flush as flush_progress
from transforms.progress_tally import tally


class ExemplarSource(NamedTuple):
    """What the exemplar proposals (`transforms.exemplars`) need of one explained image: its heatmap
    rows (all target ranks), its serialized record (for the thumbnail) and its object boxes; no pixels."""

    rows: list
    raw_record: bytes
    boxes: tuple = ()


def heatmap_rows(
    result: Explained, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
    label_threshold: float | None = None,
) -> list[dict]:
    """The rows of `transforms.schemas.HEATMAP_SCHEMA` for one image.

    The faithfulness columns are null here; the sampled rank-0 rows get
    theirs on the way to the sink (`transforms.checks.with_scores`). With `label_threshold` (a
    multi-label run) the rows are those of MULTILABEL_HEATMAP_SCHEMA: the
    image's labels, the classes scoring >= the threshold, every class's score
    (rank-0 row), and flags judged on the row's target (`multilabel_flags`).
    """
    image = result.image
    image_size = (image.image_height, image.image_width)
    rows = []
    for rank, cam in enumerate(result.cam):
        cam = np.asarray(cam, np.float32)
        if result.attention is not None:  # computed over the whole batch by the explaining step
            attention = dict(result.attention[rank])
            attention["peak_in_box"] = pointing_game(attention, image.boxes, image_size,
                                                     thresholds.pointing_tolerance_px)
        else:
            attention = attention_stats(cam, image.boxes, image_size=image_size,
                                        tolerance_px=thresholds.pointing_tolerance_px)
        rows.append(
            {
                "image_id": image.image_id,
                "source": image.source,
                "record_index": image.record_index,
                "record_offset": image.record_offset if image.record_offset >= 0 else None,
                "label": image.label,
                "predicted_class": result.predicted_class,
                "predicted_score": result.predicted_score,
                "target_rank": rank,
                "target_class": int(result.target_class[rank]),
                "target_score": float(result.target_score[rank]),
                "target_logit": float(result.target_logit[rank]),
                "method": method,
                "target_layer": target_layer,
                "cam": cam.ravel().tolist(),
                "cam_height": cam.shape[0],
                "cam_width": cam.shape[1],
                "cam_max": float(cam.max()),
                **attention,
                "num_boxes": len(image.boxes),
                "image_height": image.image_height,
                "image_width": image.image_width,
                **(image_flags(
                    label=image.label,
                    predicted_class=result.predicted_class,
                    predicted_score=result.predicted_score,
                    attention=attention,
                    boxes=image.boxes,
                    thresholds=thresholds,
                ) if label_threshold is None else multilabel_flags(
                    image.labels, int(result.target_class[rank]), float(result.target_score[rank]), attention,
                    image.boxes, thresholds,
                )),
                "cluster_id": None,  # set by transforms.strategies.FindStrategies
                **FAITHFULNESS_NULLS,
            }
        )
        if label_threshold is not None:
            rows[-1].update(multilabel_columns(result, rank, label_threshold))
    return rows


def multilabel_columns(result: Explained, rank: int, threshold: float) -> dict:
    """The MULTILABEL_HEATMAP_FIELDS of one row."""
    labels = result.image.labels
    scores = np.asarray(result.scores, np.float32)
    return {
        "labels": None if labels is None else [int(c) for c in labels],
        "target_is_label": None if labels is None else int(result.target_class[rank]) in labels,
        "predicted_labels": np.flatnonzero(scores >= np.float32(threshold)).tolist(),
        "scores": scores.tolist() if rank == 0 else None,
    }


def multilabel_flags(labels, target_class: int, target_score: float, attention: dict, boxes,
                     thresholds: FlagThresholds) -> dict:
    """The flag columns of a multi-label row, judged on its target class (each class is a yes/no question):
    confident_wrong when the labels are known, the target is not one of them and scores >= 0.8 (a confident
    false positive); low_confidence when the target scores < 0.5 (with --target labels: a missed label)."""
    judged = None if labels is None else (target_class if target_class in labels else -1)
    return image_flags(label=judged, predicted_class=target_class, predicted_score=target_score,
                       attention=attention, boxes=boxes, thresholds=thresholds)


EXEMPLAR_SOURCES_TAG = "exemplar_sources"


class FormatHeatmapRows(beam.DoFn):
    """Explained -> heatmap row dicts; images that failed (decode or compute) -> the "errors" output.

    With `exemplar_sources`, each explained image also goes to the "exemplar_sources" output as a
    `ExemplarSource` (its rows, serialized record and boxes; no pixels), what
    `SelectAuditExemplars` takes without formatting the rows again.
    """

    def __init__(self, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
                 exemplar_sources: bool = False, label_threshold: float | None = None):
        self._exemplar_sources = exemplar_sources
        self._label_threshold = label_threshold
        self._method = method
        self._target_layer = target_layer
        self._thresholds = thresholds
        self._explained = beam.metrics.Metrics.counter("gradcam_audit", "images_explained")
        self._failed = {
            "compute": beam.metrics.Metrics.counter("gradcam_audit", "compute_errors"),
            "decode": beam.metrics.Metrics.counter("gradcam_audit", "decode_errors"),
        }

    def finish_bundle(self):
        flush_progress()

    def process(self, result: Explained):
        if result.error is not None:
            self._failed.get(result.error_stage, self._failed["compute"]).inc()
            error, message = result.error
            image = result.image
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG,
                error_row(
                    source=image.source,
                    record_index=image.record_index,
                    image_id=image.image_id,
                    stage=result.error_stage,
                    error=error,
                    message=message,
                    raw_record=image.raw_record,
                ),
            )
            return
        self._explained.inc()
        tally(images_explained=1)
        rows = heatmap_rows(
            result, method=self._method, target_layer=self._target_layer, thresholds=self._thresholds,
            label_threshold=self._label_threshold,
        )
        yield from rows
        if self._exemplar_sources:
            yield beam.pvalue.TaggedOutput(
                EXEMPLAR_SOURCES_TAG, ExemplarSource(rows, result.image.raw_record, result.image.boxes))
