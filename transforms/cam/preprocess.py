"""From decoded pixels to the model's input: `--preprocess` presets, size, channels, dtype.

Images arrive as float32 [B, H, W, C] in 0-255, C = 1 (grey) or 3 (RGB) as
the model's input has; a preset scales them, `cast_to_input` gives the
model's input dtype.
"""

from __future__ import annotations

from typing import Callable

from transforms.errors import AuditError

# Preset name -> keras.applications module whose preprocess_input it uses.
_KERAS_PRESETS = {
    "resnet50": "resnet50",
    "resnet": "resnet",
    "resnet_v2": "resnet_v2",
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "mobilenet": "mobilenet",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3",
    "efficientnet": "efficientnet",
    "efficientnet_v2": "efficientnet_v2",
    "inception_v3": "inception_v3",
    "inception_resnet_v2": "inception_resnet_v2",
    "xception": "xception",
    "densenet": "densenet",
    "nasnet": "nasnet",
    "convnext": "convnext",
}
PRESETS = ("none", "scale_0_1", *_KERAS_PRESETS)


def check_preset(name: str) -> str:
    """Returns `name` if it is a known preset, else raises AuditError."""
    if name not in PRESETS:
        raise AuditError(f"--preprocess: expected one of {', '.join(PRESETS)}, got {name!r}")
    return name


def get_preprocess_fn(name: str) -> Callable:
    """The function images[B, H, W, 3] float32 0-255 -> model input."""
    check_preset(name)
    if name == "none":
        return lambda images: images
    if name == "scale_0_1":
        return lambda images: images / 255.0
    import keras

    module = getattr(keras.applications, _KERAS_PRESETS[name])
    return module.preprocess_input


def parse_image_size(text: str) -> tuple[int, int]:
    """`HEIGHTxWIDTH` (e.g. "224x224") -> (height, width); AuditError otherwise."""
    height, sep, width = str(text).strip().lower().partition("x")
    if sep and height.isdigit() and width.isdigit() and int(height) >= 1 and int(width) >= 1:
        return int(height), int(width)
    raise AuditError(f"--image_size: expected HEIGHTxWIDTH such as 224x224, got {text!r}")


def model_input_shape(model, image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """The (H, W, C) images are decoded to for `model`.

    Args:
      model: a Keras model with one image input (batch, height, width, channels).
      image_size: (height, width) from `--image_size`; needed when the model's
        input has a dynamic (None) height or width, and must agree with fixed ones.

    Raises:
      AuditError: several inputs, not a 4-D input, channels other than 1 or 3,
        a dynamic size without `image_size`, or an `image_size` that disagrees.
    """
    if len(model.inputs) != 1:
        raise AuditError(f"model input: expected one image input, found {len(model.inputs)} inputs")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise AuditError(f"model input: expected (batch, height, width, channels), found {shape}")
    _, height, width, channels = shape
    if channels not in (1, 3):
        raise AuditError(f"model input: expected 1 (grey) or 3 (RGB) channels, channels-last, found {shape}")
    if image_size is None:
        if height is None or width is None:
            raise AuditError(
                f"model input {shape} has a dynamic height or width: pass --image_size HEIGHTxWIDTH "
                "(one size for the whole job, e.g. --image_size 224x224)"
            )
        return int(height), int(width), int(channels)
    for fixed, chosen, name in ((height, image_size[0], "height"), (width, image_size[1], "width")):
        if fixed is not None and int(fixed) != chosen:
            raise AuditError(
                f"--image_size {image_size[0]}x{image_size[1]}: the model's input {name} is fixed at "
                f"{int(fixed)} (input {shape}); drop --image_size or match it"
            )
    return int(image_size[0]), int(image_size[1]), int(channels)


def model_input_dtype(model, preprocess: str) -> str:
    """The dtype name of the model's input ("float32", "float16", "uint8", ...).

    Raises:
      AuditError: an integer input other than uint8, or a uint8 input with a
        `--preprocess` preset (the model takes raw 0-255 pixels).
    """
    import tensorflow as tf

    dtype = tf.as_dtype(model.inputs[0].dtype)
    if dtype.is_integer and dtype != tf.uint8:
        raise AuditError(f"model input: expected a float or uint8 input, found {dtype.name}")
    if dtype == tf.uint8 and preprocess != "none":
        raise AuditError(
            f"--preprocess {preprocess}: the model's input is uint8 (raw 0-255 pixels, it scales "
            "them itself); use --preprocess none"
        )
    if not (dtype.is_floating or dtype == tf.uint8):
        raise AuditError(f"model input: expected a float or uint8 input, found {dtype.name}")
    return dtype.name


def cast_to_input(images, dtype: str):
    """float32 model inputs -> the model's input dtype (uint8: clipped to 0-255 and rounded)."""
    import tensorflow as tf

    if dtype == "float32":
        return images
    if dtype == "uint8":
        return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)
    return tf.cast(images, dtype)
