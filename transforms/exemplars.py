"""Exemplars: the few worst images of each kind, chosen in the job with Beam's `Top.PerKey`.

A *kind* is a string "<family>:<...>": "flag:confident_wrong" (one per image
flag of `transforms.flags`), "shortcut:<class_id>" (images predicted as a
shortcut class whose CAM peaks in the ninth the class's peaks crowd into),
or anything another step proposes ("strategy:<class>:<cluster>").

    explained images -> ProposeExemplars -> (kind, Candidate)      one per kind an image belongs to
    (+ the strategy candidates of transforms.strategies, without record bytes)
      -> SelectExemplars: Top.PerKey(n) by (score, then image id) -+-> relabel / drop kinds (side input)
                          CountCandidates = kind_total ----------- +-> DrawThumbnails -> exemplar rows

Memory stays bounded whatever the dataset size: Beam lifts both combiners
(each worker keeps at most n candidates per kind per bundle, then merges
those), a `Candidate` carries its heatmap row's fields but no record bytes,
and thumbnails are drawn only for the winners, whose records are read again
from their shards at their `record_offset` (`record_and_boxes`). (Only a
record of unknown offset travels with its candidates.) The strategy
candidates exist only after the clustering, i.e. after every image (nothing
of the dataset waits for it). The "cell:<class>:<ninth>" kinds behind the
shortcut exemplars number up to 9 per class (n candidates each per bundle);
the class statistics decide afterwards which of them become
"shortcut:<class>" and the rest are dropped before any thumbnail is drawn.

The table (`transforms.schemas.EXEMPLAR_SCHEMA`) holds a thumbnail per
exemplar, so the report never reads the source shards.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.decode import _boxes
from transforms.flags import DEFAULT_THRESHOLDS, FlagThresholds

# ExemplarBatch: FormatHeatmapRows makes them (ExemplarSource: one image's, from its rows as dicts)
from transforms.heatmap_rows import ExemplarBatch, ExemplarSource, heatmap_rows
from transforms.records import read_record_at
from transforms.thumbnails import example_image, overlay_tile

_LOG = logging.getLogger(__name__)

PER_KIND = 8
# Kinds that keep fewer: a strategy strip in the report shows its 3 images closest to the cluster's mean.
STRATEGY_EXEMPLARS = 3
FAMILY_LIMITS = {"strategy": STRATEGY_EXEMPLARS}

# flag column -> (ranking column, worst first means the largest value?)
FLAG_RANKING = {
    "confident_wrong": ("predicted_score", True),
    "low_confidence": ("predicted_score", False),
    "attention_outside_box": ("box_concentration", False),
    "attention_on_border": ("border_mass", True),
}

# The heatmap columns an exemplar row keeps (besides kind, rank, score, kind_total, thumbnail).
ROW_FIELDS = ("image_id", "source", "record_index", "record_offset", "label", "predicted_class", "predicted_score",
              "target_class", "box_mass", "box_concentration", "border_mass", "peak_cell", "cam", "cam_height", "cam_width")


def flag_kind(flag: str) -> str:
    return f"flag:{flag}"


def shortcut_kind(class_id: int) -> str:
    return f"shortcut:{class_id}"


def cell_kind(predicted_class: int, cell: int) -> str:
    return f"cell:{predicted_class}:{cell}"


class Candidate(NamedTuple):
    """One image proposed as an exemplar of one kind.

    Attributes:
      score: the ranking value; the highest scores win (negate to prefer the smallest).
      image_id: ties on score go to the smallest image id.
      fields: the `ROW_FIELDS` of the image's heatmap row (rank 0).
      raw_record: the serialized tf.train.Example, for the thumbnail; b"" when the winners'
        records are read again from their shards (`fields` source and record_offset), as for
        the strategy candidates, proposed after the clustering.
      boxes: ((ymin, xmin, ymax, xmax), ...) as fractions, drawn on the thumbnail (read from the
        record when it is read again).
      count: the images of its kind it counts for in the kind's total: 1, or, when a step proposes
        only its best few of a kind (`transforms.strategies.AssignStrategies`, per batch), the
        first of them counts for the ones it leaves out.
    """

    score: float
    image_id: str
    fields: dict
    raw_record: bytes
    boxes: tuple = ()
    count: int = 1


@functools.total_ordering
class _Descending:
    """Wraps a string so that smaller strings rank higher (ties to the smallest image id)."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __eq__(self, other) -> bool:
        return self.value == other.value

    def __lt__(self, other) -> bool:
        return self.value > other.value


