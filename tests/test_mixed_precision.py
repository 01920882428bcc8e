"""`--mixed_precision`: float16 / bfloat16 compute against the float32 CAM, on the CPU.

Stated tolerance (docs/design.md): per batch, the correlation of the low-precision
CAMs with the float32 ones >= 0.99, the largest absolute difference <= 5% of
the float32 CAM's maximum, and scores within 0.02. Measured here: float16
0.14%, bfloat16 1.1% of the maximum.

Where this machine's kernels refuse a dtype (a CPU with AVX512-FP16 under
`ONEDNN_MAX_CPU_ISA=AVX2`), the job explains in float32 with one warning;
the tests then check that the kernels really refuse it and that the
fallback's maps are the float32 maps.
"""

import logging

import numpy as np
import pytest

from tests.helpers import nested_sequential, random_images, small_functional
from transforms.cam.explainer import CamExplainer
from transforms.errors import AuditError
from transforms.precision import apply_mixed_precision, explainer_in_precision

CORRELATION_MIN = 0.99
MAX_DIFF_OF_MAX = 0.05
SCORE_DIFF = 0.02


def assert_within_tolerance(low: dict, full: dict) -> None:
    cam, ref = low["cam"].ravel(), full["cam"].ravel()
    assert ref.max() > 0
    assert np.corrcoef(cam, ref)[0, 1] >= CORRELATION_MIN
    assert np.abs(cam - ref).max() <= MAX_DIFF_OF_MAX * np.abs(ref).max()
    np.testing.assert_allclose(low["target_score"], full["target_score"], atol=SCORE_DIFF, rtol=0)
    assert low["cam"].dtype == np.float32 and low["predicted_score"].dtype == np.float32


def lone_conv_refuses(dtype: str) -> bool:
    """Whether this machine's kernels refuse a plain Conv2D computing in `dtype` (independent of the job)."""
    import keras
    import tensorflow as tf

    layer = keras.layers.Conv2D(4, 3, dtype=keras.DTypePolicy(f"mixed_{dtype}"))
    try:
        layer(tf.zeros([1, 8, 8, 3])).numpy()
    except tf.errors.OpError:
        return True
    return False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("build", [small_functional, lambda: nested_sequential()[0]], ids=["functional", "nested"])
def test_mixed_precision_cam_is_close_to_float32(dtype, build):
    images = random_images(6, seed=3)
    full = CamExplainer(build())(images, np.zeros(6, np.int32))
    explainer, used = explainer_in_precision(CamExplainer, build(), dtype)
    low = explainer(images, np.zeros(6, np.int32))
    if used == "float32":  # the fallback: only where the kernels really refuse the dtype, and then exact
        assert lone_conv_refuses(dtype)
        assert explainer._captured[-1].dtype.name == "float32"
        np.testing.assert_allclose(low["cam"], full["cam"], rtol=1e-5, atol=1e-6)
        return
    assert used == dtype
    # The policy reached the layers: the target layer's activations are low precision.
    assert explainer._captured[-1].dtype.name == dtype
    # Compare the same target classes (argmax may flip between near-equal logits).
    same = low["target_class"][:, 0] == full["target_class"][:, 0]
    assert same.sum() >= 5
    assert_within_tolerance({k: v[same] for k, v in low.items()}, {k: v[same] for k, v in full.items()})


def refusing_model():
    """A model with a layer that fails at run time (an OpError, as a refusing kernel raises) unless it
    computes in float32: the fallback, on any CPU."""
    import keras
    import tensorflow as tf

    class Float32Only(keras.layers.Layer):
        def call(self, x):
            ok = tf.constant(self.compute_dtype == "float32")
            with tf.control_dependencies([tf.debugging.Assert(ok, ["no kernel for", self.compute_dtype])]):
                return tf.identity(x)

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="last_conv")(Float32Only()(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_where_the_kernels_refuse_the_dtype_the_job_explains_in_float32_with_one_warning(caplog):
    images = random_images(4, size=32, seed=5)
    model = refusing_model()
    full = CamExplainer(model)(images)
    with caplog.at_level(logging.WARNING, logger="transforms.precision"):
        explainer, used = explainer_in_precision(CamExplainer, model, "float16")
    assert used == "float32"
    assert all(layer.compute_dtype == "float32" for layer in model.layers)
    np.testing.assert_allclose(explainer(images)["cam"], full["cam"], rtol=1e-6, atol=1e-7)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--mixed_precision float16" in warnings[0] and "no kernel for" in warnings[0]
    assert "explaining in float32" in warnings[0] and "Graph execution error" not in warnings[0]


def test_off_leaves_the_model_alone_and_bad_names_are_refused():
    model = small_functional()
    assert apply_mixed_precision(model, "off") is model
    assert all(layer.compute_dtype == "float32" for layer in model.layers)
    with pytest.raises(AuditError, match="--mixed_precision"):
        apply_mixed_precision(model, "float8")


def test_handler_loads_the_model_under_the_policy(model_path):
    from transforms.model_handler import KerasCamModelHandler

    loaded = KerasCamModelHandler(model_path, mixed_precision="bfloat16").load_model()
    assert loaded.precision == ("float32" if lone_conv_refuses("bfloat16") else "bfloat16")
    assert loaded.explainer.model.get_layer("last_conv").compute_dtype == loaded.precision
    full = KerasCamModelHandler(model_path).load_model()
    images = random_images(4, seed=8)
    assert_within_tolerance(loaded.explainer(images), full.explainer(images))


def test_option_parses_and_a_bad_value_exits_2_with_one_line(capsys):
    from pipeline.options import parse_args

    config, _ = parse_args(["--input", "x", "--model", "m.keras", "--mixed_precision", "bfloat16"])
    assert config.mixed_precision == "bfloat16"
    assert parse_args(["--input", "x", "--model", "m.keras"])[0].mixed_precision == "off"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--input", "x", "--model", "m.keras", "--mixed_precision", "float8"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--mixed_precision" in lines[0]
