"""The shared CAM driver: one compiled `tf.function` per model.

    images float32 [B, H, W, C] (0-255, C = the model's 1 or 3), labels int32 [B]
    (`--target labels`: multi-hot int32 [B, num_classes])
      -> preprocess -> cast to the model's input dtype
      -> forward pass (target layer output A captured; a transformer's tokens
         (B, P+N, D) become the patch grid (B, h, w, D), see transforms.cam.tokens)
      -> logits -> target classes [B, K] (+ which are valid) -> d(sum_b logit[b, t_bk]) / dA
      -> method(A, dA) -> CAM [B, K, h, w]

`--target labels` and `above:T` want a different number of maps per image:
the function computes a fixed K (`--max_targets`, at most the class count)
and returns `target_valid` [B, K]; the invalid slots are dropped when the rows
are made, so one trace serves every batch.

Images in a batch are independent (inference mode), so the gradient of the
sum of the batch's target logits with respect to A gives every image's own
gradient at once: no Python loop over images, one trace for any batch size.
The function is traced once when the explainer is built, so a model it
cannot run fails there (at launch) and the map size is known: for a model
with a dynamic input, H and W are the `image_size` chosen for the job.
Keras 3 and tf_keras (Keras 2) models go through the same code.
"""

from __future__ import annotations

import dataclasses

from transforms.cam.layers import (
    block_input_layer,
    capture_output,
    check_target_layer,
    choose_target_layer,
    get_layer,
    has_opaque_layers,
    linearize_head,
    output_names,
    patch_grids_before,
    probe_layer_calls,
    release_output,
    resolve_layer_path,
)
from transforms.cam.methods import METHODS
from transforms.cam.preprocess import cast_to_input, get_preprocess_fn, model_input_dtype, model_input_shape
from transforms.cam.targets import TargetSpec, select_targets
from transforms.cam.tokens import TokenLayout, infer_token_layout, tokens_to_grid
from transforms.errors import AuditError, one_line, own_message

# HiResCAM is refused at a layer where gradient and activation are this close to orthogonal at every token
# (position). Largest cosine over the tokens, measured: ~6e-7 (float32 rounding) with a LayerNorm after the
# layer (a pooled ViT's last block, a Swin-style stage); 0.04-0.44 at the default layers of a small CNN,
# MobileNetV2, ResNet50, ConvNeXtTiny, a class-token ViT and keras_hub's ViT and DeiT.
ORTHOGONAL_COSINE = 1e-4