class CountCandidates(beam.CombineFn):
    """Candidates of a kind -> how many images they stand for (the sum of their `count`)."""

    def create_accumulator(self) -> int:
        return 0

    def add_input(self, total: int, candidate: Candidate) -> int:
        return total + candidate.count

    def merge_accumulators(self, totals) -> int:
        return sum(totals)

    def extract_output(self, total: int) -> int:
        return total


def rank_key(candidate: Candidate) -> tuple:
    """What `Top` compares: the score, then the image id (the smallest first)."""
    return candidate.score, _Descending(candidate.image_id)


def candidate_from_row(row: dict, score: float, raw_record: bytes, boxes: Iterable = ()) -> Candidate:
    """A Candidate from a heatmap row dict."""
    return Candidate(float(score), row["image_id"], {k: row.get(k) for k in ROW_FIELDS}, raw_record,
                     tuple(tuple(b) for b in boxes))


def audit_candidates(row: dict, raw_record: bytes, boxes: Iterable = ()) -> Iterable[tuple[str, Candidate]]:
    """The (kind, Candidate) pairs of one image's rank-0 heatmap row.

    One per flag set (ranked by `FLAG_RANKING`), and one "cell:<predicted class>:<peak ninth>"
    ranked by predicted_score (the shortcut exemplars are chosen among these). When the row
    knows where its record lies in its shard (record_offset), the candidates carry no record
    bytes: the few winners are read again when their tiles are drawn (`record_and_boxes`), and
    the Top accumulators (up to n per kind, 9 cell kinds per predicted class: tens of thousands
    for a 1000-class model) stay ~1 kB a candidate instead of an image's size.
    """
    if row.get("record_offset") is not None:
        raw_record, boxes = b"", ()
    boxes = tuple(boxes)
    for flag, (column, worst_is_largest) in FLAG_RANKING.items():
        value = row.get(column)
        if row.get(flag) and value is not None:
            yield flag_kind(flag), candidate_from_row(row, value if worst_is_largest else -value, raw_record, boxes)
    if row.get("peak_cell") is not None:
        yield (cell_kind(row["predicted_class"], row["peak_cell"]),
               candidate_from_row(row, row["predicted_score"], raw_record, boxes))


