"""`FormatHeatmapRows`: one explained batch -> one Arrow batch of its heatmap rows (+ error rows, + the
batch's exemplar source).

`heatmap_batch` makes the rows' columns from the batch's arrays (`model_handler.ExplainedBatch`);
`heatmap_rows` makes one image's rows as dicts, the same values (the reference the tests hold the
columns to, and what a step given single `Explained` images uses)."""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.arrow_columns import numpy_column
from transforms.attention import attention_columns, attention_stats, pointing_game
from transforms.checks import FAITHFULNESS_NULLS
from transforms.error_rows import ERRORS_TAG, error_row
from transforms.flags import DEFAULT_THRESHOLDS, FlagThresholds, image_flags
from transforms.model_handler import Explained, ExplainedBatch
from transforms.progress_tally import flush as flush_progress
from transforms.progress_tally import tally
from transforms.schemas import heatmap_schema


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


class ExemplarBatch(NamedTuple):
    """What the exemplar proposals (`transforms.exemplars`) need of one explained batch, no pixels: its
    rank-0 heatmap rows (Arrow), the exact (float64) values of the columns exemplars are ranked by
    ({column: (values, nulls)}; the table keeps them as float32), and per row the serialized record and
    boxes when its record offset is unknown (b"" and () otherwise: the winners' records are read again)."""

    rows: pa.RecordBatch
    values: dict
    raw_records: list
    boxes: list


def explained_batch(element) -> ExplainedBatch:
    """An `ExplainedBatch`, a list of `Explained` (one per image) or one `Explained` -> an ExplainedBatch."""
    if isinstance(element, ExplainedBatch):
        return element
    if isinstance(element, Explained):
        return ExplainedBatch.from_results([element])
    return ExplainedBatch.from_results(list(element))


