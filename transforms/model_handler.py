"""`KerasCamModelHandler`: Beam RunInference handler that decodes and explains batches.

`__init__` keeps plain settings only (it is pickled to every worker);
`load_model` loads the Keras model once per worker process (RunInference
shares it across threads with `shared.Shared`), applies `--mixed_precision`,
and compiles the explainer and the batch image decoder (`CamWorker`);
`run_inference` decodes the batch's encoded images in one call of the
decoder's `tf.function` (CPU), then makes one call of the explainer's (the
decoded batch goes to the device once). An image that does not decode
becomes an error (stage "decode") while the rest of its batch is explained;
a batch that fails in the model is retried image by image (stage "compute").

`ExplainBatches` is the job's explaining step: it batches the images itself
and runs each batch's `run_inference` on a background thread, so the
TensorFlow work of one batch (which releases the GIL and uses every core)
overlaps the Python work of the same Beam thread: reading and checking the
next records, formatting the rows of the previous batch. RunInference runs
each batch synchronously in the element's thread; the job uses it only for
`--large_model` (one model per machine, served to the worker processes).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import pickle
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from transforms.cam.targets import TargetSpec
from transforms.decode import BatchImageDecoder, DecodedImage, decode_batch

_LOG = logging.getLogger(__name__)
BATCH_SIZE = 32  # images per model call (--batch_size)
# Batches decoded at once by `ExplainBatches`: with one, the cores idle while a batch's last images decode
# (and between batches); with two, the job fed a near-free model at 0.87 of tf.data's best pass by wall
# clock instead of 0.75 (bench/README.md, "Two batches decode at once").
DECODE_THREADS = 2


class Explained(NamedTuple):
    """The model's answer for one image (arrays have a leading K axis)."""

    image: DecodedImage
    predicted_class: int
    predicted_score: float
    target_class: np.ndarray  # [K] int
    target_score: np.ndarray  # [K] float
    target_logit: np.ndarray  # [K] float
    cam: np.ndarray  # [K, h, w] float32
    error: Optional[tuple[str, str]] = None  # (error, message) when the image failed
    error_stage: str = "compute"  # the errors table's stage of `error`: "decode" or "compute"
    attention: Optional[list] = None  # [K] dicts of `attention.GEOMETRY_KEYS`, computed for the whole batch
    scores: Optional[np.ndarray] = None  # [num_classes] every class's probability (multi-label runs only)


