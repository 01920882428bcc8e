"""Every CAM method against an independent eager, per-image reference.

The reference runs the model image by image in eager mode with its own
feature/head split (GradientTape on the target layer's output, the head
applied by hand without its softmax) and computes each method's formula in
float64 numpy. Tolerance: |cam - ref| <= 1e-3 * max|ref| + 1e-6 (float32
batched kernels vs float64 per image).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import nested_sequential, random_images, small_functional
from tests.references import reference
from transforms.cam.explainer import CamExplainer
from transforms.cam.targets import parse_target


def functional_split(model):
    features = keras.Model(model.inputs, model.get_layer("last_conv").output)
    dense = model.get_layer("head")

    def head(a):
        return tf.matmul(tf.reduce_mean(a, axis=(1, 2)), dense.kernel) + dense.bias

    return features, head


def nested_split(model, base):
    dense = model.get_layer("head")

    def head(a):
        return tf.matmul(tf.reduce_mean(a, axis=(1, 2)), dense.kernel) + dense.bias

    return base, head


def assert_close(cam, ref):
    tol = 1e-3 * np.abs(ref).max() + 1e-6
    np.testing.assert_allclose(cam, ref, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def functional():
    model = small_functional()
    return model, functional_split(model)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam"])
def test_method_matches_eager_reference(functional, method):
    model, (features, head) = functional
    images = random_images(5, seed=3)
    explainer = CamExplainer(small_functional(), method=method)
    out = explainer(images)
    logits = head(features(images)).numpy()
    assert out["cam"].shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(out["target_class"][:, 0], logits.argmax(-1))
    ref = reference(features, head, images, out["target_class"], method)
    assert ref.max() > 0, "the reference map must not be all zero for the test to mean anything"
    assert_close(out["cam"], ref)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_nested_model_matches_reference(method):
    model, base = nested_sequential()
    images = random_images(4, seed=5)
    explainer = CamExplainer(nested_sequential()[0], method=method)
    assert explainer.target_layer == "base/base_out"
    out = explainer(images)
    ref = reference(*nested_split(model, base), images, out["target_class"], method)
    assert_close(out["cam"], ref)


def test_target_modes_label_class_topk(functional):
    model, (features, head) = functional
    images = random_images(4, seed=9)
    labels = np.array([2, 0, 1, 2], np.int32)
    for spec, expected in [
        ("label", labels[:, None]),
        ("class:1", np.ones((4, 1), np.int64)),
        ("topk:2", np.argsort(-head(features(images)).numpy(), axis=-1)[:, :2]),
    ]:
        out = CamExplainer(small_functional(), target=parse_target(spec))(images, labels)
        np.testing.assert_array_equal(out["target_class"], expected)
        assert_close(out["cam"], reference(features, head, images, expected, "gradcam"))


def test_scores_are_softmax_probabilities_and_logits_pre_softmax(functional):
    model, (features, head) = functional
    images = random_images(3, seed=11)
    out = CamExplainer(small_functional())(images)
    logits = head(features(images)).numpy()
    probs = model(images).numpy()
    np.testing.assert_allclose(out["predicted_score"], probs.max(-1), rtol=1e-5)
    np.testing.assert_allclose(out["target_logit"][:, 0], logits.max(-1), rtol=1e-4, atol=1e-5)


def test_one_trace_for_every_batch_size():
    explainer = CamExplainer(small_functional())
    for n in (1, 7, 3, 16):
        assert explainer(random_images(n))["cam"].shape[0] == n
    assert explainer.explain.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam"])
def test_tf_keras_model_matches_tf_keras_reference(method):
    """A tf_keras (Keras 2) nested model with BatchNormalization: same CAM as the tf_keras eager reference."""
    from tests.test_models import dense_head, tf_keras_small_nested

    model, base = tf_keras_small_nested()
    images = random_images(3, seed=4)
    out = CamExplainer(tf_keras_small_nested()[0], method=method)(images)
    ref = reference(base, dense_head(model.get_layer("head")), images, out["target_class"], method)
    assert ref.max() > 0
    assert_close(out["cam"], ref)
