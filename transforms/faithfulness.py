"""Beam stages that check the maps: `MeasureFaithfulness`, `CheckSanity`, `SummariseFaithfulness`.

    Explained --MeasureFaithfulness--> Explained | Measured(explained, scores)
        a deterministic share of the images (hash of image_id < share) is
        batched (BatchElements) and scored by `FaithfulnessScorer` (one
        compiled function); the others pass through untouched.
    Explained --CheckSanity--> one dict
        the `sanity_images` images with the smallest id hash (the same ones
        every run), re-explained with the head's weights randomised
        (`cascading_randomisation`).
    heatmap rows + sanity --SummariseFaithfulness--> one dict (faithfulness.json)
        mean gap with a bootstrap interval from a bounded, deterministic
        sample of the gaps, and the sanity check's verdict.

The math lives in `transforms.cam.faithfulness`; the model is loaded with the
model handler's own `load_model` (same file, same options), once per process
for the scorer (`shared.Shared`), once per run for the sanity check (it
overwrites its copy's weights).
"""

from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from transforms.cam.faithfulness import FRACTIONS, ORDERS
from transforms.model_handler import Explained, handler_tag

_LOG = logging.getLogger(__name__)
_NAMESPACE = "gradcam_audit"
_SHARED = shared.Shared()
GAP_SAMPLE = 10_000  # gaps kept for the bootstrap (bottom-k by id hash: deterministic, mergeable)
BOOTSTRAP_RESAMPLES = 1000
DEFAULT_SANITY_CORRELATION = 0.5
COLUMNS = ("faithfulness_morf", "faithfulness_lerf", "faithfulness_random", "faithfulness_gap")
CURVE_COLUMNS = ("deletion_morf", "deletion_lerf", "deletion_random")
FAITHFULNESS_SUMMARY = "faithfulness.json"  # written by the job into the run folder
FAITHFULNESS_NULLS = dict.fromkeys(COLUMNS + CURVE_COLUMNS)


class Measured(NamedTuple):
    """An explained image with its faithfulness scores (rank-0 target).

    scores: {"faithfulness_morf", ..., "faithfulness_gap": float,
    "deletion_morf", "deletion_lerf", "deletion_random": [drop per q]}, or
    None when scoring failed (the row is still written, with nulls).
    """

    explained: Explained
    scores: Optional[dict]


