"""Finding the target layer, reading its output, and the pre-softmax score.

Works for functional models, Sequential models and nested models (a
keras.applications base inside a Sequential or functional model), built with
Keras 3 or with tf_keras (Keras 2): the target layer may sit at any depth.
Its output is captured by wrapping that layer's `call` on the explainer's own
copy of the model, so the activations are the very tensors the forward pass
used and `GradientTape` differentiates through the head only.

Layers that hold other layers without being functional models (keras_hub's
`ViTEncoder`, whose `call` runs every transformer block) are opened too: their
sublayers get paths below theirs ("vi_t_backbone/vit_encoder/transformer_block_1",
see `walk_inner`), and as such a sublayer has no symbolic output, its output
shape and call order come from one eager forward pass (`probe_layer_calls`).
A layer that returns several tensors (keras_hub's `DeiTEncoder`: sequence,
hidden states, attention scores) is explained on its first one (`primary_output`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional

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


def primary_output(out):
    """A layer's output, or the first of the tensors it returns (a list or tuple, e.g. (sequence, scores))."""
    while isinstance(out, (list, tuple)) and out:
        out = out[0]
    return out


def _output_shape(layer):
    try:
        return tuple(primary_output(layer.output).shape)
    except (AttributeError, ValueError, RuntimeError, TypeError):
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


def is_tokens(layer) -> bool:
    """A layer with a single 3-D output (batch, tokens, channels): a transformer's sequence."""
    shape = _output_shape(layer)
    return shape is not None and len(shape) == 3


def _class_name(layer) -> str:
    return type(layer).__name__


def is_attention(layer) -> bool:
    """An attention layer (keras MultiHeadAttention, Attention, GroupedQueryAttention, or any *Attention*)."""
    return "Attention" in _class_name(layer)


