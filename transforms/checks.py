"""Beam stages that check the maps: the checks' sample, its scoring, the sanity check, the summary.

    heatmap rows (Arrow batches) --SelectCheckImages--> one list of CheckImage
        the images with the smallest id hashes (bottom-k of a SHA-256 of the
        image id: the same images every run), chosen without their pixels:
        each batch offers its k smallest (hash, image id, source, record
        offset, target class, rank-0 map), `Top.Smallest(k)` keeps the k.
    the sample --ScoreCheckImages--> faithfulness score rows (at most
        `--faithfulness_images`, and only ids whose hash falls in the
        `--faithfulness_sample` share): their records read again by offset
        (as the exemplars' tiles are), decoded and scored by
        `FaithfulnessScorer` (one compiled function) in full batches.
    the sample --RunSanityCheck--> one dict
        the first `sanity_images` of the sample, read again the same way,
        re-explained with the head's weights randomised
        (`cascading_randomisation`).
    score rows --> the heatmaps' faithfulness columns (`with_scores`, a side
        input of at most `--faithfulness_images` rows), the class statistics
        (`transforms.class_stats`), and with the sanity dict
        --SummariseFaithfulness--> one dict (faithfulness.json): mean gap with
        a bootstrap interval, and the sanity check's verdict.

So the checks cost (scored images) x (their model passes), whatever the
dataset's size: an image outside the sample costs one hash in the batch it
is formatted in. (What the job did before, scoring a share of the images
inside the stream in the batches each bundle yields, is the tests' reference
for the re-read scoring: `tests/reference_checks.py`.)

The math lives in `transforms.cam.faithfulness`; the model is loaded with the
model handler's own `load_model` (same file, same options), once per process
for the scorer (`shared.Shared`), once per run for the sanity check (it
overwrites its copy's weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from transforms.cam.faithfulness import FRACTIONS, ORDERS
from transforms.model_handler import BATCH_SIZE, handler_tag
from transforms.settings import option

_LOG = logging.getLogger(__name__)
_NAMESPACE = "gradcam_audit"
_SHARED = shared.Shared()
GAP_SAMPLE = 10_000  # gaps kept for the bootstrap (bottom-k by id hash: deterministic, mergeable)
BOOTSTRAP_RESAMPLES = 1000
COLUMNS = ("faithfulness_morf", "faithfulness_lerf", "faithfulness_random", "faithfulness_gap")
CURVE_COLUMNS = ("deletion_morf", "deletion_lerf", "deletion_random")
FAITHFULNESS_SUMMARY = "faithfulness.json"  # written by the job into the run folder
FAITHFULNESS_NULLS = dict.fromkeys(COLUMNS + CURVE_COLUMNS)


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """The run's checks of its own maps; every field is also an option of `python -m pipeline`.

    `faithfulness_images`: the check's cost is a fixed part (its scorer's trace, the sample's records read
    again, the extra stages: ~3 s, ~370 forward passes of MobileNetV2 at 120 img/s on 2 cores) + 13 model
    passes per scored image. 5% of a 10,000-image job at a whole-job P/F of 0.8 (12,500 forward passes)
    allows (0.05 x 12,500 - 370) / 13 = 19 images; 16, the first half of the sanity check's 32 (the same
    smallest id hashes). With 32 the check measured 6.4% (docs/checks.md).
    """

    faithfulness_sample: float = option(
        1.0, "Share of the images (chosen by a hash of the image id, the same every run) that may get deletion "
        "scores (faithfulness_* columns; 0 turns the check off); the default 1 leaves the bound to "
        "--faithfulness_images, so the check costs the same on 1,000 and on 10 million images",
        kind="share")
    faithfulness_images: int = option(
        16, "At most this many images get deletion scores: the smallest id hashes among the "
        "--faithfulness_sample share (the same every run), read again after the main pass and scored in "
        "full batches, so the check's cost does not grow with the dataset (0 turns it off)", kind="count")
    sanity_images: int = option(
        32, "Images (the same every run) re-explained with the head's weights randomised (sanity check; 0: off)",
        kind="count")
    max_sanity_correlation: float = option(
        0.5, "Flag the run when the real and randomised maps still rank-correlate more than this", kind="number")


def id_hash(image_id: str) -> tuple[float, int]:
    """(u in [0, 1), int32 seed) from the image id: the same for every run."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    seed = int.from_bytes(digest[8:12], "big") & 0x7FFFFFFF
    return u, seed