class CamExplainer:
    """Explains a Keras classifier's predictions for batches of images.

    The model passed in is modified in place (its head is made linear and its
    target layer's call is wrapped), so pass the explainer its own copy.

    Attributes:
      input_shape: (H, W, C) the images are given at (C = 1 grey or 3 RGB).
      input_dtype: the model's input dtype ("float32", "float16", "uint8", ...).
      target_layer: path of the target layer (nested models joined by "/").
      target_layer_reason: why that layer ("given by --target_layer" or the default's rule).
      token_layout: a `TokenLayout` when the target layer outputs tokens (B, P+N, D), else None.
      output_index, output_name: the model output explained (one of several with `output`).
      cam_shape: (h, w) of the maps (for `input_shape`).
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
        image_size: tuple[int, int] | None = None,
        token_grid: tuple[int, int] | None = None,
        prefix_tokens: int | None = None,
        output: str | int | None = None,
    ):
        """Checks the model, wraps its target layer, and traces the CAM function once.

        Args:
          model: a Keras 3 or tf_keras classifier with one image input and one
            output [B, num_classes] (a one-element list of it is accepted).
          target_layer: layer path or bare name; default: `choose_target_layer`.
          method: a key of `METHODS`.
          target: which class each map explains.
          preprocess: a `--preprocess` preset.
          jit_compile: compile with XLA.
          image_size: (H, W) for a model with a dynamic input size.
          token_grid: (h, w) of the patch grid of a token target layer (`--token_grid`).
          prefix_tokens: tokens before the patches (`--prefix_tokens`).
          output: name or index of the output to explain (required when the model has several).

        Raises:
          AuditError: a model (or option) this explainer cannot explain.
        """
        import tensorflow as tf

        if method not in METHODS:
            raise AuditError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
        self.model = model
        self.method = method
        self.target = target or TargetSpec()
        self._probe_settings = (image_size, preprocess)
        self._calls = None  # see _layer_calls
        if target_layer:
            self.target_layer, self.target_layer_reason = resolve_layer_path(model, target_layer), "given by --target_layer"
        else:
            self.target_layer, self.target_layer_reason = choose_target_layer(model)
        self._layer_shape = check_target_layer(model, self.target_layer, self._layer_calls())
        self.input_shape = model_input_shape(model, image_size)
        self.input_dtype = model_input_dtype(model, preprocess)
        self.output_index, self.output_name = select_output(model, output)
        self.num_classes = _num_classes(model, self.output_index)
        self._token_options = (token_grid, prefix_tokens)
        self._set_token_layout()
        if self.target.mode == "class" and self.target.class_index >= self.num_classes:
            raise AuditError(
                f"--target class:{self.target.class_index}: expected a class below "
                f"{self.num_classes} (the model's output width)"
            )
        if self.target.mode == "topk" and self.target.k > self.num_classes:
            raise AuditError(f"--target topk:{self.target.k}: the model has {self.num_classes} classes")
        if self.target.variable and self.target.k > self.num_classes:  # no more slots than classes
            self.target = dataclasses.replace(self.target, k=self.num_classes)
        self.head = linearize_head(model, self.output_index)
        if self.target.mode == "above" and self.head != "sigmoid":
            raise AuditError(
                f"--target {self.target}: needs a sigmoid head (one independent score per class); this model's "
                f"head is {self.head}, whose scores compete: use --target topk:K or predicted"
            )
        self._captured = capture_output(get_layer(model, self.target_layer))
        self._preprocess = get_preprocess_fn(preprocess)
        if not target_layer and self.token_layout is not None and not self._reads_patch_tokens():
            # A class-token head: after the last block nothing mixes the patch tokens into the class token,
            # so their gradient (and every map) is zero there; the last block's input is what it attends over.
            release_output(get_layer(model, self.target_layer))
            skipped = self.target_layer
            self.target_layer, why = block_input_layer(model, self._layer_calls())
            self.target_layer_reason = (
                f"{why}: the head reads only the prefix token(s), so the output of the last block "
                f"({skipped!r}) gets zero gradient on every patch token"
            )
            self._layer_shape = check_target_layer(model, self.target_layer, self._layer_calls())
            self._set_token_layout()
            self._captured = capture_output(get_layer(model, self.target_layer))
        if method == "hirescam":
            self._refuse_orthogonal_gradients()
        for call in (self._calls or {}).values():  # the probe's tensors were only for choosing the layer
            call.input = call.output = None
        self._method_fn = METHODS[method]
        self.explain = tf.function(
            self._explain,
            input_signature=[
                tf.TensorSpec([None, *self.input_shape], tf.float32, name="images"),
                tf.TensorSpec([None, self.num_classes] if self.target.mode == "labels" else [None], tf.int32,
                              name="labels"),
            ],
            jit_compile=jit_compile,
            reduce_retracing=True,
        )
        self.forward = tf.function(
            self._forward,
            input_signature=[tf.TensorSpec([None, *self.input_shape], tf.float32, name="images")],
            jit_compile=jit_compile,
        )
        self.cam_shape = self._trace()

    def _layer_calls(self):
        """For a model holding layers that are not functional (keras_hub's encoders, see
        `transforms.cam.layers.is_opaque`): each layer's first call in one eager forward pass on a random
        image (`probe_layer_calls`), computed once. None for other models (their layers' symbolic outputs
        say the same)."""
        if self._calls is None:
            self._calls = {}
            if has_opaque_layers(self.model):
                import numpy as np

                image_size, preprocess = self._probe_settings
                shape = model_input_shape(self.model, image_size)
                images = np.random.default_rng(0).uniform(0, 255, (1, *shape)).astype(np.float32)
                inputs = cast_to_input(get_preprocess_fn(preprocess)(images), model_input_dtype(self.model, preprocess))
                self._calls = probe_layer_calls(self.model, inputs)
        return self._calls or None

    def _set_token_layout(self) -> None:
        self._patch_grids = patch_grids_before(self.model, self.target_layer, self._layer_calls())
        self.token_layout: TokenLayout | None = None
        if len(self._layer_shape) == 2 and self._layer_shape[0] is not None:
            self.token_layout = self._token_layout(self._layer_shape[0])

    def _probe_gradient(self):
        """(activations, gradients) of the target layer for the top score of a random image (one eager
        pass); None when the forward pass does not call the layer (the trace then says why)."""
        import numpy as np
        import tensorflow as tf

        images = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *self.input_shape)), tf.float32)
        self._captured.clear()
        with tf.GradientTape() as tape:
            logits = self._logits(images)
            if not self._captured:
                return None
            activations = self._captured[-1]
            score = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
        gradients = tape.gradient(score, activations)
        self._captured.clear()
        return activations, gradients

    def _reads_patch_tokens(self) -> bool:
        """Does the explained score depend on the target layer's patch tokens? One eager probe on a random image."""
        import tensorflow as tf

        probe = self._probe_gradient()
        if probe is None:
            return True  # the trace says why
        if probe[1] is None:
            return False
        return bool(tf.reduce_any(probe[1][:, self.token_layout.prefix:] != 0))

    def _refuse_orthogonal_gradients(self) -> None:
        """HiResCAM's map is gradient x activation summed over channels. Where the layer feeds a
        normalisation that ignores each token's (position's) scale, a LayerNorm (the last block's output of
        a pre-norm ViT, a Swin stage's output), that sum is 0 at every token (scaling a token leaves the
        score unchanged) and the map would be rounding noise: refused with what to pass instead. One eager
        probe on a random image: the cosine of gradient and activation, at every token, below
        ORTHOGONAL_COSINE."""
        import numpy as np

        probe = self._probe_gradient()
        if probe is None or probe[1] is None:
            return
        channels = probe[0].shape[-1]
        a, g = (np.asarray(t, np.float64).reshape(-1, channels) for t in probe)
        scale = np.linalg.norm(a, axis=1) * np.linalg.norm(g, axis=1)
        live = scale > 0
        cosine = np.abs((a * g).sum(axis=1)[live]) / scale[live]
        if live.any() and float(cosine.max()) < ORTHOGONAL_COSINE:
            unit = "token" if self.token_layout is not None else "position"
            raise AuditError(
                f"--method hirescam at {self.target_layer!r}: each {unit}'s gradient is orthogonal to its "
                f"activation there (largest cosine {cosine.max():.1e}; the layer feeds a normalisation, such as "
                f"a LayerNorm, that ignores each {unit}'s scale), so gradient x activation is 0 at every {unit} "
                "and the maps would be rounding noise: use another --method (gradcam, layercam, ...), or "
                "--target_layer naming the normalisation's output (e.g. the final LayerNorm), where HiResCAM "
                f"is each {unit}'s share of the score"
            )

    def _token_layout(self, seq_len: int) -> TokenLayout:
        token_grid, prefix_tokens = self._token_options
        return infer_token_layout(
            int(seq_len), layer=self.target_layer, shape=(None, *self._layer_shape), input_hw=self.input_shape[:2],
            patch_grids=self._patch_grids, token_grid=token_grid, prefix_tokens=prefix_tokens,
        )

    def _to_map(self, tensor):
        """The target layer's output as a map [B, h, w, C]: tokens go onto their patch grid."""
        if tensor.shape.rank != 3:
            return tensor
        if self.token_layout is None:  # a dynamic input size: the sequence length is known once traced
            self.token_layout = self._token_layout(tensor.shape[1])
        return tokens_to_grid(tensor, self.token_layout)

    def _trace(self) -> tuple[int, int]:
        """Traces `explain` for the input signature; returns the maps' (h, w).

        A failure while tracing becomes one AuditError naming the layer, its
        output shape and what went wrong (never a bare StagingError).
        """
        try:
            concrete = self.explain.get_concrete_function()
        except AuditError as exc:
            raise AuditError(own_message(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - whatever tracing raises, the user gets one actionable line
            raise AuditError(
                f"the CAM function cannot be built for it ({one_line(exc)}); target layer {self.target_layer!r} "
                f"with output {(None, *self._layer_shape)} ({self.target_layer_reason}): check --preprocess and "
                "--image_size, or pass --target_layer naming another layer with a (batch, height, width, "
                "channels) or (batch, tokens, channels) output that the forward pass calls"
            ) from exc
        shape = concrete.structured_outputs["cam"].shape
        if shape.rank != 4 or None in shape.as_list()[2:]:
            raise AuditError(
                f"--target_layer {self.target_layer!r}: its output size is unknown for input "
                f"{self.input_shape} (found maps of shape {shape})"
            )
        return int(shape[2]), int(shape[3])

    def _model_inputs(self, images):
        """float32 pixels [B, H, W, C] 0-255 -> what the model takes (preset, then dtype)."""
        return cast_to_input(self._preprocess(images), self.input_dtype)

    def _logits(self, images):
        """The (linearised) model's scores float32 [B, N]; a one-element output list is unwrapped."""
        import tensorflow as tf

        out = self.model(self._model_inputs(images), training=False)
        if isinstance(out, dict):
            out = out[self.output_name] if self.output_name in out else list(out.values())[self.output_index]
        elif isinstance(out, (list, tuple)):
            out = out[self.output_index]
        return tf.cast(out, tf.float32)

    def _probabilities(self, logits):
        import tensorflow as tf

        if self.head == "sigmoid":
            return tf.sigmoid(logits)
        return tf.nn.softmax(logits, axis=-1)

    def _forward(self, images):
        """Plain inference (the speed limit to compare with): probabilities [B, N]."""
        return self._probabilities(self._logits(images))

    def _explain(self, images, labels):
        import tensorflow as tf

        self._captured.clear()
        k = self.target.k
        with tf.GradientTape(persistent=k > 1) as tape:
            logits = self._logits(images)
            if not self._captured:  # seen while tracing, i.e. when the explainer is built
                raise AuditError(
                    f"--target_layer {self.target_layer!r}: the model's forward pass never calls it; "
                    "pick a layer the model uses"
                )
            activations = self._captured[-1]
            targets, valid = select_targets(self.target, logits, labels)
            target_logits = tf.gather(logits, targets, batch_dims=1)  # [B, K]
            per_rank = [tf.reduce_sum(target_logits[:, i]) for i in range(k)]
        activations32 = self._to_map(tf.cast(activations, tf.float32))
        cams = [
            self._method_fn(activations32, self._to_map(tf.cast(tape.gradient(score, activations), tf.float32)))
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
            "target_valid": valid,
            "target_score": tf.gather(probabilities, targets, batch_dims=1),
            "target_logit": target_logits,
            "cam": cam,
            "finite": finite,
            "scores": probabilities,
        }

    def __call__(self, images, labels=None):
        """Runs the compiled function; numpy (or a float32 tensor, used as it is) in, dict of numpy arrays out.

        `labels`: int [B] (-1: none), or for multi-label records a list of B
        class-index sequences (None: no labels) or a multi-hot array [B,
        num_classes], turned into what the target mode takes (multi-hot for
        `labels`, else unused).
        """
        import numpy as np
        import tensorflow as tf

        if not (isinstance(images, tf.Tensor) and images.dtype == tf.float32):
            images = np.asarray(images, dtype=np.float32)
        labels = self._label_input(images.shape[0], labels)
        out = self.explain(images, labels)
        return {key: value.numpy() for key, value in out.items()}

    def _label_input(self, batch: int, labels):
        import numpy as np

        if isinstance(labels, np.ndarray) and labels.ndim == 2:  # multi-hot [B, num_classes] already
            return labels.astype(np.int32) if self.target.mode == "labels" else np.full([batch], -1, np.int32)
        lists = labels is not None and any(isinstance(v, (list, tuple, np.ndarray)) or v is None for v in labels)
        if self.target.mode == "labels":
            hot = np.zeros([batch, self.num_classes], np.int32)
            for i, classes in enumerate(labels if lists else ()):
                hot[i, list(classes or ())] = 1
            return hot
        if labels is None or lists:
            return np.full([batch], -1, np.int32)
        return np.asarray(labels, dtype=np.int32)


def select_output(model, output: str | int | None) -> tuple[int, str]:
    """(index, name) of the model output to explain.

    `output` is a name or an index (an int or a string of digits); it may be
    omitted for a model with one output. AuditError otherwise, listing the outputs.
    """
    names = output_names(model)
    listing = ", ".join(f"{i}={name!r} {tuple(t.shape)}" for i, (name, t) in enumerate(zip(names, model.outputs, strict=True)))
    if output is None or output == "":
        if len(names) == 1:
            return 0, names[0]
        raise AuditError(f"model has {len(names)} outputs ({listing}): pass --model_output NAME or INDEX to pick the one to explain")
    text = str(output).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(names):
            return index, names[index]
    elif text in names:
        return names.index(text), text
    raise AuditError(f"--model_output: expected an output name or index of the model ({listing}), got {output!r}")


def _num_classes(model, index: int = 0) -> int:
    """Width of the explained output [B, N]; AuditError for other outputs."""
    shape = tuple(model.outputs[index].shape)
    if len(shape) != 2 or shape[-1] is None:
        raise AuditError(f"model output {index}: expected class scores (batch, classes), found {shape}")
    return int(shape[-1])