def _sublayers(layer, recursive: bool = True) -> list:
    """The layers a layer holds (all of them, or with recursive=False its direct children)."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    try:
        return list(flatten(include_self=False, recursive=recursive))
    except TypeError:
        return []


def contains_attention(layer) -> bool:
    """A layer that is not an attention layer itself but holds one (a transformer block or encoder in one layer)."""
    return not is_attention(layer) and any(is_attention(sub) for sub in _sublayers(layer))


def is_opaque(layer) -> bool:
    """A layer that holds other layers but is no functional/Sequential model (not an attention layer itself):
    its sublayers have no symbolic outputs (e.g. keras_hub's ViTEncoder holding every transformer block)."""
    return (not (_is_model(layer) and _is_graph_model(layer)) and not is_attention(layer)
            and bool(_sublayers(layer, recursive=False)))


def _walk_children(layer, prefix: str) -> Iterator[tuple[str, object]]:
    for child in _sublayers(layer, recursive=False):
        path = f"{prefix}{child.name}"
        yield path, child
        if not is_attention(child):
            yield from _walk_children(child, f"{path}/")


def walk_inner(model) -> Iterator[tuple[str, object]]:
    """Yields (path, layer) of the layers inside opaque layers (see `is_opaque`), depth-first.

    Paths continue the holder's: "vi_t_backbone/vit_encoder/transformer_block_2". Attention layers are
    yielded but not opened.
    """
    for path, layer in walk_layers(model):
        if is_opaque(layer):
            yield from _walk_children(layer, f"{path}/")


def has_opaque_layers(model) -> bool:
    """Does the model hold a layer whose sublayers `walk_inner` opens?"""
    return any(is_opaque(layer) for _, layer in walk_layers(model))


@dataclasses.dataclass
class LayerCall:
    """A layer's first call in the probe's forward pass (`probe_layer_calls`).

    Attributes:
      path: the layer's path (graph layers as in `walk_layers`, sublayers as in `walk_inner`).
      shape: its (first) output's shape without the batch, e.g. (tokens, channels).
      holds_attention: the layer is, or holds, an attention layer (a transformer block or encoder).
      input, output: for layers holding attention, the first positional input and the output (numpy), to
        check that one block's output is the next one's input; cleared once the target layer is chosen.
    """

    path: str
    shape: tuple
    holds_attention: bool
    input: object = None
    output: object = None


def _unwrap(layer, own: bool, original) -> None:
    if own:
        layer.call = original
    else:
        del layer.call  # back to the class's method


def probe_layer_calls(model, inputs) -> dict[str, LayerCall]:
    """Runs the model once, eagerly, on `inputs` (what the model takes, batch 1) with every layer of
    `walk_layers` and `walk_inner` wrapped; returns path -> `LayerCall` of each layer called, in the order
    the calls started (a holder comes before the layers it calls)."""
    import numpy as np

    calls: dict[str, Optional[LayerCall]] = {}
    wrapped = []

    def wrap(path, layer):
        original, own = layer.call, "call" in vars(layer)
        holds = is_attention(layer) or contains_attention(layer)

        @functools.wraps(original)
        def call(*args, **kwargs):
            first = path not in calls
            if first:
                calls[path] = None  # the order of the calls' starts
            out = original(*args, **kwargs)
            if first:
                tensor = primary_output(out)
                shape = tuple(getattr(tensor, "shape", ()) or ())
                record = LayerCall(path, tuple(None if d is None else int(d) for d in shape[1:]), holds)
                if holds and args:
                    record.input = np.asarray(primary_output(args[0]))
                    record.output = np.asarray(tensor)
                calls[path] = record
            return out

        layer.call = call
        wrapped.append((layer, own, original))

    seen = set()
    for path, layer in [*walk_layers(model), *walk_inner(model)]:
        if id(layer) not in seen and "InputLayer" not in _class_name(layer):
            seen.add(id(layer))
            wrap(path, layer)
    try:
        model(inputs, training=False)
    finally:
        for layer, own, original in reversed(wrapped):
            _unwrap(layer, own, original)
    return {path: call for path, call in calls.items() if call is not None and call.shape}


def _inner_block_input(holder: str, calls: dict[str, LayerCall]) -> Optional[tuple[str, str]]:
    """Inside `holder` (a layer holding every block): the output of the block before the last one, when it is
    the last block's input (blocks called in a chain). None otherwise."""
    import numpy as np

    blocks = [c for p, c in calls.items() if c.holds_attention and p.startswith(f"{holder}/")]
    blocks = [c for c in blocks if not any(c.path.startswith(f"{o.path}/") for o in blocks)]  # outermost
    if len(blocks) < 2:
        return None
    before, last = blocks[-2], blocks[-1]
    if (
        len(before.shape) not in (2, 3) or before.output is None or last.input is None
        or before.output.shape != last.input.shape or not np.array_equal(before.output, last.input)
    ):
        return None
    return before.path, (
        f"input of the last attention block ({last.path!r}, inside {holder!r}): the output of the block "
        f"before it, {before.path!r}"
    )


def _is_add(layer) -> bool:
    return isinstance(layer, keras_module(layer).layers.Add)


def _is_skipped(layer) -> bool:
    """Layers whose output is never the block's: pooling, normalisation, dropout."""
    name = _class_name(layer)
    return name.startswith(_POOLING_PREFIXES) or "Normalization" in name or "Dropout" in name


def block_input_layer(model, calls: Optional[dict[str, LayerCall]] = None) -> tuple[str, str]:
    """The input of the model's last attention block: (path, reason), for heads that read only prefix tokens.

    The output of the last residual Add (else of the last layer with a token or
    spatial output, normalisation/dropout/pooling skipped) called before the
    last attention layer: the residual stream that block attends over. When
    every block lives inside one layer (keras_hub's ViTEncoder), `calls` (see
    `probe_layer_calls`) opens it: the output of the block before the last one,
    when it is the last block's input.
    """
    layers = list(walk_layers(model))
    attention = [i for i, (_, layer) in enumerate(layers) if is_attention(layer) or contains_attention(layer)]
    if not attention:
        raise AuditError(f"model {model.name!r} has no attention layer")
    last_path = layers[attention[-1]][0]
    candidates = [  # after the first attention: never a layer that runs before all attention
        i for i in range(attention[0] + 1, attention[-1])
        if (is_spatial(layers[i][1]) or is_tokens(layers[i][1])) and not _is_skipped(layers[i][1])
    ]
    if not candidates and calls and contains_attention(layers[attention[-1]][1]):
        found = _inner_block_input(last_path, calls)
        if found:
            return found
    if not candidates:
        raise AuditError(
            f"model {model.name!r}: its head reads only the prefix (class) token(s), so the patch tokens of "
            f"the last attention block's output get zero gradient, and no layer between its attention blocks "
            f"is reachable (the last attention is in {last_path!r}); pass --target_layer NAME naming the input "
            "of the last block, or explain a model whose head pools the patch tokens"
        )
    adds = [i for i in candidates if _is_add(layers[i][1])]
    chosen = adds[-1] if adds else candidates[-1]
    return layers[chosen][0], f"input of the last attention block (the last {'residual Add' if adds else 'token layer'} before {last_path!r})"


def choose_target_layer(model) -> tuple[str, str]:
    """The default target layer and why it was chosen: (path, reason).

    * A model with attention (a layer named *Attention*, or a layer holding one,
      such as a keras_hub encoder): the output of the last attention block,
      i.e. what feeds the final normalisation and pooling. Among the layers
      after the last attention layer (and that layer itself when it is a whole
      block or encoder) with a token (B, N, D) or spatial (B, h, w, C) output,
      the last residual Add, else the last one that is not a normalisation,
      dropout or pooling layer. Never a layer that runs before all attention.
    * Any other model: the last layer with a 4-D spatial output before the
      head, pooling layers skipped: the map before pooling has more detail and
      is what Grad-CAM's authors used (e.g. VGG19 -> block5_conv4).
    """
    if not _is_graph_model(model):
        raise AuditError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed model: "
            f"no layer with a spatial output can be reached. {_FIXES}"
        )
    layers = list(walk_layers(model))
    attention = [i for i, (_, layer) in enumerate(layers) if is_attention(layer) or contains_attention(layer)]
    if attention:
        last = attention[-1]
        last_path, last_layer = layers[last]
        start = last if contains_attention(last_layer) else last + 1
        candidates = [
            i for i in range(start, len(layers))
            if (is_spatial(layers[i][1]) or is_tokens(layers[i][1])) and not _is_skipped(layers[i][1])
        ]
        if not candidates:
            raise AuditError(
                f"model {model.name!r}: its last attention layer is {last_path!r} "
                f"({_class_name(last_layer)}), and no layer after it has a token (batch, tokens, channels) "
                "or spatial (batch, height, width, channels) output; pass --target_layer NAME naming the "
                "output of the last transformer block"
            )
        adds = [i for i in candidates if _is_add(layers[i][1])]
        chosen = adds[-1] if adds else candidates[-1]
        path = layers[chosen][0]
        if chosen == last:
            why = f"{path!r} ({_class_name(last_layer)}) holds the model's last attention layers: its output"
        else:
            kind = "residual Add" if adds else "layer with a token or spatial output"
            why = f"the last {kind} after {last_path!r}, the model's last attention layer"
        return path, f"output of the last attention block: {why}"
    candidates = [path for path, layer in layers if is_spatial(layer) and not _class_name(layer).startswith(_POOLING_PREFIXES)]
    if not candidates:
        raise AuditError(
            f"model {model.name!r}: expected a layer with a 4-D spatial output "
            f"(batch, height, width, channels) or an attention block, found none. {_FIXES}"
        )
    return candidates[-1], "the last layer with a 4-D (batch, height, width, channels) output before the head (pooling skipped)"