def is_sampled(image_id: str, share: float) -> bool:
    """Whether an image is in the faithfulness sample (deterministic per id)."""
    return share > 0 and id_hash(image_id)[0] < share


class _ScorerHolder:
    """What `shared.Shared` keeps (it needs a weak-referenceable instance)."""

    def __init__(self, scorer):
        self.scorer = scorer


def score_rows(out: dict, count: int) -> list[dict]:
    """The scorer's output for a batch of `count` images -> one dict of the faithfulness columns
    (`COLUMNS`, `CURVE_COLUMNS`) per image, in the batch's order."""
    rows = []
    for i in range(count):
        scores = {column: float(out[key][i]) for column, key in zip(COLUMNS, (*ORDERS, "gap"), strict=True)}
        for o, column in enumerate(CURVE_COLUMNS):
            scores[column] = [float(v) for v in out["curves"][o, i]]
        rows.append(scores)
    return rows


def acquire_scorer(handler, tag: str):
    """(the process's CamWorker for `handler`, a holder of its FaithfulnessScorer): the explaining
    step's model (one per process for both steps), its scorer traced once per process."""
    from transforms.cam.faithfulness import FaithfulnessScorer
    from transforms.model_handler import acquire_worker

    worker = acquire_worker(handler)
    holder = _SHARED.acquire(lambda: _ScorerHolder(FaithfulnessScorer.from_explainer(worker.explainer)), tag=tag)
    return worker, holder


# --- The checks' sample: a bottom-k of id hashes, without pixels ----------------------------------


class CheckImage(NamedTuple):
    """What the checks' sample keeps of an explained image: where its record lies, not its pixels.

    Attributes:
      hash: `id_hash(image_id)[0]`, the sampling key (smallest first).
      image_id, source, record_offset: the image and its record (read again by offset).
      target_class: the rank-0 target the map explains.
      cam: float32 [h, w], the rank-0 map (the faithfulness scorer's input; ~200 bytes at 7x7).
    """

    hash: float
    image_id: str
    source: str
    record_offset: int
    target_class: int
    cam: np.ndarray


def sample_key(item: CheckImage) -> tuple:
    """The sample's order: the id hash, then the id, then where the record lies (ties of a repeated id)."""
    return item.hash, item.image_id, item.source, item.record_offset


def check_candidates(batch, k: int) -> list[CheckImage]:
    """The CheckImages of an Arrow batch of heatmap rows that can be among the run's `k` smallest:
    its rank-0 rows with a known record offset whose id hash is at most the batch's k-th smallest
    (ties kept, so `Top.Smallest` decides them). Per row: one hash; no pixels, no dict."""
    from transforms.arrow_columns import numpy_column

    if k <= 0 or batch.num_rows == 0:
        return []
    offsets = numpy_column(batch, "record_offset", np.int64)  # null -> -1: the record cannot be read again
    rows = np.flatnonzero((numpy_column(batch, "target_rank", np.int64) == 0) & (offsets >= 0))
    if not len(rows):
        return []
    ids = batch.column("image_id").take(rows).to_pylist()
    hashes = np.array([id_hash(image_id)[0] for image_id in ids])
    if len(hashes) > k:
        keep = np.flatnonzero(hashes <= np.partition(hashes, k - 1)[k - 1])
    else:
        keep = np.arange(len(hashes))
    picked = rows[keep]
    sources = batch.column("source").take(picked).to_pylist()
    targets = numpy_column(batch, "target_class", np.int64)[picked]
    heights = numpy_column(batch, "cam_height", np.int64)[picked]
    widths = numpy_column(batch, "cam_width", np.int64)[picked]
    cams = batch.column("cam")
    out = []
    for j, row in enumerate(picked.tolist()):
        cam = cams[row].values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(heights[j], widths[j])
        out.append(CheckImage(float(hashes[keep[j]]), ids[keep[j]], sources[j], int(offsets[row]),
                              int(targets[j]), cam))
    return out


