"""`FormatHeatmapRows`: one explained image -> K heatmap rows (or an error row)."""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from transforms.attention import attention_stats
from transforms.dead_letters import ERRORS_TAG, error_row
from transforms.flags import DEFAULT_THRESHOLDS, FlagThresholds, image_flags
from transforms.model_handler import Explained
from transforms.progress import flush as flush_progress
from transforms.progress import tally


def heatmap_rows(
    result: Explained, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS
) -> list[dict]:
    """The rows of `transforms.schemas.HEATMAP_SCHEMA` for one image."""
    image = result.image
    rows = []
    for rank, cam in enumerate(result.cam):
        cam = np.asarray(cam, np.float32)
        attention = attention_stats(cam, image.boxes)
        rows.append(
            {
                "image_id": image.image_id,
                "source": image.source,
                "record_index": image.record_index,
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
            }
        )
    return rows


class FormatHeatmapRows(beam.DoFn):
    """Explained -> heatmap row dicts; compute failures -> the "errors" output."""

    def __init__(self, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS):
        self._method = method
        self._target_layer = target_layer
        self._thresholds = thresholds
        self._explained = beam.metrics.Metrics.counter("gradcam_audit", "images_explained")
        self._failed = beam.metrics.Metrics.counter("gradcam_audit", "compute_errors")

    def finish_bundle(self):
        flush_progress()

    def process(self, result: Explained):
        if result.error is not None:
            self._failed.inc()
            error, message = result.error
            image = result.image
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG,
                error_row(
                    source=image.source,
                    record_index=image.record_index,
                    image_id=image.image_id,
                    stage="compute",
                    error=error,
                    message=message,
                    raw_record=image.raw_record,
                ),
            )
            return
        self._explained.inc()
        tally(images_explained=1)
        yield from heatmap_rows(
            result, method=self._method, target_layer=self._target_layer, thresholds=self._thresholds
        )
