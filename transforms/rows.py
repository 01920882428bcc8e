"""`FormatHeatmapRows`: one explained image -> K heatmap rows (or an error row)."""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np

from transforms.attention import attention_stats, pointing_game
from transforms.dead_letters import ERRORS_TAG, error_row
from transforms.faithfulness import FAITHFULNESS_NULLS, unwrap
from transforms.flags import DEFAULT_THRESHOLDS, FlagThresholds, image_flags
from transforms.model_handler import Explained
from transforms.progress import flush as flush_progress
from transforms.progress import tally


class ExemplarSource(NamedTuple):
    """What the exemplar proposals (`transforms.exemplars`) need of one explained image: its heatmap
    rows (all target ranks), its serialized record (for the thumbnail) and its object boxes; no pixels."""

    rows: list
    raw_record: bytes
    boxes: tuple = ()


def heatmap_rows(
    result: Explained, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
    faithfulness: dict | None = None,
) -> list[dict]:
    """The rows of `transforms.schemas.HEATMAP_SCHEMA` for one image.

    `faithfulness` (transforms/faithfulness.py) fills the rank-0 row's
    faithfulness columns; they are null otherwise.
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
                **image_flags(
                    label=image.label,
                    predicted_class=result.predicted_class,
                    predicted_score=result.predicted_score,
                    attention=attention,
                    boxes=image.boxes,
                    thresholds=thresholds,
                ),
                "cluster_id": None,  # set by transforms.strategies.FindStrategies
                **(faithfulness if faithfulness and rank == 0 else FAITHFULNESS_NULLS),
            }
        )
    return rows


EXEMPLAR_SOURCES_TAG = "exemplar_sources"


class FormatHeatmapRows(beam.DoFn):
    """Explained -> heatmap row dicts; images that failed (decode or compute) -> the "errors" output.

    With `exemplar_sources`, each explained image also goes to the "exemplar_sources" output as a
    `ExemplarSource` (its rows, serialized record and boxes; no pixels), what
    `SelectAuditExemplars` takes without formatting the rows again.
    """

    def __init__(self, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
                 exemplar_sources: bool = False):
        self._exemplar_sources = exemplar_sources
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

    def process(self, item):
        result, faithfulness = unwrap(item)  # Explained, or Measured by MeasureFaithfulness
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
            faithfulness=faithfulness,
        )
        yield from rows
        if self._exemplar_sources:
            yield beam.pvalue.TaggedOutput(
                EXEMPLAR_SOURCES_TAG, ExemplarSource(rows, result.image.raw_record, result.image.boxes))