def find_target_layer(model) -> str:
    """The default target layer's path (see `choose_target_layer`)."""
    return choose_target_layer(model)[0]


def patch_grids_before(model, path: str, calls: Optional[dict[str, LayerCall]] = None) -> list[tuple[str, int, int]]:
    """(path, h, w) of the layers with a static 4-D output called before `path` (input layers excluded).

    With `calls` (see `probe_layer_calls`): the layers whose call started before the target's, sublayers
    included (a patch embedding's Conv2D inside keras_hub's ViTPatchingAndEmbedding), the target's holders
    excluded.
    """
    if calls is not None:
        order = list(calls)
        stop = order.index(path) if path in order else len(order)
        return [
            (p, calls[p].shape[0], calls[p].shape[1]) for p in order[:stop]
            if len(calls[p].shape) == 3 and None not in calls[p].shape[:2] and not path.startswith(f"{p}/")
        ]
    grids = []
    for p, layer in walk_layers(model):
        if p == path:
            break
        shape = _output_shape(layer)
        if shape and len(shape) == 4 and None not in shape[1:3] and "InputLayer" not in _class_name(layer):
            grids.append((p, int(shape[1]), int(shape[2])))
    return grids


def resolve_layer_path(model, path: str) -> str:
    """The full path of a layer given by path or bare name (searched at every depth)."""
    layers = dict(walk_layers(model))
    if path in layers:
        return path
    matches = [p for p in layers if p.rsplit("/", 1)[-1] == path]
    if len(matches) == 1:
        return matches[0]
    if not matches:  # a layer inside a layer (keras_hub's transformer blocks): its full path or a tail of it
        inner = [p for p, _ in walk_inner(model)]
        matches = [p for p in inner if p == path] or [p for p in inner if p.endswith(f"/{path}")]
        if len(matches) == 1:
            return matches[0]
    spatial = [p for p, layer in layers.items() if is_spatial(layer) or is_tokens(layer)]
    if matches:
        raise AuditError(f"--target_layer {path!r} is ambiguous: use one of {matches}")
    holders = {p for p, layer in layers.items() if is_opaque(layer)}
    inside = [p for p, _ in walk_inner(model) if p.rsplit("/", 1)[0] in holders]  # e.g. the encoder's blocks
    raise AuditError(
        f"--target_layer: expected a layer of model {model.name!r}, got {path!r}; "
        f"layers with a spatial or token output: {spatial[-8:]}"
        + (f"; layers inside {sorted(holders)}: {inside[-8:]}" if inside else "")
    )