def batch_candidates(source: ExemplarBatch, per_kind: Optional[int] = None) -> Iterable[tuple[str, Candidate]]:
    """`audit_candidates` of every rank-0 row of an explained batch at once: per kind the rows that
    belong to it, ranked in numpy (score, then the smallest image id, as `rank_key`); with `per_kind`
    only the best `per_kind` of each kind are proposed, the first counting for those left out
    (`Candidate.count`), so only theirs become dicts."""
    rows = source.rows
    if rows.num_rows == 0:
        return
    ids = rows.column("image_id").to_numpy(zero_copy_only=False).astype(str)
    offsets_known = ~rows.column("record_offset").is_null().to_numpy(zero_copy_only=False)
    names, kinds, members, scores = [], [], [], []  # the kinds' names; per (kind, row) pair: kind, row, score
    for flag, (column, worst_is_largest) in FLAG_RANKING.items():
        flagged = rows.column(flag).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        values, nulls = source.values[column]
        rows_of = np.flatnonzero(flagged & ~nulls)
        if len(rows_of):
            kinds.append(np.full(len(rows_of), len(names)))
            names.append(flag_kind(flag))
            members.append(rows_of)
            scores.append(values[rows_of] if worst_is_largest else -values[rows_of])
    cells = rows.column("peak_cell")
    known = np.flatnonzero(~cells.is_null().to_numpy(zero_copy_only=False))
    if len(known):
        predicted = rows.column("predicted_class").to_numpy(zero_copy_only=False).astype(np.int64)[known]
        cell = cells.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)[known]
        pairs, inverse = np.unique(np.stack([predicted, cell], 1), axis=0, return_inverse=True)
        kinds.append(len(names) + inverse.reshape(-1))
        names += [cell_kind(class_id, ninth) for class_id, ninth in pairs.tolist()]
        members.append(known)
        scores.append(source.values["predicted_score"][0][known])
    if not names:
        return
    kind, row, score = np.concatenate(kinds), np.concatenate(members), np.concatenate(scores)
    order = np.lexsort((ids[row], -score, kind))  # per kind the highest score first, ties to the smallest id
    kind, row, score = kind[order], row[order], score[order]
    starts = np.searchsorted(kind, np.arange(len(names)))
    sizes = np.diff(np.append(starts, len(kind)))
    position = np.arange(len(kind)) - starts[kind]
    kept = sizes if per_kind is None else np.minimum(sizes, per_kind)
    keep = np.flatnonzero(position < kept[kind])
    count = np.where(position == 0, sizes[kind] - kept[kind] + 1, 1)  # the first counts for those left out
    # The proposed rows' fields, converted once (a row proposed for several kinds too).
    picked = np.unique(row[keep])
    fields_of = [f for f in ROW_FIELDS if f in rows.schema.names]
    found = dict(zip(picked.tolist(), rows.select(fields_of).take(pa.array(picked)).to_pylist(), strict=True))
    for k, i, value, n in zip(kind[keep].tolist(), row[keep].tolist(), score[keep].tolist(), count[keep].tolist(),
                              strict=True):
        fields = found[i]
        raw, boxes = (b"", ()) if offsets_known[i] else (source.raw_records[i], source.boxes[i])
        yield names[k], Candidate(value, fields["image_id"], {f: fields.get(f) for f in ROW_FIELDS}, raw,
                                  tuple(tuple(b) for b in boxes), n)


def strategy_kind(class_id: int, cluster_id: int) -> str:
    return f"strategy:{class_id}:{cluster_id}"


def record_and_boxes(winner: Candidate) -> tuple[bytes, tuple]:
    """The winner's serialized record and boxes: those it carries, or read again from its shard
    at `fields["record_offset"]` (one ranged read, both CRCs checked), boxes parsed from the record."""
    if winner.raw_record:
        return winner.raw_record, winner.boxes
    import tensorflow as tf

    fields = winner.fields
    if fields.get("record_offset") is None:
        raise ValueError(f"exemplar {winner.image_id}: no record bytes and no record_offset to read them from")
    raw = read_record_at(fields["source"], int(fields["record_offset"]))
    return raw, _boxes(tf.train.Example.FromString(raw).features.feature)


def exemplar_source(result, *, method: str, target_layer: str,
                    thresholds: FlagThresholds = DEFAULT_THRESHOLDS) -> Optional[ExemplarSource]:
    """The ExemplarSource of an Explained image (its rows formatted with `transforms.heatmap_rows.heatmap_rows`,
    as FormatHeatmapRows does); None for an image that failed. An ExemplarSource or ExemplarBatch passes unchanged."""
    if isinstance(result, (ExemplarSource, ExemplarBatch)):
        return result
    if result.error is not None:
        return None

    rows = heatmap_rows(result, method=method, target_layer=target_layer, thresholds=thresholds)
    return ExemplarSource(rows, result.image.raw_record, result.image.boxes)


class ToExemplarSources(beam.DoFn):
    """Explained image (or an ExemplarSource FormatHeatmapRows already made) -> ExemplarSource."""

    def __init__(self, *, method: str, target_layer: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS):
        self._method = method
        self._target_layer = target_layer
        self._thresholds = thresholds

    def process(self, item):
        source = exemplar_source(item, method=self._method, target_layer=self._target_layer,
                                 thresholds=self._thresholds)
        if source is not None:
            yield source


