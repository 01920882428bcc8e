"""`--mixed_precision`: run a loaded model's layers in float16 or bfloat16.

Keras applies a dtype policy per layer, and a model loaded from a file keeps
the policy it was saved with (usually float32), so the global policy
(`keras.mixed_precision.set_global_policy`) does not reach it. Instead every
layer of the explainer's own copy of the model (nested models included) gets
the mixed policy in place: variables stay float32, each layer computes in the
low-precision dtype. The explainer casts logits, activations and gradients to
float32, so the CAM and the scores are computed in float32
(`transforms/cam/explainer.py`).
"""

from __future__ import annotations

from transforms.errors import AuditError

MIXED_PRECISION = ("off", "float16", "bfloat16")


def check_mixed_precision(name: str) -> str:
    """Returns `name` if it is a known setting, else raises AuditError."""
    if name not in MIXED_PRECISION:
        raise AuditError(f"--mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, got {name!r}")
    return name


def apply_mixed_precision(model, dtype: str):
    """Sets the policy "mixed_<dtype>" on every layer of `model` (in place); returns the model.

    Args:
      model: a Keras 3 model (functional, Sequential, nested).
      dtype: "off" (nothing changes), "float16" or "bfloat16".
    """
    if check_mixed_precision(dtype) == "off":
        return model
    import keras

    policy = keras.DTypePolicy(f"mixed_{dtype}")
    for layer in model._flatten_layers(include_self=True, recursive=True):
        try:
            layer.dtype_policy = policy
        except AttributeError as exc:  # a layer class without the Keras 3 setter
            raise AuditError(
                f"--mixed_precision {dtype}: layer {layer.name!r} ({type(layer).__name__}) does not take a "
                "dtype policy; run without --mixed_precision"
            ) from exc
    return model