class SelectCheckImages(beam.PTransform):
    """PCollection[Arrow batch of heatmap rows] -> PCollection of one list: the `k` CheckImages with the
    smallest `sample_key`, smallest first (fewer when the run has fewer images; [] with none).

    Each batch offers at most its k smallest (`check_candidates`, fused with the step that makes the
    batches); Beam lifts `Top.Smallest`, so only its accumulators of k small tuples leave that step."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def expand(self, batches):
        k = self._k
        return (
            batches
            | "OfferCheckImages" >> beam.FlatMap(check_candidates, k)
            | "KeepSmallestHashes" >> beam.combiners.Top.Smallest(k, key=sample_key)
        )


def faithfulness_sample(sample: list, share: float, images: int) -> list[CheckImage]:
    """The images of the checks' sample that get deletion scores: the `images` smallest id hashes,
    of those only the ones in the `share` (hash < share; both bound the same order, so the result is
    the smaller of the two prefixes)."""
    if share <= 0 or images <= 0:
        return []
    return [item for item in sorted(sample, key=sample_key)[:images] if item.hash < share]


def _example_image(raw: bytes, image_key: str) -> bytes:
    import tensorflow as tf

    from transforms.decode import _first

    encoded = _first(tf.train.Example.FromString(raw).features.feature, image_key)
    if not isinstance(encoded, bytes) or not encoded:
        raise ValueError(f"no image bytes in feature {image_key!r}")
    return encoded


def read_check_pixels(items: list, image_key: str, decode, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, list]:
    """The model-input pixels of the sample's images, read again from their shards.

    Each shard's records are read with one open (`records.read_records_at`, shards in parallel threads:
    a ranged read each on gs://), the images decoded by `decode` (the job's `BatchImageDecoder`, the
    same function the main pass used, so the same pixels) in batches of `batch_size`. An image whose
    record can no longer be read or decoded (the shard changed since the main pass) is left out with a
    warning.

    Returns:
      (float32 [G, H, W, C], the G items read and decoded, in the order given).
    """
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf
    from google.protobuf.message import DecodeError

    from transforms.records import read_records_at

    by_source: dict = {}
    for item in items:
        by_source.setdefault(item.source, []).append(item.record_offset)

    def read(source):
        try:
            return source, read_records_at(source, by_source[source])
        except OSError as exc:
            return source, {offset: exc for offset in by_source[source]}

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(by_source)))) as pool:
        records = dict(pool.map(read, list(by_source)))
    kept, encoded = [], []
    for item in items:
        raw = records[item.source][item.record_offset]
        try:
            if isinstance(raw, Exception):
                raise raw
            encoded.append(_example_image(raw, image_key))
            kept.append(item)
        except (OSError, ValueError, DecodeError) as exc:
            _LOG.warning("check image %s (%s): its record could not be read again (%s); left out",
                         item.image_id, item.source, exc)
    arrays, good = [], []
    for start in range(0, len(kept), batch_size):
        part, data = kept[start : start + batch_size], encoded[start : start + batch_size]
        try:
            arrays.append(np.asarray(decode(data)[0], np.float32))
            good.extend(part)
            continue
        except (tf.errors.OpError, ValueError):
            pass
        for item, one in zip(part, data, strict=True):  # the failure path only: image by image
            try:
                arrays.append(np.asarray(decode([one])[0], np.float32))
                good.append(item)
            except (tf.errors.OpError, ValueError) as exc:
                _LOG.warning("check image %s (%s): does not decode again (%s); left out",
                             item.image_id, item.source, str(exc).splitlines()[0][:200])
    if not arrays:
        return np.zeros([0]), []
    return np.concatenate(arrays), good


class ScoreCheckImages(beam.DoFn):
    """The checks' sample (one list) -> a faithfulness score row per scored image (`faithfulness_sample`):
    {"image_id", "source", "record_offset", "target_rank": 0, "target_class", COLUMNS..., CURVE_COLUMNS...}.

    The images are read again and scored in full batches of `batch_size` (the last one holds the rest),
    with the explaining step's model and scorer (`acquire_scorer`). A batch that fails in the model is
    logged and its images get no scores (their rows keep nulls), as before."""

    def __init__(self, handler, share: float, images: int, image_key: str, batch_size: int):
        self._handler = handler
        self._share = share
        self._images = images
        self._image_key = image_key
        self._batch_size = batch_size
        self._tag = "faithfulness-" + handler_tag(handler)
        self._scored = beam.metrics.Metrics.counter(_NAMESPACE, "faithfulness_scored")
        self._failed = beam.metrics.Metrics.counter(_NAMESPACE, "faithfulness_failed")

    def setup(self):
        self._worker, self._holder = acquire_scorer(self._handler, self._tag)

    def process(self, sample: list):
        import tensorflow as tf

        chosen = faithfulness_sample(sample, self._share, self._images)
        if not chosen:
            return
        pixels, items = read_check_pixels(chosen, self._image_key, self._worker.decode, self._batch_size)
        self._failed.inc(len(chosen) - len(items))
        for start in range(0, len(items), self._batch_size):
            part = items[start : start + self._batch_size]
            try:
                out = self._holder.scorer(
                    pixels[start : start + len(part)],
                    np.stack([item.cam for item in part]),
                    np.array([item.target_class for item in part], np.int32),
                    np.array([id_hash(item.image_id)[1] for item in part], np.int32),
                )
            except (tf.errors.OpError, ValueError) as exc:
                _LOG.warning("Faithfulness of a batch of %d failed (%s); its rows get nulls", len(part), exc)
                self._failed.inc(len(part))
                continue
            self._scored.inc(len(part))
            for item, scores in zip(part, score_rows(out, len(part)), strict=True):
                yield {"image_id": item.image_id, "source": item.source, "record_offset": item.record_offset,
                       "target_rank": 0, "target_class": item.target_class, **scores}


def record_key(score_row: dict) -> tuple:
    """((source, record_offset), score row): how the heatmap rows find their scores."""
    return (score_row["source"], score_row["record_offset"]), score_row


def with_scores(batch, scores: dict):
    """An Arrow batch of heatmap rows with the faithfulness columns of its scored rank-0 rows filled from
    `scores` {(source, record_offset): score row}; the batch itself when none of its rows was scored
    (one vectorised look-up of its ids: nothing per unscored row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.arrow_columns import numpy_column

    if not scores or batch.num_rows == 0:
        return batch
    ids = pa.array(sorted({row["image_id"] for row in scores.values()}), pa.string())
    hit = pc.is_in(batch.column("image_id"), value_set=ids).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(hit & (numpy_column(batch, "target_rank", np.int64) == 0))
    if not len(rows):
        return batch
    offsets = numpy_column(batch, "record_offset", np.int64)[rows].tolist()
    sources = batch.column("source").take(rows).to_pylist()
    names = COLUMNS + CURVE_COLUMNS
    columns = {name: batch.column(name).to_pylist() for name in names}
    for row, source, offset in zip(rows.tolist(), sources, offsets, strict=True):
        found = scores.get((source, offset))
        if found is not None:
            for name in names:
                columns[name][row] = found[name]
    arrays = [pa.array(columns[field.name], field.type) if field.name in columns else batch.column(i)
              for i, field in enumerate(batch.schema)]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


# --- Sanity check ------------------------------------------------------------------


def sanity_pixels(pixels: np.ndarray) -> np.ndarray:
    """The pixels the sanity check explains: rounded to whole 0-255 values, as float32 (the check has
    always explained these: the real and the randomised maps are both computed on them)."""
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).astype(np.float32)