class ProposeExemplars(beam.DoFn):
    """ExemplarSource -> (kind, Candidate) for each audit kind (flags, peak cell) its image belongs to;
    ExemplarBatch -> those of each of its images (`batch_candidates`; with `per_kind`, each kind's best
    `per_kind` of the batch).

    Needs no side input, so it runs fused with the step that explains the image and only the
    lifted `Top` accumulators leave it (the strategy candidates come from
    `transforms.strategies.AssignStrategies`, without the record bytes)."""

    def __init__(self, per_kind: Optional[int] = None):
        self._per_kind = per_kind

    def process(self, source):
        if isinstance(source, ExemplarBatch):
            yield from batch_candidates(source, self._per_kind)
            return
        first = next(r for r in source.rows if r["target_rank"] == 0)
        yield from audit_candidates(first, source.raw_record, source.boxes)


def exemplar_row(kind: str, rank: int, total: int, winner: Candidate, thumbnail: bytes) -> dict:
    """One row of `transforms.schemas.EXEMPLAR_SCHEMA`."""
    return {"kind": kind, "rank": rank, "score": winner.score, "kind_total": total, **winner.fields,
            "thumbnail": thumbnail}


class DrawThumbnails(beam.DoFn):
    """(kind, [winners, best first]) -> exemplar rows with a JPEG tile each.

    Side inputs: `totals` {kind: number of candidates}; `relabel_input`, passed
    to `relabel(kind, relabel_input)` which names the kind to write (None drops it).
    """

    def __init__(self, image_key: str, relabel: Optional[Callable[[str, Any], Optional[str]]] = None):
        self._image_key = image_key
        self._relabel = relabel
        self._drawn = beam.metrics.Metrics.counter("gradcam_audit", "exemplar_thumbnails")

    def setup(self):
        import os
        from concurrent.futures import ThreadPoolExecutor

        # Pillow releases the GIL while it decodes, resizes and encodes: a kind's tiles are drawn at once.
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(PER_KIND, os.cpu_count() or 1)),
                                        thread_name_prefix="thumbnails")

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def _tile(self, winner: Candidate) -> bytes:
        f = winner.fields
        cam = np.asarray(f["cam"], np.float32).reshape(f["cam_height"], f["cam_width"])
        try:
            raw, boxes = record_and_boxes(winner)
        except (OSError, ValueError) as exc:  # e.g. the shard was moved or rewritten since the job read it
            _LOG.warning("exemplar %s (%s): its record could not be read again (%s); the tile shows the map alone",
                         winner.image_id, f.get("source"), exc)
            raw, boxes = b"", ()
        return overlay_tile(example_image(raw, self._image_key), cam, boxes)

    def process(self, keyed, totals, relabel_input=None):
        kind, winners = keyed
        name = self._relabel(kind, relabel_input) if self._relabel else kind
        if name is None:
            return
        winners = list(winners)[: FAMILY_LIMITS.get(kind.split(":", 1)[0], len(winners))]
        for rank, (winner, tile) in enumerate(zip(winners, self._pool.map(self._tile, winners), strict=True)):
            self._drawn.inc()
            yield exemplar_row(name, rank, totals.get(kind, len(winners)), winner, tile)