class ExplainedBatch(NamedTuple):
    """One batch's answer as one element: the explained images' heatmap rows as arrays (one row per
    valid target slot, image-major, ranks in order) and the images that failed.

    What `ExplainBatches` emits per batch and `transforms.heatmap_rows.FormatHeatmapRows` turns into
    one Arrow batch of heatmap rows: no per-image object for an image that was explained.
    """

    images: list  # [N] DecodedImage: the explained images, in the batch's order (from_output: without pixels)
    predicted_class: np.ndarray  # [N] int
    predicted_score: np.ndarray  # [N] float
    row_image: np.ndarray  # [R] int: the image (index into `images`) of each row
    target_rank: np.ndarray  # [R] int
    target_class: np.ndarray  # [R] int
    target_score: np.ndarray  # [R] float
    target_logit: np.ndarray  # [R] float
    cam: np.ndarray  # [R, h, w] float32
    attention: Optional[dict]  # {GEOMETRY_KEYS key: ([R] float64 values, [R] bool nulls)}; None: not computed
    scores: Optional[np.ndarray] = None  # [N, num_classes] every class's probability (multi-label runs only)
    failed: tuple = ()  # Explained with `error` set: the images that failed (decode or compute)

    @classmethod
    def from_output(cls, images: Sequence[DecodedImage], out: dict, multilabel: bool = False) -> "ExplainedBatch":
        """A batch from the compiled explainer's output (`CamExplainer.__call__`) on `images`: the valid
        slots (`target_valid`) of the images with a finite output become rows, with their attention
        statistics computed over the whole batch in one numpy pass (`attention.attention_columns`);
        an image with non-finite output becomes a failure."""
        from transforms.attention import attention_columns

        finite = np.asarray(out["finite"], bool)
        cams = np.asarray(out["cam"], np.float32)
        valid = np.asarray(out.get("target_valid", np.ones(cams.shape[:2], bool)), bool) & finite[:, None]
        pairs = np.argwhere(valid)  # (image, slot) of every row, image-major
        image, slot = pairs[:, 0], pairs[:, 1]
        kept = np.flatnonzero(finite)
        sizes = np.array([(item.image_height, item.image_width) for item in images], np.int64).reshape(-1, 2)
        attention = attention_columns(cams[image, slot], sizes[image], [images[i].boxes for i in image.tolist()])
        failed = tuple(_failed(images[i], "NonFiniteOutput", "the model's scores or the CAM hold NaN or Inf")
                       for i in np.flatnonzero(~finite).tolist())
        return cls(
            # Without pixels and encoded bytes, and without the record where it can be read again (its
            # offset is known: only exemplars use it): the element stays small wherever the runner encodes it.
            images=[images[i]._replace(pixels=None, encoded=None,
                                       raw_record=images[i].raw_record if images[i].record_offset < 0 else b"")
                    for i in kept.tolist()],
            predicted_class=np.asarray(out["predicted_class"])[kept],
            predicted_score=np.asarray(out["predicted_score"])[kept],
            row_image=np.cumsum(finite)[image] - 1,
            target_rank=(np.cumsum(valid, axis=1) - 1)[image, slot],
            target_class=np.asarray(out["target_class"])[image, slot],
            target_score=np.asarray(out["target_score"])[image, slot],
            target_logit=np.asarray(out["target_logit"])[image, slot],
            cam=cams[image, slot],
            attention=attention,
            scores=np.asarray(out["scores"], np.float32)[kept] if multilabel and "scores" in out else None,
            failed=failed,
        )

    @classmethod
    def from_results(cls, results: Sequence[Explained]) -> "ExplainedBatch":
        """A batch of per-image results (`KerasCamModelHandler.run_inference`'s, as RunInference
        emits them for --large_model, or a batch retried image by image): their arrays stacked; an
        image explained without attention statistics gets those of `attention.attention_stats`."""
        from transforms.attention import GEOMETRY_KEYS, attention_stats

        good = [r for r in results if r.error is None]
        counts = np.array([len(r.cam) for r in good], np.int64)
        cams = [np.asarray(r.cam, np.float32) for r in good if len(r.cam)]
        rows = int(counts.sum())
        stats = []  # one GEOMETRY_KEYS dict per row
        for r in good:
            if r.attention is not None:
                stats += r.attention
            else:
                size = (r.image.image_height, r.image.image_width)
                stats += [attention_stats(np.asarray(cam, np.float32), r.image.boxes, image_size=size)
                          for cam in r.cam]
        attention = {}
        for key in GEOMETRY_KEYS:
            values = [s.get(key) for s in stats]
            nulls = np.array([v is None for v in values], bool)
            attention[key] = (np.array([np.nan if v is None else v for v in values], np.float64).reshape(rows),
                              nulls.reshape(rows))

        def cat(name, dtype):
            parts = [np.asarray(getattr(r, name), dtype).reshape(-1) for r in good]
            return np.concatenate(parts) if parts else np.zeros([0], dtype)

        scores = [r.scores for r in good]
        return cls(
            images=[r.image for r in good],
            predicted_class=np.array([r.predicted_class for r in good], np.int64),
            predicted_score=np.array([r.predicted_score for r in good], np.float64),
            row_image=np.repeat(np.arange(len(good)), counts),
            target_rank=np.concatenate([np.arange(c) for c in counts]) if len(good) else np.zeros([0], np.int64),
            target_class=cat("target_class", np.int64),
            target_score=cat("target_score", np.float64),
            target_logit=cat("target_logit", np.float64),
            cam=np.concatenate(cams) if cams else np.zeros([0, 0, 0], np.float32),
            attention=attention,
            scores=np.stack([np.asarray(s, np.float32) for s in scores]) if good and all(
                s is not None for s in scores) else None,
            failed=tuple(r for r in results if r.error is not None),
        )