class RunSanityCheck(beam.DoFn):
    """The checks' sample (a list, smallest hashes first) -> one dict: cascading randomisation of the
    head on its first `images` images, read again from their shards."""

    def __init__(self, sanity_model_settings: dict, max_correlation: float, images: int,
                 image_key: str = "image/encoded", batch_size: int = BATCH_SIZE, seed: int = 0):
        self._settings = sanity_model_settings
        self._max_correlation = max_correlation
        self._images = images
        self._image_key = image_key
        self._batch_size = batch_size
        self._seed = seed

    def _empty(self) -> dict:
        return {"images": 0, "layers": [], "correlations": [], "correlation": None, "flagged": False,
                "max_correlation": self._max_correlation}

    def process(self, sample: list):
        from transforms.cam.faithfulness import cascading_randomisation
        from transforms.decode import BatchImageDecoder

        chosen = sorted(sample, key=sample_key)[: self._images]
        if not chosen:
            yield self._empty()
            return
        explainer = load_sanity_explainer(**self._settings)
        pixels, items = read_check_pixels(chosen, self._image_key, BatchImageDecoder(explainer.input_shape),
                                          self._batch_size)
        if not items:
            yield self._empty()
            return
        targets = np.array([item.target_class for item in items], np.int32)
        result = cascading_randomisation(explainer, sanity_pixels(pixels), targets, seed=self._seed)
        final = result["correlations"][-1] if result["correlations"] else None
        yield {
            "images": len(items),
            "image_ids": [item.image_id for item in items],
            "layers": result["layers"],
            "correlations": result["correlations"],
            "correlation": final,
            "max_correlation": self._max_correlation,
            # Flagged: the maps barely changed with the head's weights random.
            "flagged": bool(final is not None and final > self._max_correlation),
            "note": None if result["layers"] else "no weighted layer after the target layer: nothing to randomise",
        }


