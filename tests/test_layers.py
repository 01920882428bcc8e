"""Target-layer discovery, nested models, the linear head, and start-up errors."""

import keras
import numpy as np
import pytest

from tests.helpers import nested_sequential, random_images, small_functional
from transforms.cam.explainer import CamExplainer
from transforms.cam.layers import find_target_layer, linearize_head
from transforms.errors import AuditError


@pytest.mark.parametrize(
    "constructor, kwargs, expected",
    [
        (keras.applications.ResNet50, {}, "conv5_block3_out"),
        (keras.applications.MobileNetV2, {}, "out_relu"),
        (keras.applications.VGG19, {}, "block5_conv4"),
    ],
)
def test_default_target_layer_of_applications(constructor, kwargs, expected):
    model = constructor(weights=None, **kwargs)
    assert find_target_layer(model) == expected


def test_default_target_layer_inside_nested_application():
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3), alpha=0.35)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    functional = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    sequential = keras.Sequential([keras.Input((96, 96, 3)), base, keras.layers.GlobalAveragePooling2D(),
                                   keras.layers.Dense(4, activation="softmax")])
    for model in (functional, sequential):
        assert find_target_layer(model) == f"{base.name}/out_relu"
        out = CamExplainer(model)(random_images(2, size=96))
        assert out["cam"].shape == (2, 1, 3, 3)


def test_sequential_model():
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                              keras.layers.Conv2D(4, 3, activation="relu", name="c2"), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="sigmoid")])
    explainer = CamExplainer(model)
    assert explainer.target_layer == "c2" and explainer.head == "sigmoid"
    assert explainer(random_images(3, size=16))["cam"].shape == (3, 1, 12, 12)


def test_linear_head_gives_logits():
    model = small_functional()
    probs = model(random_images(2)).numpy()
    assert linearize_head(model) == "softmax"
    logits = model(random_images(2)).numpy()
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), probs, rtol=1e-5)
    assert not np.allclose(logits.sum(-1), 1.0)


def test_separate_softmax_layer_is_removed():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(3)(x)))
    assert CamExplainer(model).head == "softmax"


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(self.pool(self.conv(x)))


def test_subclassed_model_fails_with_what_to_do():
    model = Subclassed()
    model(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(AuditError, match=r"subclassed.*Do one of"):
        find_target_layer(model)


def test_bad_target_layer_lists_spatial_layers():
    with pytest.raises(AuditError, match="last_conv"):
        CamExplainer(small_functional(), target_layer="nope")
    with pytest.raises(AuditError, match="4-D"):
        CamExplainer(small_functional(), target_layer="head")


def test_nested_layer_by_bare_name():
    model, _ = nested_sequential()
    assert CamExplainer(model, target_layer="base_out").target_layer == "base/base_out"


def test_target_layer_found_by_rank_in_a_dynamic_input_model():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    assert find_target_layer(model) == "c2"
    explainer = CamExplainer(model, image_size=(24, 40))
    assert explainer.input_shape == (24, 40, 3) and explainer.cam_shape == (6, 10) and explainer.head == "none"
    images = np.random.default_rng(0).uniform(0, 255, (2, 24, 40, 3)).astype(np.float32)
    assert explainer(images)["cam"].shape == (2, 1, 6, 10)


def test_tf_keras_nested_model_target_layer_and_head():
    import tf_keras

    from tests.test_models import tf_keras_small_nested
    from transforms.cam.layers import keras_module

    model, _ = tf_keras_small_nested()
    assert keras_module(model) is tf_keras and keras_module(model.layers[0]) is tf_keras
    assert find_target_layer(model) == "base/base_out"
    explainer = CamExplainer(model)
    assert explainer.head == "softmax" and explainer.cam_shape == (8, 8) and explainer.input_shape == (32, 32, 3)
    logits = model(random_images(2)).numpy()  # the explainer's copy is linearised in place
    assert not np.allclose(logits.sum(-1), 1.0)