class CamWorker:
    """What `load_model` returns (one per process, shared by its threads).

    `run_inference` only calls its methods (no attribute access), so it also
    works through the proxy Beam serves a `--large_model` with.
    """

    def __init__(self, explainer, decoder: BatchImageDecoder, precision: str = "float32"):
        self.explainer = explainer
        self.decoder = decoder
        self.precision = precision  # the dtype the layers compute in (`--mixed_precision`, or its float32 fallback)

    def decode(self, encoded):
        """Encoded images -> (pixels [B, H, W, C], decoded sizes [B, 2]) (`BatchImageDecoder`)."""
        return self.decoder(encoded)

    def __call__(self, images, labels=None) -> dict:
        """The compiled CAM function on a decoded batch (`CamExplainer.__call__`)."""
        return self.explainer(images, labels)


class KerasCamModelHandler(ModelHandler[DecodedImage, Explained, Any]):
    """Loads a Keras classifier once per process and explains image batches."""

    def __init__(
        self,
        model_uri: str,
        *,
        weights: Optional[str] = None,
        safe_mode: bool = True,
        custom_code: tuple = (),
        target_layer: Optional[str] = None,
        method: str = "gradcam",
        target: Optional[TargetSpec] = None,
        preprocess: str = "none",
        image_size: Optional[tuple[int, int]] = None,
        token_grid: Optional[tuple[int, int]] = None,
        prefix_tokens: Optional[int] = None,
        output: Optional[int | str] = None,
        batch_size: int = BATCH_SIZE,
        jit_compile: bool = False,
        large_model: bool = False,
        mixed_precision: str = "off",
        label_format: str = "single",
    ):
        super().__init__()
        self._label_format = label_format
        self._model_uri = model_uri
        self._weights = weights
        self._safe_mode = safe_mode
        self._custom_code = tuple(custom_code)  # (file, source) pairs of --custom_objects: plain strings
        self._target_layer = target_layer
        self._method = method
        self._target = target or TargetSpec()
        self._preprocess = preprocess
        self._image_size = tuple(image_size) if image_size else None
        self._token_grid = tuple(token_grid) if token_grid else None
        self._prefix_tokens = prefix_tokens
        self._output = output
        self._batch_size = batch_size
        self._jit_compile = jit_compile
        self._large_model = large_model
        self._mixed_precision = mixed_precision

    def load_model(self) -> CamWorker:
        from transforms.cam.explainer import CamExplainer
        from transforms.model_loading import configure_devices, load_keras_model
        from transforms.precision import explainer_in_precision

        gpus = configure_devices()
        model = load_keras_model(self._model_uri, weights=self._weights, safe_mode=self._safe_mode,
                                 custom_code=self._custom_code)
        explainer, precision = explainer_in_precision(
            lambda m: CamExplainer(
                m,
                target_layer=self._target_layer,
                method=self._method,
                target=self._target,
                preprocess=self._preprocess,
                jit_compile=self._jit_compile,
                image_size=self._image_size,
                token_grid=self._token_grid,
                prefix_tokens=self._prefix_tokens,
                output=self._output,
            ),
            model,
            self._mixed_precision,
        )
        _LOG.info(
            "Loaded %s on %s; target layer %s %s; method %s; computing in %s",
            self._model_uri,
            f"{len(gpus)} GPU(s)" if gpus else "CPU",
            explainer.target_layer,
            explainer.cam_shape,
            self._method,
            precision,
        )
        return CamWorker(explainer, BatchImageDecoder(explainer.input_shape), precision)

    def run_inference(
        self,
        batch: Sequence[DecodedImage],
        model: CamWorker,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Explained]:
        return self.explain_images(batch, self.decode_images(batch, model), model)

    def decode_images(self, batch: Sequence[DecodedImage], model: CamWorker) -> tuple:
        """The batch's one call of the decoder: (pixels, decoded images, [(image, RecordError)])
        (`decode.decode_batch`); the first half of `run_inference`."""
        return decode_batch(model.decode, batch)

    def explain_images(self, batch: Sequence[DecodedImage], decoded: tuple, model: CamWorker) -> list[Explained]:
        """The decoded batch's one call of the explainer, in the batch's order with an error for each image
        that did not decode; the second half of `run_inference`."""
        pixels, images, failed = decoded
        results = [_failed(item, exc.error, exc.message, stage="decode") for item, exc in failed]
        if images:
            results += explain_decoded(model, pixels, images, multilabel=self._label_format != "single")
        if failed:  # back to the batch's order
            order = {(item.source, item.record_index): i for i, item in enumerate(batch)}
            results.sort(key=lambda r: order[(r.image.source, r.image.record_index)])
        return results

    def explain_batch(self, batch: Sequence[DecodedImage], decoded: tuple, model: CamWorker) -> ExplainedBatch:
        """`explain_images` as one `ExplainedBatch` (what `ExplainBatches` emits): the decoded images'
        one call of the explainer, and an error for each image that did not decode."""
        pixels, images, failed = decoded
        errors = tuple(_failed(item, exc.error, exc.message, stage="decode") for item, exc in failed)
        explained = explain_batch(model, pixels, images, multilabel=self._label_format != "single") if images \
            else ExplainedBatch.from_results([])
        return explained._replace(failed=errors + tuple(explained.failed))

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(len(item.encoded or b"") for item in batch)

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._large_model

    def get_metrics_namespace(self) -> str:
        return "gradcam_audit"


