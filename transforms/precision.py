"""`--mixed_precision`: run a loaded model's layers in float16 or bfloat16.

Keras applies a dtype policy per layer, and a model loaded from a file keeps
the policy it was saved with (usually float32), so the global policy
(`keras.mixed_precision.set_global_policy`) does not reach it. Instead every
layer of the explainer's own copy of the model (nested models included) gets
the mixed policy in place: variables stay float32, each layer computes in the
low-precision dtype. The explainer casts logits, activations and gradients to
float32, so the CAM and the scores are computed in float32
(`transforms/cam/explainer.py`).

Not every machine's kernels compute every dtype: on a CPU whose features
TensorFlow reads as AVX512-FP16/BF16 while oneDNN is capped below them
(`ONEDNN_MAX_CPU_ISA=AVX2`), a float16 convolution fails with "could not
create a primitive descriptor". `explainer_in_precision` runs the compiled
function once on a grey image and, if the kernels refuse, explains in float32
with one warning: the setting is a speed option whose results are checked
against float32, so float32 is never a wrong answer, and a nightly job does
not die (or, on Dataflow, retry a worker forever) over it.
"""

from __future__ import annotations

import logging
from typing import Callable

from transforms.errors import AuditError, op_error_line

_LOG = logging.getLogger(__name__)

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
    return _set_policy(model, f"mixed_{dtype}", dtype)


def _set_policy(model, name: str, dtype: str):
    import keras

    policy = keras.DTypePolicy(name)
    for layer in model._flatten_layers(include_self=True, recursive=True):
        try:
            layer.dtype_policy = policy
        except AttributeError as exc:  # a layer class without the Keras 3 setter
            raise AuditError(
                f"--mixed_precision {dtype}: layer {layer.name!r} ({type(layer).__name__}) does not take a "
                "dtype policy; run without --mixed_precision"
            ) from exc
    return model


def kernels_refuse(explainer) -> str | None:
    """Runs `explainer` once on one grey image: None if its kernels ran, else their error in one line."""
    import numpy as np
    import tensorflow as tf

    try:
        explainer(np.full((1, *explainer.input_shape), 127.0, np.float32))
    except tf.errors.OpError as exc:  # a kernel that cannot run this dtype here (only OpError: bugs still raise)
        return op_error_line(exc)
    return None


def explainer_in_precision(make_explainer: Callable, model, dtype: str):
    """(explainer, dtype used): `make_explainer(model)` under `--mixed_precision dtype`, or in float32
    with one warning if this machine's kernels refuse the low-precision model."""
    explainer = make_explainer(apply_mixed_precision(model, dtype))
    if dtype == "off":
        return explainer, "float32"
    problem = kernels_refuse(explainer)
    if problem is None:
        return explainer, dtype
    _LOG.warning(
        "--mixed_precision %s: this machine's kernels cannot run the model in %s (%s); explaining in float32",
        dtype, dtype, problem,
    )
    return make_explainer(_set_policy(model, "float32", dtype)), "float32"