def load_sanity_explainer(*, model_uri: str, weights: Optional[str], safe_mode: bool, target_layer: str,
                          custom_code: tuple = (),
                          method: str, preprocess: str, image_size: Optional[tuple[int, int]] = None,
                          token_grid: Optional[tuple[int, int]] = None, prefix_tokens: Optional[int] = None,
                          output=None):
    """A fresh explainer (its own model copy) that explains the class given as label, with the job's
    explainer settings (`ModelInfo.explainer_options`: the token layout and the output it explains)."""
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import TargetSpec
    from transforms.model_loading import load_keras_model

    model = load_keras_model(model_uri, weights=weights, safe_mode=safe_mode, custom_code=custom_code)
    return CamExplainer(model, target_layer=target_layer, method=method, target=TargetSpec(mode="label"),
                        preprocess=preprocess, image_size=image_size, token_grid=token_grid,
                        prefix_tokens=prefix_tokens, output=output)


# --- Run-level summary -------------------------------------------------------------


class GapSummaryFn(beam.CombineFn):
    """(id hash, gap) pairs -> count, mean and a bootstrap interval of the mean gap.

    Exact count/sum/sum of squares, plus the GAP_SAMPLE gaps with the smallest
    id hashes (a uniform sample, the same whatever the order or the merge
    tree): the launcher never reads the heatmaps for this.
    """

    def __init__(self, sample_size: int = GAP_SAMPLE, resamples: int = BOOTSTRAP_RESAMPLES):
        super().__init__()
        self._size = sample_size
        self._resamples = resamples

    def create_accumulator(self):
        return [0, 0.0, 0.0, 0, []]  # count, sum, sum of squares, positives, [(hash, gap)]

    def add_input(self, acc, item):
        key, gap = item
        acc[0] += 1
        acc[1] += gap
        acc[2] += gap * gap
        acc[3] += gap > 0
        acc[4].append((key, gap))
        if len(acc[4]) > 2 * self._size:
            acc[4] = sorted(acc[4])[: self._size]
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for i in range(4):
                merged[i] += acc[i]
            merged[4].extend(acc[4])
        merged[4] = sorted(merged[4])[: self._size]
        return merged

    def compact(self, acc):
        acc[4] = sorted(acc[4])[: self._size]
        return acc

    def extract_output(self, acc) -> dict:
        count, total, squares, positive, sample = acc
        if not count:
            return {"rows": 0, "mean_gap": None, "gap_ci95": None, "share_positive_gap": None,
                    "bootstrap_sample": 0}
        gaps = np.array([g for _, g in sorted(sample)[: self._size]], np.float64)
        rng = np.random.default_rng(0)
        means = gaps[rng.integers(0, len(gaps), (self._resamples, len(gaps)))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        mean = total / count
        return {
            "rows": count,
            "mean_gap": mean,
            "gap_std": float(np.sqrt(max(squares / count - mean * mean, 0.0))),
            "gap_ci95": [float(low), float(high)],
            "share_positive_gap": positive / count,
            "bootstrap_sample": len(gaps),
        }


def gap_item(row: dict):
    """(id hash, gap) of a scored rank-0 heatmap row (or a `ScoreCheckImages` score row)."""
    if row.get("target_rank") == 0 and row.get("faithfulness_gap") is not None:
        yield id_hash(row["image_id"])[0], float(row["faithfulness_gap"])


class SummariseFaithfulness(beam.PTransform):
    """(score rows or heatmap rows, sanity dicts) -> one dict: the run's faithfulness summary.

    `share` and `max_images` (--faithfulness_sample, --faithfulness_images) are recorded with it; "rows"
    counts the scored images and "bootstrap_sample" the gaps the interval was drawn from."""

    def __init__(self, share: float, fractions=FRACTIONS, max_images: Optional[int] = None):
        super().__init__()
        self._share = share
        self._fractions = list(fractions)
        self._max_images = max_images

    def expand(self, inputs):
        rows, sanity = inputs
        share, fractions, max_images = self._share, self._fractions, self._max_images
        gaps = (
            rows
            | "SelectGaps" >> beam.FlatMap(gap_item)
            | "SummariseGaps" >> beam.CombineGlobally(GapSummaryFn())
        )

        def assemble(gap_summary, sanity_results):
            return {"sample_share": share, "max_images": max_images, "fractions": fractions, **gap_summary,
                    "sanity": sanity_results[0] if sanity_results else None}

        return gaps | "AddSanity" >> beam.Map(assemble, beam.pvalue.AsList(sanity))