def get_layer(model, path: str):
    """The layer at `path` (see `resolve_layer_path`)."""
    resolved = resolve_layer_path(model, path)
    layers = dict(walk_layers(model))
    return layers[resolved] if resolved in layers else dict(walk_inner(model))[resolved]


def check_target_layer(model, path: str, calls: Optional[dict[str, LayerCall]] = None) -> tuple:
    """Returns the target layer's output shape without the batch: (h, w, c) for a map, (tokens, channels)
    for a transformer's sequence (None where dynamic), or raises AuditError.

    A layer inside another layer (`walk_inner`) has no symbolic output: its shape is the one `calls` (see
    `probe_layer_calls`) saw.
    """
    resolved = resolve_layer_path(model, path)
    if resolved not in dict(walk_layers(model)):
        call = (calls or {}).get(resolved)
        if call is None:
            raise AuditError(
                f"--target_layer {path!r}: the model's forward pass never calls it (or it outputs no tensor); "
                "pick a layer the model uses"
            )
        shape = call.shape
        if not (len(shape) == 2 or (len(shape) == 3 and (None in shape[:2] or shape[0] * shape[1] > 1))):
            raise AuditError(
                f"--target_layer {path!r}: expected a 4-D (batch, height, width, channels) map or a 3-D "
                f"(batch, tokens, channels) sequence, found {(None, *shape)}; name a layer inside the "
                "network (for a transformer: the output of its last block)"
            )
        return shape
    layer = get_layer(model, path)
    if not (is_spatial(layer) or is_tokens(layer)):
        raise AuditError(
            f"--target_layer {path!r}: expected a 4-D (batch, height, width, channels) map or a 3-D "
            f"(batch, tokens, channels) sequence, found {_output_shape(layer)}; name a layer inside the "
            "network (for a transformer: the output of its last block)"
        )
    return tuple(None if d is None else int(d) for d in _output_shape(layer)[1:])


def release_output(layer) -> None:
    """Undoes `capture_output` on `layer`."""
    wrapped = getattr(layer.call, "__wrapped__", None)
    if wrapped is not None:
        layer.call = wrapped


def capture_output(layer) -> list:
    """Wraps `layer.call` so each call appends its output to the returned list."""
    store: list = []
    original = layer.call

    @functools.wraps(original)
    def call(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(primary_output(out))
        return out

    layer.call = call
    return store


def _output_layer(model, index: int = 0):
    """The innermost layer that produces the model's output number `index`."""
    try:
        history = model.outputs[index]._keras_history
        layer = getattr(history, "operation", None) or history.layer  # Keras 3 / tf_keras
    except (AttributeError, IndexError, ValueError, TypeError):
        layer = model.layers[-1]
    if _is_model(layer) and layer is not model and _is_graph_model(layer):
        return _output_layer(layer)
    return layer


def output_names(model) -> list[str]:
    """The names of the model's outputs (Keras's output_names, else the producing layers' names)."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == len(model.outputs):
        return [str(n) for n in names]
    out = []
    for i, tensor in enumerate(model.outputs):
        history = getattr(tensor, "_keras_history", None)
        layer = getattr(history, "operation", None) or getattr(history, "layer", None)
        out.append(getattr(layer, "name", f"output_{i}"))
    return out


def linearize_head(model, index: int = 0) -> str:
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
    layer = _output_layer(model, index)
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
