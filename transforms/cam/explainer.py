"""The shared CAM driver: one compiled `tf.function` per model.

    images float32 [B, H, W, 3] (0-255), labels int32 [B]
      -> preprocess -> forward pass (target layer output A captured)
      -> logits -> target classes [B, K] -> d(sum_b logit[b, t_bk]) / dA
      -> method(A, dA) -> CAM [B, K, h, w]

Images in a batch are independent (inference mode), so the gradient of the
sum of the batch's target logits with respect to A gives every image's own
gradient at once: no Python loop over images, one trace for any batch size.
"""

from __future__ import annotations

from transforms.cam.layers import (
    capture_output,
    check_target_layer,
    find_target_layer,
    get_layer,
    linearize_head,
    resolve_layer_path,
)
from transforms.cam.methods import METHODS
from transforms.cam.preprocess import get_preprocess_fn
from transforms.cam.targets import TargetSpec, select_targets
from transforms.errors import AuditError


class CamExplainer:
    """Explains a Keras classifier's predictions for batches of images.

    The model passed in is modified in place (its head is made linear and its
    target layer's call is wrapped), so pass the explainer its own copy.

    Attributes:
      input_shape: (H, W, C) the model expects.
      target_layer: path of the target layer (nested models joined by "/").
      cam_shape: (h, w) of the maps.
      head: "softmax", "sigmoid" or "none" (see `linearize_head`).
      num_classes: width of the model's output.
    """

    def __init__(
        self,
        model,
        *,
        target_layer: str | None = None,
        method: str = "gradcam",
        target: TargetSpec | None = None,
        preprocess: str = "none",
        jit_compile: bool = False,
    ):
        import tensorflow as tf

        if method not in METHODS:
            raise AuditError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
        self.model = model
        self.method = method
        self.target = target or TargetSpec()
        self.target_layer = resolve_layer_path(model, target_layer) if target_layer else find_target_layer(model)
        h, w, _ = check_target_layer(model, self.target_layer)
        self.cam_shape = (h, w)
        shape = tuple(model.inputs[0].shape[1:])
        if len(shape) != 3 or None in shape:
            raise AuditError(
                f"model input: expected a fixed (height, width, channels) shape, found {shape}"
            )
        self.input_shape = tuple(int(d) for d in shape)
        self.num_classes = int(model.outputs[0].shape[-1])
        if self.target.mode == "class" and self.target.class_index >= self.num_classes:
            raise AuditError(
                f"--target class:{self.target.class_index}: expected a class below "
                f"{self.num_classes} (the model's output width)"
            )
        if self.target.mode == "topk" and self.target.k > self.num_classes:
            raise AuditError(f"--target topk:{self.target.k}: the model has {self.num_classes} classes")
        self.head = linearize_head(model)
        self._captured = capture_output(get_layer(model, self.target_layer))
        self._preprocess = get_preprocess_fn(preprocess)
        self._method_fn = METHODS[method]
        self.explain = tf.function(
            self._explain,
            input_signature=[
                tf.TensorSpec([None, *self.input_shape], tf.float32, name="images"),
                tf.TensorSpec([None], tf.int32, name="labels"),
            ],
            jit_compile=jit_compile,
            reduce_retracing=True,
        )
        self.forward = tf.function(
            self._forward,
            input_signature=[tf.TensorSpec([None, *self.input_shape], tf.float32, name="images")],
            jit_compile=jit_compile,
        )

    def _probabilities(self, logits):
        import tensorflow as tf

        if self.head == "sigmoid":
            return tf.sigmoid(logits)
        return tf.nn.softmax(logits, axis=-1)

    def _forward(self, images):
        """Plain inference (the speed limit to compare with): probabilities [B, N]."""
        import tensorflow as tf

        logits = tf.cast(self.model(self._preprocess(images), training=False), tf.float32)
        return self._probabilities(logits)

    def _explain(self, images, labels):
        import tensorflow as tf

        self._captured.clear()
        k = self.target.k
        with tf.GradientTape(persistent=k > 1) as tape:
            logits = tf.cast(self.model(self._preprocess(images), training=False), tf.float32)
            activations = self._captured[-1]
            targets = select_targets(self.target, logits, labels)
            target_logits = tf.gather(logits, targets, batch_dims=1)  # [B, K]
            per_rank = [tf.reduce_sum(target_logits[:, i]) for i in range(k)]
        activations32 = tf.cast(activations, tf.float32)
        cams = [
            self._method_fn(activations32, tf.cast(tape.gradient(score, activations), tf.float32))
            for score in per_rank
        ]
        del tape
        cam = tf.stack(cams, axis=1)  # [B, K, h, w]
        probabilities = self._probabilities(logits)
        finite = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(cam), axis=[1, 2, 3]),
            tf.reduce_all(tf.math.is_finite(logits), axis=-1),
        )
        return {
            "predicted_class": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            "predicted_score": tf.reduce_max(probabilities, axis=-1),
            "target_class": targets,
            "target_score": tf.gather(probabilities, targets, batch_dims=1),
            "target_logit": target_logits,
            "cam": cam,
            "finite": finite,
        }

    def __call__(self, images, labels=None):
        """Runs the compiled function; numpy in, dict of numpy arrays out."""
        import numpy as np

        images = np.asarray(images, dtype=np.float32)
        if labels is None:
            labels = np.full([images.shape[0]], -1, np.int32)
        out = self.explain(images, np.asarray(labels, dtype=np.int32))
        return {key: value.numpy() for key, value in out.items()}