_SHARED = shared.Shared()  # one CamWorker per process and handler settings, shared by every thread and step


def acquire_worker(handler: KerasCamModelHandler) -> CamWorker:
    """The process's CamWorker for these handler settings (loaded by the first caller; the
    explaining step and the faithfulness scorer share it). Keep the returned object referenced:
    `shared.Shared` frees it when nothing does."""
    return _SHARED.acquire(handler.load_model, tag="camworker-" + handler_tag(handler))


def handler_tag(handler: KerasCamModelHandler) -> str:
    """A key for what a process builds from these handler settings (`shared.Shared` tags)."""
    return hashlib.sha1(pickle.dumps(handler)).hexdigest()


class ExplainBatches(beam.DoFn):
    """DecodedImage -> one `ExplainedBatch` per batch of the handler's batch size, batches in the background.

    Each full batch goes to two executors in turn, the halves of
    `KerasCamModelHandler.run_inference`: one decodes it (`decode_images`, up to
    `decoders` batches at once), the other explains it (`explain_images`, one call
    of the compiled CAM function, one batch at a time, in the order they came),
    so the next batches decode while this one is explained (as tf.data's prefetch
    and parallel map overlap input and model), while this thread goes on with the next elements;
    results are emitted as their batch finishes (at most `depth` batches in
    flight) and every remaining one at the end of the bundle. Elements must be
    in the global window (the job's are). A failure inside a batch is handled
    by `run_inference` (one error row per bad image); anything else fails the
    bundle, which the runner retries.
    """

    def __init__(self, handler: KerasCamModelHandler, depth: int = 2, decoders: Optional[int] = None):
        self._handler = handler
        self._batch_size = handler.batch_elements_kwargs()["max_batch_size"]
        self._depth = depth
        self._decoders = decoders or DECODE_THREADS
        self._batches = beam.metrics.Metrics.counter(handler.get_metrics_namespace(), "explained_batches")

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        self._worker = acquire_worker(self._handler)
        self._decoding = ThreadPoolExecutor(max_workers=self._decoders, thread_name_prefix="decode")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")

    def start_bundle(self):
        self._buffer: list = []
        self._inflight: collections.deque = collections.deque()

    def process(self, image: DecodedImage):
        self._buffer.append(image)
        if len(self._buffer) >= self._batch_size:
            self._submit()
        yield from self._finished(wait=False)

    def finish_bundle(self):
        if self._buffer:
            self._submit()
        yield from self._finished(wait=True)

    def teardown(self):
        for name in ("_executor", "_decoding"):
            executor = getattr(self, name, None)
            if executor is not None:
                executor.shutdown(wait=True)

    def _submit(self):
        batch, self._buffer = self._buffer, []
        decoded = self._decoding.submit(self._handler.decode_images, batch, self._worker)
        self._inflight.append(self._executor.submit(self._explain, batch, decoded))

    def _explain(self, batch: list, decoded) -> ExplainedBatch:
        return self._handler.explain_batch(batch, decoded.result(), self._worker)

    def _finished(self, wait: bool):
        while self._inflight and (wait or self._inflight[0].done() or len(self._inflight) > self._depth):
            explained = self._inflight.popleft().result()
            self._batches.inc()
            yield GlobalWindows.windowed_value(explained)


def _run_explainer(explainer, pixels: np.ndarray, images: Sequence[DecodedImage], multilabel: bool) -> dict:
    """One call of the compiled explainer on a decoded batch, with the images' labels."""
    if multilabel:
        labels = [item.labels for item in images]
    else:
        labels = np.array([-1 if item.label is None else item.label for item in images], np.int32)
    return explainer(pixels, labels)


