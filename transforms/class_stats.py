"""Per-class statistics: `ClassStatsFn` (a CombineFn) and `ComputeClassStats`.

Each heatmap row contributes to up to three classes: its label (labelled,
correct, confusions), its prediction (predicted, score) and its target
(mean normalised CAM, attention statistics). Rows of rank > 0 (topk) only
contribute as targets, so image counts are not multiplied by K.

Multi-label runs (`label_threshold` set: `--label_format index|multi_hot`)
count per class, from each image's rank-0 row (its `labels` and `scores`), the
yes/no question "is the class there?" at the threshold instead of the label
and the prediction: num_labelled (= support) images whose labels hold the
class, num_predicted those whose score for it is >= the threshold,
num_correct the true positives; precision, recall (= accuracy), F1 and the
mean score follow. The target role (maps, attention, flags, faithfulness) is
the same as for single-label runs: per target class.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.checks import COLUMNS as FAITHFULNESS_COLUMNS
from transforms.checks import CURVE_COLUMNS
from transforms.flags import DEFAULT_THRESHOLDS, IMAGE_FLAGS, NUM_CELLS, FlagThresholds, shortcut_signal

_STATS = ("peak_y", "peak_x", "entropy", "border_mass", "box_mass")
TOP_CONFUSIONS = 3


@dataclasses.dataclass
class ClassAccumulator:
    """Running sums for one class."""

    num_labelled: int = 0
    num_predicted: int = 0
    num_predicted_labelled: int = 0
    num_correct: int = 0
    sum_predicted_score: float = 0.0
    num_targeted: int = 0
    sum_target_score: float = 0.0
    sum_cam: Optional[np.ndarray] = None
    num_cam: int = 0
    stat_sums: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(_STATS, 0.0))
    stat_counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(_STATS, 0))
    pointing_hits: int = 0
    pointing_total: int = 0
    confusions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    flag_hits: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(IMAGE_FLAGS, 0))
    flag_counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(IMAGE_FLAGS, 0))
    num_flagged: int = 0
    peak_cells: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NUM_CELLS, np.int64))
    box_cells: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NUM_CELLS, np.int64))
    # Faithfulness of the sampled rows (transforms/checks.py).
    num_faithfulness: int = 0
    num_positive_gap: int = 0
    faithfulness_sums: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(FAITHFULNESS_COLUMNS, 0.0))
    curve_sums: dict = dataclasses.field(default_factory=dict)  # deletion_<order> -> summed drops per q
    # Multi-label runs: the class's score summed over every explained image, and their count.
    sum_score: float = 0.0
    num_scored: int = 0


def class_contributions(row: dict, label_threshold: Optional[float] = None) -> Iterable[tuple[int, tuple[str, dict]]]:
    """(class_id, (role, row)) pairs for one heatmap row (a multi-label run's: with `label_threshold`)."""
    if row["target_rank"] == 0:
        if label_threshold is not None:
            labels = row.get("labels")
            threshold = np.float32(label_threshold)
            for class_id, score in enumerate(row.get("scores") or ()):
                yield class_id, ("multilabel", {
                    "score": float(score), "predicted": bool(np.float32(score) >= threshold),
                    "labelled": labels is not None, "label": labels is not None and class_id in labels,
                })
        else:
            if row["label"] is not None:
                yield int(row["label"]), ("label", row)
            yield int(row["predicted_class"]), ("predicted", row)
    yield int(row["target_class"]), ("target", row)


def batch_accumulators(batch, label_threshold: Optional[float] = None) -> list[tuple[int, "ClassAccumulator"]]:
    """(class_id, ClassAccumulator) of every class an Arrow batch of heatmap rows contributes to:
    what adding each row's `class_contributions` one by one gives (sums within float rounding),
    computed with numpy over the whole batch (grouped by class with bincount), so a row costs no
    Beam element per contribution and no Python dict walk. The few rows with faithfulness columns
    (a sampled share) are added row by row; a batch whose maps differ in size goes row by row.
    With `label_threshold` (a multi-label run) the label and predicted roles are `multilabel_counts`'."""
    from transforms.arrow_columns import cam_matrix, numpy_column

    n = batch.num_rows
    accs: dict[int, ClassAccumulator] = {}

    def acc(class_id) -> ClassAccumulator:
        class_id = int(class_id)
        if class_id not in accs:
            accs[class_id] = ClassAccumulator()
        return accs[class_id]

    heights, widths = numpy_column(batch, "cam_height", np.int64), numpy_column(batch, "cam_width", np.int64)
    if n == 0 or len(set(heights.tolist())) > 1 or len(set(widths.tolist())) > 1:
        for row in batch.to_pylist():
            for class_id, contribution in class_contributions(row, label_threshold):
                ClassStatsFn.add_to(acc(class_id), contribution)
        return list(accs.items())
    rank0 = numpy_column(batch, "target_rank", np.int64) == 0
    label = numpy_column(batch, "label", np.int64)  # null -> -1
    has_label = ~batch.column("label").is_null().to_numpy(zero_copy_only=False)
    predicted = numpy_column(batch, "predicted_class", np.int64)
    target = numpy_column(batch, "target_class", np.int64)

    # role "target": every row (first: these accumulators are made whole, the other roles add to them)
    classes, inverse = np.unique(target, return_inverse=True)
    k = len(classes)

    def per_class(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, values, minlength=k)

    def known(name: str):
        """(known mask, values as float64 with 0 for nulls) of a nullable column (bools too)."""
        column = batch.column(name)
        mask = ~column.is_null().to_numpy(zero_copy_only=False)
        values = column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        return mask, values

    cam_max = numpy_column(batch, "cam_max")
    with_mass = np.flatnonzero(cam_max > 0)
    sum_cam = np.zeros((k, int(heights[0]) * int(widths[0])))
    np.add.at(sum_cam, inverse[with_mass],
              cam_matrix(batch, with_mass, sum_cam.shape[1]).astype(np.float64) / cam_max[with_mass, None])
    num_cam = np.bincount(inverse[with_mass], minlength=k)
    columns = {"num_targeted": np.bincount(inverse, minlength=k),
               "sum_target_score": per_class(numpy_column(batch, "target_score"))}
    stat_counts, stat_sums = {}, {}
    for key in _STATS:
        mask, values = known(key)
        stat_counts[key], stat_sums[key] = per_class(mask.astype(np.float64)), per_class(values)
    mask, hits = known("peak_in_box")
    pointing_total, pointing_hits = per_class(mask.astype(np.float64)), per_class(hits)
    flag_counts, flag_hits, flagged = {}, {}, np.zeros(n, bool)
    for flag in IMAGE_FLAGS:
        mask, hits = known(flag)
        flag_counts[flag], flag_hits[flag] = per_class(mask.astype(np.float64)), per_class(hits)
        flagged |= hits > 0
    num_flagged = per_class(flagged.astype(np.float64))
    cells = {}
    for name in ("peak_cell", "box_cell"):
        mask, cell = known(name)
        cells[name] = np.zeros((k, NUM_CELLS), np.int64)
        np.add.at(cells[name], (inverse[mask], cell[mask].astype(np.int64)), 1)
    shape = (int(heights[0]), int(widths[0]))
    for j, class_id in enumerate(classes.tolist()):  # every field given: no default factory runs
        a = ClassAccumulator(
            num_targeted=int(columns["num_targeted"][j]), sum_target_score=float(columns["sum_target_score"][j]),
            sum_cam=sum_cam[j].reshape(shape) if num_cam[j] else None, num_cam=int(num_cam[j]),
            stat_sums={key: float(stat_sums[key][j]) for key in _STATS},
            stat_counts={key: int(stat_counts[key][j]) for key in _STATS},
            pointing_total=int(pointing_total[j]), pointing_hits=int(pointing_hits[j]),
            confusions=collections.Counter(),
            flag_counts={flag: int(flag_counts[flag][j]) for flag in IMAGE_FLAGS},
            flag_hits={flag: int(flag_hits[flag][j]) for flag in IMAGE_FLAGS}, num_flagged=int(num_flagged[j]),
            peak_cells=cells["peak_cell"][j], box_cells=cells["box_cell"][j],
            faithfulness_sums=dict.fromkeys(FAITHFULNESS_COLUMNS, 0.0), curve_sums={},
        )
        accs[class_id] = a

    if label_threshold is not None:
        _add_multilabel_counts(batch, rank0, label_threshold, acc)
        rank0 = np.zeros(n, bool)  # the single-label roles below add nothing
    # role "label": the rank-0 rows with a label
    labelled = rank0 & has_label
    right = labelled & (predicted == label)
    for class_id, count in zip(*np.unique(label[labelled], return_counts=True), strict=True):
        acc(class_id).num_labelled = int(count)
    for class_id, count in zip(*np.unique(label[right], return_counts=True), strict=True):
        acc(class_id).num_correct = int(count)
    wrong = labelled & ~right
    if wrong.any():
        pairs, counts = np.unique(np.stack([label[wrong], predicted[wrong]], 1), axis=0, return_counts=True)
        for (class_id, other), count in zip(pairs.tolist(), counts.tolist(), strict=True):
            acc(class_id).confusions[other] += count

    # role "predicted": every rank-0 row
    classes, inverse = np.unique(predicted[rank0], return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    with_label = np.bincount(inverse, has_label[rank0].astype(np.float64), minlength=len(classes))
    scores = np.bincount(inverse, numpy_column(batch, "predicted_score")[rank0], minlength=len(classes))
    for j, class_id in enumerate(classes.tolist()):
        a = acc(class_id)
        a.num_predicted, a.num_predicted_labelled = int(counts[j]), int(with_label[j])
        a.sum_predicted_score = float(scores[j])
    sampled = np.flatnonzero(known("faithfulness_gap")[0])
    if len(sampled):
        for i, row in zip(sampled.tolist(), batch.take(sampled).to_pylist(), strict=True):
            _add_faithfulness(acc(target[i]), row)
    return list(accs.items())


def faithfulness_part(score_row: dict) -> tuple[int, "ClassAccumulator"]:
    """(target class, ClassAccumulator holding only its faithfulness) of one scored image (a
    `transforms.checks.ScoreCheckImages` row): what its heatmap row would add as a target."""
    acc = ClassAccumulator()
    _add_faithfulness(acc, score_row)
    return int(score_row["target_class"]), acc


def _add_multilabel_counts(batch, rank0: np.ndarray, threshold: float, acc) -> None:
    """A multi-label batch's rank-0 rows (one per image): per class, the images labelled with it, those
    scoring >= threshold (of them, those with labels known), the true positives, the sums of scores."""
    rows = np.flatnonzero(rank0)
    if not len(rows):
        return
    first = batch.take(rows)
    scores_column, labels_column = first.column("scores"), first.column("labels")
    widths = scores_column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    width = int(widths.max()) if len(widths) else 0
    if width == 0:
        return
    if (widths != width).any():
        raise ValueError(f"multi-label rows with {sorted(set(widths.tolist()))} scores: expected one width")
    scores = scores_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    predicted = scores >= np.float32(threshold)
    labelled = ~labels_column.is_null().to_numpy(zero_copy_only=False)
    truth = np.zeros_like(predicted)
    lengths = labels_column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = labels_column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    truth[np.repeat(np.arange(len(rows)), lengths), flat] = True
    columns = {
        "num_labelled": truth.sum(0), "num_correct": (truth & predicted).sum(0), "num_predicted": predicted.sum(0),
        "num_predicted_labelled": predicted[labelled].sum(0),
        "sum_predicted_score": np.where(predicted, scores.astype(np.float64), 0.0).sum(0),
        "sum_score": scores.astype(np.float64).sum(0),
    }
    for class_id in range(width):
        a = acc(class_id)
        for name, values in columns.items():
            setattr(a, name, getattr(a, name) + values[class_id].item())
        a.num_scored += len(rows)


def class_parts(item, label_threshold: Optional[float] = None) -> Iterable[tuple[int, object]]:
    """A heatmap row -> its (class_id, (role, row)) contributions; an Arrow batch of rows -> one
    (class_id, ClassAccumulator) per class it contributes to (`batch_accumulators`)."""
    if isinstance(item, dict):
        return class_contributions(item, label_threshold)
    return batch_accumulators(item, label_threshold)


class ClassStatsFn(beam.CombineFn):
    """Combines (role, heatmap row) contributions of one class, or partial accumulators of it
    (`batch_accumulators`), into its stats."""

    def __init__(self, thresholds: FlagThresholds = DEFAULT_THRESHOLDS, label_threshold: Optional[float] = None):
        super().__init__()
        self._thresholds = thresholds
        self._label_threshold = label_threshold

    def create_accumulator(self) -> ClassAccumulator:
        return ClassAccumulator()

    def add_input(self, acc: ClassAccumulator, contribution) -> ClassAccumulator:
        if isinstance(contribution, ClassAccumulator):  # a batch's partial (`batch_accumulators`)
            return self.merge_into(acc, contribution)
        return self.add_to(acc, contribution)

    @staticmethod
    def add_to(acc: ClassAccumulator, contribution) -> ClassAccumulator:
        """Adds one (role, heatmap row) contribution to `acc`."""
        role, row = contribution
        if role == "multilabel":
            acc.num_scored += 1
            acc.sum_score += row["score"]
            acc.num_labelled += row["label"]
            acc.num_correct += row["label"] and row["predicted"]
            if row["predicted"]:
                acc.num_predicted += 1
                acc.num_predicted_labelled += row["labelled"]
                acc.sum_predicted_score += row["score"]
        elif role == "label":
            acc.num_labelled += 1
            if row["predicted_class"] == row["label"]:
                acc.num_correct += 1
            else:
                acc.confusions[int(row["predicted_class"])] += 1
        elif role == "predicted":
            acc.num_predicted += 1
            acc.num_predicted_labelled += row["label"] is not None
            acc.sum_predicted_score += row["predicted_score"]
        else:
            acc.num_targeted += 1
            acc.sum_target_score += row["target_score"]
            if row["cam_max"] > 0:
                cam = np.asarray(row["cam"], np.float64).reshape(row["cam_height"], row["cam_width"])
                cam = cam / row["cam_max"]
                if acc.sum_cam is None:
                    acc.sum_cam = cam
                elif acc.sum_cam.shape == cam.shape:
                    acc.sum_cam = acc.sum_cam + cam
                acc.num_cam += 1
            for key in _STATS:
                if row.get(key) is not None:
                    acc.stat_sums[key] += row[key]
                    acc.stat_counts[key] += 1
            if row.get("peak_in_box") is not None:
                acc.pointing_total += 1
                acc.pointing_hits += bool(row["peak_in_box"])
            flagged = False
            for flag in IMAGE_FLAGS:
                if row.get(flag) is not None:
                    acc.flag_counts[flag] += 1
                    acc.flag_hits[flag] += bool(row[flag])
                    flagged = flagged or bool(row[flag])
            acc.num_flagged += flagged
            if row.get("peak_cell") is not None:
                acc.peak_cells[row["peak_cell"]] += 1
            if row.get("box_cell") is not None:
                acc.box_cells[row["box_cell"]] += 1
            _add_faithfulness(acc, row)
        return acc

    def merge_accumulators(self, accumulators) -> ClassAccumulator:
        merged = ClassAccumulator()
        for acc in accumulators:
            self.merge_into(merged, acc)
        return merged

    @staticmethod
    def merge_into(merged: ClassAccumulator, acc: ClassAccumulator) -> ClassAccumulator:
        """Adds `acc` to `merged` (in place; `acc` is left unchanged and shares nothing with it)."""
        for field in (
            "num_labelled", "num_predicted", "num_predicted_labelled", "num_correct",
            "sum_predicted_score", "num_targeted", "sum_target_score", "num_cam",
            "pointing_hits", "pointing_total", "num_flagged", "sum_score", "num_scored",
        ):
            setattr(merged, field, getattr(merged, field) + getattr(acc, field))
        if acc.sum_cam is not None:
            merged.sum_cam = acc.sum_cam.copy() if merged.sum_cam is None else merged.sum_cam + acc.sum_cam
        for key in _STATS:
            merged.stat_sums[key] += acc.stat_sums[key]
            merged.stat_counts[key] += acc.stat_counts[key]
        merged.confusions.update(acc.confusions)
        for flag in IMAGE_FLAGS:
            merged.flag_hits[flag] += acc.flag_hits[flag]
            merged.flag_counts[flag] += acc.flag_counts[flag]
        merged.peak_cells = merged.peak_cells + acc.peak_cells
        merged.box_cells = merged.box_cells + acc.box_cells
        _merge_faithfulness(merged, acc)
        return merged

    def compact(self, acc: ClassAccumulator) -> ClassAccumulator:
        acc.confusions = collections.Counter({k: v for k, v in acc.confusions.items() if v})
        return acc

    def extract_output(self, acc: ClassAccumulator) -> dict:
        def ratio(num, den):
            return float(num) / den if den else None

        mean_cam = None if acc.sum_cam is None else (acc.sum_cam / acc.num_cam).astype(np.float32)
        return {
            "num_labelled": acc.num_labelled,
            "num_predicted": acc.num_predicted,
            "num_correct": acc.num_correct,
            "accuracy": ratio(acc.num_correct, acc.num_labelled),
            "precision": ratio(acc.num_correct, acc.num_predicted_labelled),
            "mean_predicted_score": ratio(acc.sum_predicted_score, acc.num_predicted),
            "num_targeted": acc.num_targeted,
            "mean_target_score": ratio(acc.sum_target_score, acc.num_targeted),
            "mean_cam": None if mean_cam is None else mean_cam.ravel().tolist(),
            "cam_height": None if mean_cam is None else mean_cam.shape[0],
            "cam_width": None if mean_cam is None else mean_cam.shape[1],
            **{f"mean_{key}": ratio(acc.stat_sums[key], acc.stat_counts[key]) for key in _STATS},
            "pointing_accuracy": ratio(acc.pointing_hits, acc.pointing_total),
            "top_confusions": [
                {"predicted_class": cls, "count": count}
                for cls, count in sorted(acc.confusions.items(), key=lambda kv: (-kv[1], kv[0]))[
                    :TOP_CONFUSIONS
                ]
            ],
            **{f"share_{flag}": ratio(acc.flag_hits[flag], acc.flag_counts[flag]) for flag in IMAGE_FLAGS},
            "share_flagged": ratio(acc.num_flagged, acc.num_targeted),
            **shortcut_signal(acc.peak_cells, acc.box_cells, self._thresholds),
            **_faithfulness_output(acc),
            **(self._multilabel_output(acc) if self._label_threshold is not None else {}),
        }

    def _multilabel_output(self, acc: ClassAccumulator) -> dict:
        """MULTILABEL_CLASS_STATS_FIELDS: precision is the existing column (true positives / predicted)."""
        precision = acc.num_correct / acc.num_predicted_labelled if acc.num_predicted_labelled else None
        recall = acc.num_correct / acc.num_labelled if acc.num_labelled else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {"threshold": float(self._label_threshold), "support": acc.num_labelled, "recall": recall, "f1": f1,
                "mean_score": acc.sum_score / acc.num_scored if acc.num_scored else None}


def _add_faithfulness(acc: ClassAccumulator, row: dict) -> None:
    if row.get("faithfulness_gap") is None:
        return
    acc.num_faithfulness += 1
    acc.num_positive_gap += row["faithfulness_gap"] > 0
    for key in FAITHFULNESS_COLUMNS:
        acc.faithfulness_sums[key] += row[key]
    for key in CURVE_COLUMNS:
        if row.get(key) is not None:
            curve = np.asarray(row[key], np.float64)
            acc.curve_sums[key] = curve if key not in acc.curve_sums else acc.curve_sums[key] + curve


def _merge_faithfulness(merged: ClassAccumulator, acc: ClassAccumulator) -> None:
    merged.num_faithfulness += acc.num_faithfulness
    merged.num_positive_gap += acc.num_positive_gap
    for key in FAITHFULNESS_COLUMNS:
        merged.faithfulness_sums[key] += acc.faithfulness_sums[key]
    for key, curve in acc.curve_sums.items():
        merged.curve_sums[key] = curve.copy() if key not in merged.curve_sums else merged.curve_sums[key] + curve


def _faithfulness_output(acc: ClassAccumulator) -> dict:
    """Means of the faithfulness columns, the share of positive gaps, mean deletion curves."""
    n = acc.num_faithfulness
    out = {"num_faithfulness": n, "share_positive_gap": acc.num_positive_gap / n if n else None}
    for key in FAITHFULNESS_COLUMNS:
        out[f"mean_{key}"] = acc.faithfulness_sums[key] / n if n else None
    for key in CURVE_COLUMNS:
        curve = acc.curve_sums.get(key)
        out[f"mean_{key}"] = None if curve is None or not n else (curve / n).astype(np.float32).tolist()
    return out


class ComputeClassStats(beam.PTransform):
    """PCollection[heatmap row] or PCollection[Arrow RecordBatch of heatmap rows] ->
    PCollection[class_stats row], one per class."""

    def __init__(self, class_names: Optional[list[str]] = None, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
                 label_threshold: Optional[float] = None, faithfulness=None):
        """`label_threshold`: multi-label runs' score threshold (None: single-label). `faithfulness`: an optional
        PCollection of score rows (`transforms.checks.ScoreCheckImages`) whose scores count for their
        target classes, for rows whose faithfulness columns are filled later."""
        super().__init__()
        self._class_names = list(class_names or [])
        self._thresholds = thresholds
        self._label_threshold = label_threshold
        self._faithfulness = faithfulness

    def expand(self, rows):
        names = self._class_names

        def to_row(keyed):
            class_id, stats = keyed
            name = names[class_id] if 0 <= class_id < len(names) else None
            # num_strategies / suspicious_strategy: set by transforms.strategies.AddStrategyColumns.
            return {"class_id": class_id, "class_name": name, **stats, "num_strategies": None,
                    "suspicious_strategy": None}

        parts = rows | "SplitByClass" >> beam.FlatMap(class_parts, self._label_threshold)
        if self._faithfulness is not None:
            scored = self._faithfulness | "FaithfulnessByClass" >> beam.Map(faithfulness_part)
            parts = (parts, scored) | "WithFaithfulness" >> beam.Flatten()
        return (
            parts
            | "CombinePerClass" >> beam.CombinePerKey(ClassStatsFn(self._thresholds, self._label_threshold))
            | "ToClassRow" >> beam.Map(to_row)
        )
