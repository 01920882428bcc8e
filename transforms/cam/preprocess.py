"""`--preprocess` presets: float32 RGB pixels in 0-255 -> the model's input."""

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
