"""The job's former in-stream faithfulness scoring, kept as the reference the re-read scoring is tested
against (`tests/test_faithfulness_checks.py`); the job itself scores a bounded sample read again by offset
(`transforms.checks.ScoreCheckImages`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from transforms.checks import acquire_scorer, id_hash, is_sampled, score_rows
from transforms.model_handler import Explained, handler_tag

_LOG = logging.getLogger(__name__)


class Measured(NamedTuple):
    """An explained image with its faithfulness scores (rank-0 target).

    scores: {"faithfulness_morf", ..., "faithfulness_gap": float,
    "deletion_morf", "deletion_lerf", "deletion_random": [drop per q]}, or
    None when scoring failed (the row is still written, with nulls).
    """

    explained: Explained
    scores: Optional[dict]


def pixels_of(explained: Explained) -> np.ndarray:
    """The model-input pixels float32 [H, W, C] the explainer was given."""
    return np.asarray(explained.image.pixels, np.float32)


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
    """A batch of Explained -> Measured, one call of the compiled scorer per batch (the in-stream
    scoring of `MeasureFaithfulness`)."""

    def __init__(self, handler):
        self._handler = handler  # plain settings; its load_model builds the explainer
        self._tag = "faithfulness-" + handler_tag(handler)
        self._scored = beam.metrics.Metrics.counter("gradcam_audit", "faithfulness_scored")
        self._failed = beam.metrics.Metrics.counter("gradcam_audit", "faithfulness_failed")

    def setup(self):
        self._worker, self._holder = acquire_scorer(self._handler, self._tag)

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
        for item, scores in zip(batch, score_rows(out, len(batch)), strict=True):
            yield Measured(without_pixels(item), scores)


class MeasureFaithfulness(beam.PTransform):
    """PCollection[Explained] -> PCollection[Explained | Measured]: the images whose id hash falls in
    `share` scored inside the stream, in the batches each bundle yields.

    Not in the job's graph (the job scores a bounded sample after the main pass: `SelectCheckImages`,
    `ScoreCheckImages`); kept as the reference for the same images' scores."""

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