class SelectExemplars(beam.PTransform):
    """PCollection[(kind, Candidate)] (or a tuple of them) -> PCollection[exemplar row]: the
    `per_kind` best of each kind.

    Each input is counted and ranked where it is made (Beam lifts both combiners, so only their
    small accumulators leave that step); only the per-input winners and totals are merged. A
    Flatten of the inputs first would move every candidate, record bytes included.

    Args:
      per_kind: exemplars kept per kind.
      image_key: the Example feature holding the encoded image.
      relabel: optional `fn(kind, side) -> Optional[str]` renaming or dropping kinds after the
        selection (before thumbnails are drawn), with `relabel_input` (a side input view such
        as `beam.pvalue.AsDict(pcoll)`) as `side`. Must be picklable (a module-level function).
    """

    def __init__(self, per_kind: int = PER_KIND, image_key: str = "image/encoded",
                 relabel: Optional[Callable[[str, Any], Optional[str]]] = None, relabel_input=None):
        super().__init__()
        self._per_kind = per_kind
        self._image_key = image_key
        self._relabel = relabel
        self._relabel_input = relabel_input

    def expand(self, candidates):
        if not isinstance(candidates, tuple):
            totals = candidates | "CountPerKind" >> beam.CombinePerKey(CountCandidates())
            best = candidates | "TopPerKind" >> beam.combiners.Top.PerKey(self._per_kind, key=rank_key)
        else:
            counted, ranked = [], []
            for i, part in enumerate(candidates):
                counted.append(part | f"CountPerKind{i}" >> beam.CombinePerKey(CountCandidates()))
                ranked.append(part | f"TopPerKind{i}" >> beam.combiners.Top.PerKey(self._per_kind, key=rank_key)
                              | f"Winners{i}" >> beam.FlatMapTuple(lambda kind, winners: ((kind, w) for w in winners)))
            totals = tuple(counted) | "AllCounts" >> beam.Flatten() | "CountPerKind" >> beam.CombinePerKey(sum)
            best = (tuple(ranked) | "AllWinners" >> beam.Flatten()
                    | "TopPerKind" >> beam.combiners.Top.PerKey(self._per_kind, key=rank_key))
        side = [] if self._relabel_input is None else [self._relabel_input]
        return best | "DrawThumbnails" >> beam.ParDo(
            DrawThumbnails(self._image_key, self._relabel), beam.pvalue.AsDict(totals), *side
        )


def shortcut_relabel(kind: str, shortcut_cells: dict) -> Optional[str]:
    """Keeps "flag:*"; "cell:<class>:<ninth>" becomes "shortcut:<class>" when that class is a
    shortcut whose peaks crowd into that ninth (`shortcut_cells` {class_id: ninth}), else dropped;
    other kinds pass unchanged."""
    if not kind.startswith("cell:"):
        return kind
    _, class_id, cell = kind.split(":")
    class_id, cell = int(class_id), int(cell)
    return shortcut_kind(class_id) if shortcut_cells.get(class_id) == cell else None


def _shortcut_cell(stats_row: dict) -> Iterable[tuple[int, int]]:
    if stats_row.get("shortcut") and stats_row.get("peak_cell") is not None:
        yield stats_row["class_id"], stats_row["peak_cell"]


class SelectAuditExemplars(beam.PTransform):
    """(PCollection[Explained, ExemplarSource or ExemplarBatch], PCollection[class_stats row]
    [, PCollection[(kind, Candidate)]]) -> PCollection[exemplar row].

    The worst `per_kind` images of each image flag, and the most confident
    images of each shortcut class among those whose CAM peaks where the
    class's peaks crowd (the report's image grids); given further candidates
    (`transforms.strategies.FindStrategies`' "exemplar_candidates": each map
    with its distance to its strategy's mean), also the images closest to each
    strategy's mean map (kind "strategy:<class>:<cluster>").
    """

    def __init__(self, *, method: str, target_layer: str, image_key: str = "image/encoded",
                 per_kind: int = PER_KIND, thresholds: FlagThresholds = DEFAULT_THRESHOLDS):
        super().__init__()
        self._method = method
        self._target_layer = target_layer
        self._image_key = image_key
        self._per_kind = per_kind
        self._thresholds = thresholds

    def expand(self, inputs):
        explained, class_stats, *more = inputs
        cells = class_stats | "FindShortcutCells" >> beam.FlatMap(_shortcut_cell)
        candidates = (
            explained
            # No side input on this path: it runs fused with FormatHeatmapRows (which makes an
            # ExemplarBatch per batch without formatting the rows twice; Explained images are formatted
            # here), so no image or record is held for later; only Top's accumulators move on.
            | "ToExemplarSources" >> beam.ParDo(ToExemplarSources(
                method=self._method, target_layer=self._target_layer, thresholds=self._thresholds))
            | "ProposeExemplars" >> beam.ParDo(ProposeExemplars(self._per_kind))
        )
        if more:
            candidates = (candidates, *more)
        return candidates | "SelectExemplars" >> SelectExemplars(
            self._per_kind, self._image_key, relabel=shortcut_relabel, relabel_input=beam.pvalue.AsDict(cells))
