"""`KerasCamModelHandler`: Beam RunInference handler that explains batches.

`__init__` keeps plain settings only (it is pickled to every worker);
`load_model` loads the Keras model once per worker process (RunInference
shares it across threads with `shared.Shared`) and compiles the explainer;
`run_inference` stacks a batch and makes one call of the compiled function.
A batch that fails is retried image by image so one bad image cannot take
the good ones with it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms.cam.targets import TargetSpec
from transforms.decode import DecodedImage

_LOG = logging.getLogger(__name__)


class Explained(NamedTuple):
    """The model's answer for one image (arrays have a leading K axis)."""

    image: DecodedImage
    predicted_class: int
    predicted_score: float
    target_class: np.ndarray  # [K] int
    target_score: np.ndarray  # [K] float
    target_logit: np.ndarray  # [K] float
    cam: np.ndarray  # [K, h, w] float32
    error: Optional[tuple[str, str]] = None  # (error, message) when compute failed


class KerasCamModelHandler(ModelHandler[DecodedImage, Explained, Any]):
    """Loads a Keras classifier once per process and explains image batches."""

    def __init__(
        self,
        model_uri: str,
        *,
        weights: Optional[str] = None,
        safe_mode: bool = True,
        target_layer: Optional[str] = None,
        method: str = "gradcam",
        target: Optional[TargetSpec] = None,
        preprocess: str = "none",
        image_size: Optional[tuple[int, int]] = None,
        batch_size: int = 32,
        jit_compile: bool = False,
        large_model: bool = False,
    ):
        super().__init__()
        self._model_uri = model_uri
        self._weights = weights
        self._safe_mode = safe_mode
        self._target_layer = target_layer
        self._method = method
        self._target = target or TargetSpec()
        self._preprocess = preprocess
        self._image_size = tuple(image_size) if image_size else None
        self._batch_size = batch_size
        self._jit_compile = jit_compile
        self._large_model = large_model

    def load_model(self):
        from transforms.cam.explainer import CamExplainer
        from transforms.model_loading import configure_devices, load_keras_model

        gpus = configure_devices()
        model = load_keras_model(self._model_uri, weights=self._weights, safe_mode=self._safe_mode)
        explainer = CamExplainer(
            model,
            target_layer=self._target_layer,
            method=self._method,
            target=self._target,
            preprocess=self._preprocess,
            jit_compile=self._jit_compile,
            image_size=self._image_size,
        )
        _LOG.info(
            "Loaded %s on %s; target layer %s %s; method %s",
            self._model_uri,
            f"{len(gpus)} GPU(s)" if gpus else "CPU",
            explainer.target_layer,
            explainer.cam_shape,
            self._method,
        )
        return explainer

    def run_inference(
        self,
        batch: Sequence[DecodedImage],
        model,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Explained]:
        import tensorflow as tf

        images = np.stack([item.pixels for item in batch])
        labels = np.array([-1 if item.label is None else item.label for item in batch], np.int32)
        try:
            out = model(images, labels)
        except (tf.errors.OpError, ValueError) as exc:
            if len(batch) == 1:
                return [_failed(batch[0], "InferenceFailed", str(exc).splitlines()[0][:500])]
            _LOG.warning("Batch of %d failed (%s); retrying image by image", len(batch), exc)
            return [result for item in batch for result in self.run_inference([item], model)]
        return [_explained(item, out, i) for i, item in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(item.pixels.nbytes for item in batch)

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._large_model

    def get_metrics_namespace(self) -> str:
        return "gradcam_audit"


def _failed(item: DecodedImage, error: str, message: str) -> Explained:
    empty = np.zeros([0])
    return Explained(item, -1, float("nan"), empty, empty, empty, np.zeros([0, 0, 0]), (error, message))


def _explained(item: DecodedImage, out: dict, i: int) -> Explained:
    if not out["finite"][i]:
        return _failed(item, "NonFiniteOutput", "the model's scores or the CAM hold NaN or Inf")
    return Explained(
        image=item,
        predicted_class=int(out["predicted_class"][i]),
        predicted_score=float(out["predicted_score"][i]),
        target_class=out["target_class"][i],
        target_score=out["target_score"][i],
        target_logit=out["target_logit"][i],
        cam=out["cam"][i],
    )
