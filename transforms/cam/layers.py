"""Finding the target layer, reading its output, and the pre-softmax score.

Works for functional models, Sequential models and nested models (a
keras.applications base inside a Sequential or functional model), built with
Keras 3 or with tf_keras (Keras 2): the target layer may sit at any depth.
Its output is captured by wrapping that layer's `call` on the explainer's own
copy of the model, so the activations are the very tensors the forward pass
used and `GradientTape` differentiates through the head only.
"""

from __future__ import annotations

import functools
from typing import Iterator

from transforms.errors import AuditError

_POOLING_PREFIXES = ("MaxPooling", "AveragePooling", "MaxPool", "AvgPool")
_FIXES = (
    "Do one of: (1) build the model with the functional API or keras.Sequential "
    "(keras.Input(...) first) and save it as .keras; (2) pass --target_layer NAME "
    "naming a layer with a 4-D (batch, height, width, channels) output that the "
    "forward pass calls; (3) for a subclassed model, wrap its layers in a "
    "functional model before saving."
)


def keras_module(obj):
    """The Keras that `obj` (a model or layer) belongs to: `keras` (3) or `tf_keras` (2)."""
    if any(cls.__module__.startswith("tf_keras") for cls in type(obj).__mro__):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _is_model(layer) -> bool:
    return isinstance(layer, keras_module(layer).Model)


def _is_graph_model(model) -> bool:
    """True for Functional and Sequential models (layers with symbolic outputs)."""
    km = keras_module(model)
    if km.__name__ == "tf_keras":
        return bool(getattr(model, "_is_graph_network", False)) or isinstance(model, km.Sequential)
    return isinstance(model, (km.Sequential, km.src.models.functional.Functional))


def walk_layers(model, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Yields (path, layer) depth-first in call order; nested models are descended.

    Paths join nested model names with "/", e.g. "resnet50/conv5_block3_out".
    """
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if _is_model(layer) and _is_graph_model(layer):
            yield from walk_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return None


def is_spatial(layer) -> bool:
    """A layer with a single 4-D output (batch, h, w, c) with h * w > 1.

    Found by rank: a model with a dynamic input (None, None, C) has layers
    whose h and w are unknown until an image size is chosen; those count.
    """
    shape = _output_shape(layer)
    if shape is None or len(shape) != 4:
        return False
    _, h, w, _ = shape
    return h is None or w is None or h * w > 1


def find_target_layer(model) -> str:
    """The default target: the last spatial layer before the classifier head.

    Pooling layers are skipped: the map before pooling has more detail and is
    what Grad-CAM's authors used (e.g. VGG19 -> block5_conv4).

    Returns:
      The layer's path (see `walk_layers`).
    """
    if not _is_graph_model(model):
        raise AuditError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed model: "
            f"no layer with a spatial output can be reached. {_FIXES}"
        )
    candidates = [
        path
        for path, layer in walk_layers(model)
        if is_spatial(layer) and not type(layer).__name__.startswith(_POOLING_PREFIXES)
    ]
    if not candidates:
        raise AuditError(
            f"model {model.name!r}: expected a layer with a 4-D spatial output "
            f"(batch, height, width, channels), found none. {_FIXES}"
        )
    return candidates[-1]


def resolve_layer_path(model, path: str) -> str:
    """The full path of a layer given by path or bare name (searched at every depth)."""
    layers = dict(walk_layers(model))
    if path in layers:
        return path
    matches = [p for p in layers if p.rsplit("/", 1)[-1] == path]
    if len(matches) == 1:
        return matches[0]
    spatial = [p for p, layer in layers.items() if is_spatial(layer)]
    if matches:
        raise AuditError(f"--target_layer {path!r} is ambiguous: use one of {matches}")
    raise AuditError(
        f"--target_layer: expected a layer of model {model.name!r}, got {path!r}; "
        f"layers with a spatial output: {spatial[-8:]}"
    )


def get_layer(model, path: str):
    """The layer at `path` (see `resolve_layer_path`)."""
    return dict(walk_layers(model))[resolve_layer_path(model, path)]


def check_target_layer(model, path: str) -> tuple:
    """Returns the (h, w, c) output of the target layer (None where dynamic), or raises AuditError."""
    layer = get_layer(model, path)
    if not is_spatial(layer):
        raise AuditError(
            f"--target_layer {path!r}: expected a 4-D (batch, height, width, "
            f"channels) output, found {_output_shape(layer)}. {_FIXES}"
        )
    return tuple(None if d is None else int(d) for d in _output_shape(layer)[1:])


def capture_output(layer) -> list:
    """Wraps `layer.call` so each call appends its output to the returned list."""
    store: list = []
    original = layer.call

    @functools.wraps(original)
    def call(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(out)
        return out

    layer.call = call
    return store


def _output_layer(model):
    """The innermost layer that produces the model's (first) output."""
    try:
        history = model.outputs[0]._keras_history
        layer = getattr(history, "operation", None) or history.layer  # Keras 3 / tf_keras
    except (AttributeError, IndexError, ValueError, TypeError):
        layer = model.layers[-1]
    if _is_model(layer) and layer is not model and _is_graph_model(layer):
        return _output_layer(layer)
    return layer


def linearize_head(model) -> str:
    """Makes the model output pre-softmax (pre-sigmoid) scores, in place.

    When the output layer's activation is softmax or sigmoid (a Dense/Conv
    `activation=` or an Activation/Softmax layer), it is replaced by the
    identity on this copy of the model, so gradients are taken of the logit,
    not of the probability.

    Returns:
      "softmax", "sigmoid", or "none" when the model already outputs scores
      (probabilities are then the softmax of those scores).
    """
    km = keras_module(model)
    layer = _output_layer(model)
    if isinstance(layer, km.layers.Softmax):
        layer.call = lambda inputs, *args, **kwargs: inputs
        return "softmax"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    for kind in ("softmax", "sigmoid"):
        if name == kind:
            layer.activation = km.activations.linear
            return kind
    return "none"