def id_hash(image_id: str) -> tuple[float, int]:
    """(u in [0, 1), int32 seed) from the image id: the same for every run."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    seed = int.from_bytes(digest[8:12], "big") & 0x7FFFFFFF
    return u, seed


def is_sampled(image_id: str, share: float) -> bool:
    """Whether an image is in the faithfulness sample (deterministic per id)."""
    return share > 0 and id_hash(image_id)[0] < share


def unwrap(item) -> tuple[Explained, Optional[dict]]:
    """(explained, scores or None) for an Explained or a Measured element."""
    if isinstance(item, Measured):
        return item.explained, item.scores
    return item, None


def pixels_of(explained: Explained) -> np.ndarray:
    """The model-input pixels float32 [H, W, C] the explainer was given."""
    return np.asarray(explained.image.pixels, np.float32)


class _ScorerHolder:
    """What `shared.Shared` keeps (it needs a weak-referenceable instance)."""

    def __init__(self, scorer):
        self.scorer = scorer


def without_pixels(item: Explained) -> Explained:
    """The image without its model-input pixels: what the steps after the faithfulness scoring keep.

    The runner may hold these elements between stages (the rows wait for the strategies); 600 kB
    of pixels per image (and the decoded batch a view keeps alive) must not travel with them.
    """
    return item._replace(image=item.image._replace(pixels=None, encoded=None))


class SplitFaithfulnessSample(beam.DoFn):
    """Explained -> main output (not sampled, or failed), "sampled" output."""

    SAMPLED = "sampled"

    def __init__(self, share: float):
        self._share = share

    def process(self, item: Explained):
        if item.error is None and len(item.cam) and is_sampled(item.image.image_id, self._share):
            # Its own copy of the pixels: a view would keep its whole decoded batch alive while
            # the sample's batch fills up (a batch of sampled images spans many decoded batches).
            own = item.image._replace(pixels=np.array(pixels_of(item), np.float32, copy=True))
            yield beam.pvalue.TaggedOutput(self.SAMPLED, item._replace(image=own))
        else:
            yield without_pixels(item)


class ScoreFaithfulness(beam.DoFn):
    """A batch of Explained -> Measured, one call of the compiled scorer per batch."""

    def __init__(self, handler):
        self._handler = handler  # plain settings; its load_model builds the explainer
        self._tag = "faithfulness-" + handler_tag(handler)
        self._scored = beam.metrics.Metrics.counter(_NAMESPACE, "faithfulness_scored")
        self._failed = beam.metrics.Metrics.counter(_NAMESPACE, "faithfulness_failed")

    def setup(self):
        from transforms.cam.faithfulness import FaithfulnessScorer
        from transforms.model_handler import acquire_worker

        def load():
            # The explaining step's CamWorker (one model per process for both steps).
            self._worker = acquire_worker(self._handler)
            return _ScorerHolder(FaithfulnessScorer.from_explainer(self._worker.explainer))

        self._holder = _SHARED.acquire(load, tag=self._tag)

    def process(self, batch: list):
        import tensorflow as tf

        try:
            out = self._holder.scorer(
                np.stack([pixels_of(item) for item in batch]),
                np.stack([np.asarray(item.cam[0], np.float32) for item in batch]),
                np.array([int(item.target_class[0]) for item in batch], np.int32),
                np.array([id_hash(item.image.image_id)[1] for item in batch], np.int32),
            )
        except (tf.errors.OpError, ValueError) as exc:
            _LOG.warning("Faithfulness of a batch of %d failed (%s); its rows get nulls", len(batch), exc)
            self._failed.inc(len(batch))
            for item in batch:
                yield Measured(without_pixels(item), None)
            return
        self._scored.inc(len(batch))
        batch = [without_pixels(item) for item in batch]
        for i, item in enumerate(batch):
            scores = {column: float(out[key][i]) for column, key in zip(COLUMNS, (*ORDERS, "gap"), strict=True)}
            for o, column in enumerate(CURVE_COLUMNS):
                scores[column] = [float(v) for v in out["curves"][o, i]]
            yield Measured(item, scores)


class MeasureFaithfulness(beam.PTransform):
    """PCollection[Explained] -> PCollection[Explained | Measured]."""

    def __init__(self, handler, share: float, batch_size: int):
        super().__init__()
        self._handler = handler
        self._share = share
        self._batch_size = batch_size

    def expand(self, explained):
        split = explained | "SplitSample" >> beam.ParDo(SplitFaithfulnessSample(self._share)).with_outputs(
            SplitFaithfulnessSample.SAMPLED, main="rest"
        )
        scored = (
            split[SplitFaithfulnessSample.SAMPLED]
            | "BatchSampled" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
            | "ScoreBatches" >> beam.ParDo(ScoreFaithfulness(self._handler))
        )
        return (split.rest, scored) | "JoinScored" >> beam.Flatten()


# --- Sanity check ------------------------------------------------------------------


def sanity_item(item: Explained):
    """(hash, image_id, pixels, target class): what the sanity sample keeps of an image."""
    # uint8 (the pixels are 0-255): a quarter of the bytes through the sample's combiner; the real and
    # the randomised maps are both computed on these same pixels.
    pixels = np.clip(np.rint(pixels_of(item)), 0, 255).astype(np.uint8)
    return id_hash(item.image.image_id)[0], item.image.image_id, pixels, int(item.target_class[0])


class RunSanityCheck(beam.DoFn):
    """The sanity sample (a list) -> one dict: cascading randomisation of the head."""

    def __init__(self, sanity_model_settings: dict, max_correlation: float, seed: int = 0):
        self._settings = sanity_model_settings
        self._max_correlation = max_correlation
        self._seed = seed

    def process(self, sample: list):
        from transforms.cam.faithfulness import cascading_randomisation

        if not sample:
            yield {"images": 0, "layers": [], "correlations": [], "correlation": None, "flagged": False,
                   "max_correlation": self._max_correlation}
            return
        explainer = load_sanity_explainer(**self._settings)
        images = np.stack([s[2] for s in sample]).astype(np.float32)
        targets = np.array([s[3] for s in sample], np.int32)
        result = cascading_randomisation(explainer, images, targets, seed=self._seed)
        final = result["correlations"][-1] if result["correlations"] else None
        yield {
            "images": len(sample),
            "image_ids": [s[1] for s in sample],
            "layers": result["layers"],
            "correlations": result["correlations"],
            "correlation": final,
            "max_correlation": self._max_correlation,
            # Flagged: the maps barely changed with the head's weights random.
            "flagged": bool(final is not None and final > self._max_correlation),
            "note": None if result["layers"] else "no weighted layer after the target layer: nothing to randomise",
        }


def load_sanity_explainer(*, model_uri: str, weights: Optional[str], safe_mode: bool, target_layer: str,
                          method: str, preprocess: str, image_size: Optional[tuple[int, int]] = None):
    """A fresh explainer (its own model copy) that explains the class given as label."""
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import TargetSpec
    from transforms.model_loading import load_keras_model

    model = load_keras_model(model_uri, weights=weights, safe_mode=safe_mode)
    return CamExplainer(model, target_layer=target_layer, method=method, target=TargetSpec(mode="label"),
                        preprocess=preprocess, image_size=image_size)


class CheckSanity(beam.PTransform):
    """PCollection[Explained] -> PCollection of one sanity-check dict."""

    def __init__(self, settings: dict, images: int, max_correlation: float = DEFAULT_SANITY_CORRELATION):
        super().__init__()
        self._settings = settings
        self._images = images
        self._max_correlation = max_correlation

    def expand(self, explained):
        return (
            explained
            | "KeepExplained" >> beam.Filter(lambda item: item.error is None and len(item.cam) > 0)
            | "ToSanityItem" >> beam.Map(sanity_item)
            | "SelectSanitySample" >> beam.combiners.Top.Smallest(self._images, key=lambda s: (s[0], s[1]))
            | "RandomiseHead" >> beam.ParDo(RunSanityCheck(self._settings, self._max_correlation))
        )


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
    """(id hash, gap) of a scored rank-0 heatmap row."""
    if row.get("target_rank") == 0 and row.get("faithfulness_gap") is not None:
        yield id_hash(row["image_id"])[0], float(row["faithfulness_gap"])


class SummariseFaithfulness(beam.PTransform):
    """(heatmap rows, sanity dicts) -> one dict: the run's faithfulness summary."""

    def __init__(self, share: float, fractions=FRACTIONS):
        super().__init__()
        self._share = share
        self._fractions = list(fractions)

    def expand(self, inputs):
        rows, sanity = inputs
        share, fractions = self._share, self._fractions
        gaps = (
            rows
            | "SelectGaps" >> beam.FlatMap(gap_item)
            | "SummariseGaps" >> beam.CombineGlobally(GapSummaryFn())
        )

        def assemble(gap_summary, sanity_results):
            return {"sample_share": share, "fractions": fractions, **gap_summary,
                    "sanity": sanity_results[0] if sanity_results else None}

        return gaps | "AddSanity" >> beam.Map(assemble, beam.pvalue.AsList(sanity))