def _cells(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`flags.cell_of` of arrays of points (known ones)."""
    row = np.clip(np.trunc(y * 3), 0, 2).astype(np.int64)
    col = np.clip(np.trunc(x * 3), 0, 2).astype(np.int64)
    return row * 3 + col


def heatmap_batch(batch: ExplainedBatch, *, method: str, target_layer: str,
                  thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
                  label_threshold: float | None = None) -> tuple[pa.RecordBatch, dict]:
    """(the rows of `heatmap_rows` of every explained image of the batch as one Arrow batch of
    `heatmap_schema(label_threshold is not None)`, image-major; {column: (float64 values, nulls)} of the
    statistics before their float32 rounding: predicted_score, box_concentration, border_mass).

    Columns are made from the batch's arrays; per image only its attributes are read (id, source,
    sizes, boxes, labels). The values are those `heatmap_rows` gives (the pointing game's distance is
    numpy's hypot instead of math's)."""
    t = thresholds
    images = batch.images
    n, rows = len(images), len(batch.row_image)
    img = np.asarray(batch.row_image, np.int64)
    cam = np.asarray(batch.cam, np.float32).reshape(rows, *np.shape(batch.cam)[1:3])
    cam_h, cam_w = (cam.shape[1], cam.shape[2]) if cam.ndim == 3 else (0, 0)

    def per_image(values, dtype):
        return np.asarray(values, dtype).reshape(n)[img]

    label_of = [item.label for item in images]
    has_label = per_image([v is not None for v in label_of], bool)
    label = per_image([-1 if v is None else v for v in label_of], np.int64)
    record_offset = per_image([item.record_offset for item in images], np.int64)
    num_boxes_image = np.array([len(item.boxes) for item in images], np.int64).reshape(n)
    num_boxes = num_boxes_image[img]
    height = per_image([item.image_height for item in images], np.int64)
    width = per_image([item.image_width for item in images], np.int64)
    predicted_class = np.asarray(batch.predicted_class, np.int64).reshape(n)[img]
    predicted_score = np.asarray(batch.predicted_score, np.float64).reshape(n)[img]
    target_class = np.asarray(batch.target_class, np.int64).reshape(rows)
    target_score = np.asarray(batch.target_score, np.float64).reshape(rows)
    target_rank = np.asarray(batch.target_rank, np.int64).reshape(rows)

    attention = batch.attention
    if attention is None:
        attention = attention_columns(cam, np.stack([height, width], 1), [images[i].boxes for i in img.tolist()])
    peak_y, no_peak = attention["peak_y"]
    peak_x, no_peak_x = attention["peak_x"]
    box_concentration, no_concentration = attention["box_concentration"]
    border_mass, no_border = attention["border_mass"]
    has_mass = ~no_peak

    # The pointing game (`attention.pointing_game`): every (row, box of its image) pair at once.
    flat_boxes = np.array([box for item in images for box in item.boxes], np.float64).reshape(-1, 4)
    box_start = np.cumsum(num_boxes_image) - num_boxes_image
    pointed = (num_boxes > 0) & has_mass
    counts = np.where(pointed, num_boxes, 0)
    pair_row = np.repeat(np.arange(rows), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    box = flat_boxes[box_start[img][pair_row] + within]
    y, x = peak_y[pair_row], peak_x[pair_row]
    dy = np.maximum(np.maximum(box[:, 0] - y, 0.0), y - box[:, 2]) * height[pair_row]
    dx = np.maximum(np.maximum(box[:, 1] - x, 0.0), x - box[:, 3]) * width[pair_row]
    hit = np.hypot(dy, dx) <= t.pointing_tolerance_px
    peak_in_box = np.bincount(pair_row, weights=hit, minlength=rows) > 0

    # Flags (`flags.image_flags`; multi-label rows are judged on their target: `multilabel_flags`).
    multilabel = label_threshold is not None
    if multilabel:
        labels_of = [item.labels for item in images]
        labelled = per_image([v is not None for v in labels_of], bool)
        lengths = np.array([len(v or ()) for v in labels_of], np.int64).reshape(n)
        flat_labels = np.array([c for v in labels_of for c in (v or ())], np.int64)
        scores = None if batch.scores is None else np.asarray(batch.scores, np.float32).reshape(n, -1)
        classes = max([scores.shape[1] if scores is not None else 0, int(flat_labels.max(initial=-1)) + 1,
                       int(target_class.max(initial=-1)) + 1])
        truth = np.zeros((n, classes), bool)
        truth[np.repeat(np.arange(n), lengths), flat_labels] = True
        is_label = truth[img, target_class] if rows else np.zeros(0, bool)
        confident_wrong = (~is_label & (target_score >= t.confident), ~labelled)
        low_confidence = target_score < t.low_confidence
    else:
        confident_wrong = ((predicted_class != label) & (predicted_score >= t.confident), ~has_label)
        low_confidence = predicted_score < t.low_confidence
    outside_known = (num_boxes > 0) & has_mass & ~no_concentration
    outside = ~peak_in_box & (box_concentration <= t.outside_box_concentration)
    with np.errstate(invalid="ignore"):
        on_border = border_mass >= t.border_mass
    peak_known = ~no_peak & ~no_peak_x
    peak_cell = np.where(peak_known, _cells(np.nan_to_num(peak_y), np.nan_to_num(peak_x)), 0)
    # box_cell: the centre of each image's largest box (the first of equal areas, as max() picks).
    box_cell_image = np.zeros(n, np.int64)
    if len(flat_boxes):
        owner = np.repeat(np.arange(n), num_boxes_image)
        area = (flat_boxes[:, 2] - flat_boxes[:, 0]) * (flat_boxes[:, 3] - flat_boxes[:, 1])
        order = np.lexsort((np.arange(len(flat_boxes)), -area, owner))
        boxed = np.flatnonzero(num_boxes_image > 0)
        largest = flat_boxes[order[box_start[boxed]]]
        box_cell_image[boxed] = _cells((largest[:, 0] + largest[:, 2]) / 2, (largest[:, 1] + largest[:, 3]) / 2)

    schema = heatmap_schema(multilabel)

    def column(name, values, nulls=None):
        field = schema.field(name)
        values = np.asarray(values).astype(field.type.to_pandas_dtype(), copy=False)
        return pa.array(values, field.type, mask=None if nulls is None or not nulls.any() else nulls)

    def strings(values):
        return pa.array(np.asarray(values, object).reshape(n)[img], pa.string())

    flat_cam = cam.reshape(-1)
    columns = {
        "image_id": strings([item.image_id for item in images]),
        "source": strings([item.source for item in images]),
        "record_index": column("record_index", per_image([item.record_index for item in images], np.int64)),
        "record_offset": column("record_offset", record_offset, record_offset < 0),
        "label": column("label", label, ~has_label),
        "predicted_class": column("predicted_class", predicted_class),
        "predicted_score": column("predicted_score", predicted_score),
        "target_rank": column("target_rank", target_rank),
        "target_class": column("target_class", target_class),
        "target_score": column("target_score", target_score),
        "target_logit": column("target_logit", batch.target_logit),
        "method": pa.array([method] * rows, pa.string()),
        "target_layer": pa.array([target_layer] * rows, pa.string()),
        "cam": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * (cam_h * cam_w)),
                                        pa.array(flat_cam), type=schema.field("cam").type),
        "cam_height": column("cam_height", np.full(rows, cam_h)),
        "cam_width": column("cam_width", np.full(rows, cam_w)),
        "cam_max": column("cam_max", cam.reshape(rows, -1).max(axis=1) if rows and cam_h * cam_w else np.zeros(rows)),
        **{key: column(key, *attention[key]) for key in attention},
        "peak_in_box": column("peak_in_box", peak_in_box, ~pointed),
        "num_boxes": column("num_boxes", num_boxes),
        "image_height": column("image_height", height),
        "image_width": column("image_width", width),
        "confident_wrong": column("confident_wrong", *confident_wrong),
        "low_confidence": column("low_confidence", low_confidence),
        "attention_outside_box": column("attention_outside_box", outside, ~outside_known),
        "attention_on_border": column("attention_on_border", on_border, ~has_mass),
        "peak_cell": column("peak_cell", peak_cell, ~peak_known),
        "box_cell": column("box_cell", box_cell_image[img], num_boxes == 0),
    }
    if multilabel:
        list_type = pa.list_(pa.int64())
        columns["labels"] = pa.array([None if v is None else [int(c) for c in v] for v in labels_of],
                                     list_type).take(pa.array(img))
        columns["target_is_label"] = column("target_is_label", is_label, ~labelled)
        if scores is not None:
            chosen = scores >= np.float32(label_threshold)
            offsets = np.concatenate([[0], np.cumsum(chosen.sum(axis=1))]).astype(np.int32)
            columns["predicted_labels"] = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(np.nonzero(chosen)[1].astype(np.int64)), type=list_type
            ).take(pa.array(img))
            first = target_rank == 0
            lengths = np.where(first, scores.shape[1], 0)
            columns["scores"] = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                pa.array(scores[img[first]].reshape(-1)), type=schema.field("scores").type,
                mask=pa.array(~first) if not first.all() else None)
    arrays = [columns[f.name] if f.name in columns else pa.nulls(rows, f.type) for f in schema]
    exact = {"predicted_score": (predicted_score, np.zeros(rows, bool)),
             "box_concentration": (box_concentration, no_concentration),
             "border_mass": (border_mass, no_border)}
    return pa.RecordBatch.from_arrays(arrays, schema=schema), exact


def exemplar_batch(rows: pa.RecordBatch, exact: dict, batch: ExplainedBatch) -> ExemplarBatch:
    """The ExemplarBatch of a batch's heatmap rows (`heatmap_batch`): its rank-0 rows."""
    first = np.flatnonzero(numpy_column(rows, "target_rank", np.int64) == 0)
    images = [batch.images[i] for i in np.asarray(batch.row_image, np.int64)[first].tolist()]
    unknown = [item.record_offset < 0 for item in images]
    return ExemplarBatch(
        rows if len(first) == rows.num_rows else rows.take(pa.array(first)),
        {name: (values[first], nulls[first]) for name, (values, nulls) in exact.items()},
        [item.raw_record if u else b"" for item, u in zip(images, unknown, strict=True)],
        [tuple(item.boxes) if u else () for item, u in zip(images, unknown, strict=True)],
    )


EXEMPLAR_SOURCES_TAG = "exemplar_sources"


class FormatHeatmapRows(beam.DoFn):
    """An explained batch (`ExplainedBatch`; or a list of `Explained`, or one) -> one Arrow RecordBatch of its
    heatmap rows (`heatmap_batch`); images that failed (decode or compute) -> the "errors" output.

    With `exemplar_sources`, the batch's rank-0 rows also go to the "exemplar_sources" output as an
    `ExemplarBatch` (rows, and records only where their offset is unknown; no pixels), what
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

    def process(self, element):
        batch = explained_batch(element)
        for result in batch.failed:
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
        if not batch.images:
            return
        self._explained.inc(len(batch.images))
        tally(images_explained=len(batch.images))
        rows, exact = heatmap_batch(
            batch, method=self._method, target_layer=self._target_layer, thresholds=self._thresholds,
            label_threshold=self._label_threshold,
        )
        if not rows.num_rows:
            return
        yield rows
        if self._exemplar_sources:
            yield beam.pvalue.TaggedOutput(EXEMPLAR_SOURCES_TAG, exemplar_batch(rows, exact, batch))