def _one_by_one(explainer, pixels: np.ndarray, images: Sequence[DecodedImage], multilabel: bool,
                exc: Exception) -> list[Explained]:
    """After a batch failed with `exc`: its images explained one by one (a lone image: its error)."""
    if len(images) == 1:
        return [_failed(images[0], "InferenceFailed", str(exc).splitlines()[0][:500])]
    _LOG.warning("Batch of %d failed (%s); retrying image by image", len(images), exc)
    return [result for i in range(len(images))
            for result in explain_decoded(explainer, pixels[i : i + 1], images[i : i + 1], multilabel)]


def explain_decoded(explainer, pixels: np.ndarray, images: Sequence[DecodedImage],
                    multilabel: bool = False) -> list[Explained]:
    """One call of the compiled explainer on a decoded batch; a failing batch is retried image by image.

    multilabel: the images carry `labels` (lists of classes) and each result keeps every class's score.
    """
    import tensorflow as tf

    try:
        out = _run_explainer(explainer, pixels, images, multilabel)
    except (tf.errors.OpError, ValueError) as exc:
        return _one_by_one(explainer, pixels, images, multilabel, exc)
    attention = batch_attention(out, images)
    return [_explained(item, out, i, attention, multilabel) for i, item in enumerate(images)]


def explain_batch(explainer, pixels: np.ndarray, images: Sequence[DecodedImage],
                  multilabel: bool = False) -> ExplainedBatch:
    """`explain_decoded` as one `ExplainedBatch`: one call of the compiled explainer on a decoded batch,
    its arrays kept as arrays; a failing batch is retried image by image (`explain_decoded`)."""
    import tensorflow as tf

    try:
        out = _run_explainer(explainer, pixels, images, multilabel)
    except (tf.errors.OpError, ValueError) as exc:
        return ExplainedBatch.from_results(_one_by_one(explainer, pixels, images, multilabel, exc))
    return ExplainedBatch.from_output(images, out, multilabel)


def batch_attention(out: dict, images: Sequence[DecodedImage]) -> list:
    """The attention statistics of every map of the batch (out["cam"] [B, K, h, w]) in one numpy
    pass (`attention.attention_batch`): [B] lists of K dicts (None for an image with non-finite output)."""
    from transforms.attention import attention_batch

    cams = np.asarray(out["cam"], np.float32)
    finite = np.asarray(out["finite"], bool)
    valid = np.asarray(out.get("target_valid", np.ones(cams.shape[:2], bool)), bool) & finite[:, None]
    pairs = np.argwhere(valid)  # (image, slot) of every map that becomes a row, image-major
    stats = attention_batch(
        cams[valid],
        [(images[i].image_height, images[i].image_width) for i, _ in pairs],
        [images[i].boxes for i, _ in pairs],
    )
    per_image: list = [None] * len(images)
    for i in np.flatnonzero(finite).tolist():
        per_image[i] = []
    for (i, _), stat in zip(pairs.tolist(), stats, strict=True):
        per_image[i].append(stat)
    return per_image


def _failed(item: DecodedImage, error: str, message: str, stage: str = "compute") -> Explained:
    empty = np.zeros([0])
    return Explained(item, -1, float("nan"), empty, empty, empty, np.zeros([0, 0, 0]), (error, message), stage)


def _explained(item: DecodedImage, out: dict, i: int, attention: Optional[list] = None,
               multilabel: bool = False) -> Explained:
    """Image i of the batch's output; only its valid target slots (`target_valid`) are kept."""
    if not out["finite"][i]:
        return _failed(item, "NonFiniteOutput", "the model's scores or the CAM hold NaN or Inf")
    valid = out.get("target_valid")
    keep = slice(None) if valid is None or valid[i].all() else np.flatnonzero(valid[i])
    return Explained(
        image=item,
        predicted_class=int(out["predicted_class"][i]),
        predicted_score=float(out["predicted_score"][i]),
        target_class=out["target_class"][i][keep],
        target_score=out["target_score"][i][keep],
        target_logit=out["target_logit"][i][keep],
        cam=out["cam"][i][keep],
        attention=attention[i] if attention is not None else None,
        scores=np.asarray(out["scores"][i], np.float32) if multilabel and "scores" in out else None,
    )
