"""Faithfulness scores and the sanity check: math, batching, peer check, columns, stats, compare."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import random_images, small_functional
from transforms.cam.faithfulness import (
    FRACTIONS,
    FaithfulnessScorer,
    _hash_uniform,
    average_ranks,
    cascading_randomisation,
    head_layers,
    push_pull_fill,
    spearman,
)

SIZE = 40  # 1600 pixels: every q in FRACTIONS removes a whole number of pixels (and of Quantus steps)


@pytest.fixture(scope="module")
def explainer():
    from transforms.cam.explainer import CamExplainer

    return CamExplainer(small_functional(size=SIZE))


@pytest.fixture(scope="module")
def batch(explainer):
    images = random_images(5, size=SIZE, seed=3)
    out = explainer(images)
    return images, out["cam"][:, 0], out["target_class"][:, 0], np.arange(11, 16, dtype=np.int32)


def reference_scores(explainer, image, cam, target, seed, *, removal, noise=0.0):
    """Eager, one image at a time: rank the upsampled map with NumPy, remove, score each copy alone."""
    import tensorflow as tf

    scorer = FaithfulnessScorer.from_explainer(explainer, removal=removal, noise=noise)
    height, width, _ = explainer.input_shape
    n = height * width
    seeds = tf.constant([seed], tf.int32)

    def order(maps, stream):
        up = tf.image.resize(np.asarray(maps, np.float32)[None, ..., None], (height, width)).numpy().ravel()
        scaled = (up - up.min()) / (up.max() - up.min())
        key = scaled + 1e-6 * _hash_uniform(tf, seeds, n, stream).numpy()[0]
        return np.argsort(-key, kind="stable")

    random_map = _hash_uniform(tf, seeds, cam.size, 2).numpy().reshape(cam.shape)
    orders = {"morf": order(cam, 1), "random": order(random_map, 3)}
    orders["lerf"] = orders["morf"][::-1]

    def probability(x):
        logits = explainer.model(x[None], training=False)
        return float(tf.nn.softmax(logits)[0, target])

    base = probability(image)
    curves = {}
    for name, ranked in orders.items():
        drops = []
        for q in FRACTIONS:
            removed = np.zeros(n, bool)
            removed[ranked[: int(round(q * n))]] = True
            perturbed = scorer.remove(image[None], removed.reshape(1, height, width), seeds).numpy()[0]
            drops.append(base - probability(perturbed))
        curves[name] = np.array(drops)
    return base, curves


@pytest.mark.parametrize(("removal", "noise"), [("constant", 0.0), ("impute", 2.55)])
def test_batched_scores_match_an_eager_per_image_reference(explainer, batch, removal, noise):
    images, cams, targets, seeds = batch
    out = FaithfulnessScorer.from_explainer(explainer, removal=removal, noise=noise)(images, cams, targets, seeds)
    for i in range(len(images)):
        base, curves = reference_scores(explainer, images[i], cams[i], targets[i], seeds[i], removal=removal,
                                        noise=noise)
        assert out["base_score"][i] == pytest.approx(base, abs=1e-5)
        for o, name in enumerate(("morf", "lerf", "random")):
            np.testing.assert_allclose(out["curves"][o, i], curves[name], atol=1e-5)
            assert out[name][i] == pytest.approx(curves[name].mean(), abs=1e-5)
        assert out["gap"][i] == pytest.approx(curves["morf"].mean() - curves["random"].mean(), abs=1e-5)


def test_one_trace_for_every_batch_size_and_scores_independent_of_the_batch(explainer, batch):
    images, cams, targets, seeds = batch
    scorer = FaithfulnessScorer.from_explainer(explainer)
    whole = scorer(images, cams, targets, seeds)
    for sizes in ((1, 4), (2, 3), (5,)):
        start = 0
        for size in sizes:
            part = scorer(images[start:start + size], cams[start:start + size], targets[start:start + size],
                          seeds[start:start + size])
            np.testing.assert_allclose(part["curves"], whole["curves"][:, start:start + size], atol=1e-6)
            start += size
    assert scorer.score.experimental_get_tracing_count() == 1


def test_the_model_appears_once_in_the_graph(explainer):
    """No Python loop over images or (order, q) steps: one copy of the model's ops, inside one graph loop."""
    scorer = FaithfulnessScorer.from_explainer(explainer)
    graph = scorer.score.get_concrete_function().graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    convolutions = sum(n.op == "Conv2D" for n in nodes)
    assert convolutions == 3  # small_functional has three Conv2D layers
    assert sum(n.op in ("While", "StatelessWhile") for n in nodes) == 1


def test_push_pull_fill_keeps_pixels_uses_only_kept_ones_and_interpolates_smoothly():
    import tensorflow as tf

    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    ramp = np.stack([y * 4, x * 4, y + x], axis=-1)[None]  # a linear image
    keep = np.ones((1, 32, 32, 1), np.float32)
    keep[0, 8:20, 10:24] = 0.0
    filled = push_pull_fill(tf, tf.constant(ramp), tf.constant(keep)).numpy()
    kept = keep[..., 0] > 0
    np.testing.assert_allclose(filled[kept], ramp[kept], atol=1e-4)
    # No leakage: what was under the hole does not change the fill.
    scrambled = ramp.copy()
    scrambled[0, 8:20, 10:24] = 999.0
    np.testing.assert_allclose(push_pull_fill(tf, tf.constant(scrambled), tf.constant(keep)).numpy(), filled,
                               atol=1e-3)
    # The fill stays within the kept values and follows the ramp (no hard edge at the hole's border).
    hole = filled[0, 8:20, 10:24]
    assert hole.min() >= ramp.min() - 1e-3 and hole.max() <= ramp.max() + 1e-3
    assert np.abs(hole - ramp[0, 8:20, 10:24]).mean() < 12  # vs a constant fill's error of ~26
    edge_step = np.abs(filled[0, 8, 10:24] - filled[0, 7, 10:24]).max()
    assert edge_step < 12


def test_quantus_pixel_flipping_agrees_with_constant_removal(batch):
    """Peer check: Quantus 0.6 PixelFlipping (black baseline) on the same model, images and attributions.

    Quantus removes features in cumulative steps in the order of the
    attribution and returns the target's softmax score after each step; with
    a constant baseline a cumulative removal equals a one-shot removal, so
    its scores after 10/20/30/50% of the pixels must equal ours (tolerance
    1e-5: float32 noise). The attribution is given at input resolution with
    distinct values (the upsampling is then the identity, no ties).
    """
    import quantus  # installed without its deps (scripts/setup_venv.sh); the light ones are in the test extra

    from transforms.cam.explainer import CamExplainer

    images, _, targets, seeds = batch
    rng = np.random.default_rng(0)
    attributions = np.stack([rng.permutation(SIZE * SIZE).reshape(SIZE, SIZE) / (SIZE * SIZE)
                             for _ in images]).astype(np.float32)
    explainer = CamExplainer(small_functional(size=SIZE))  # linearises its own copy's head
    scorer = FaithfulnessScorer(explainer.model, input_shape=(SIZE, SIZE, 3), cam_shape=(SIZE, SIZE),
                                head=explainer.head, removal="constant", fill_value=0.0)
    ours = scorer(images, attributions, targets, seeds)
    step = SIZE * SIZE // 10  # Quantus counts features over channels: 160 of 4800 = a third of 160 pixels
    metric = quantus.PixelFlipping(features_in_step=step, perturb_baseline="black", normalise=False, abs=False,
                                   disable_warnings=True, display_progressbar=False)
    theirs = np.asarray(metric(model=small_functional(size=SIZE), x_batch=images, y_batch=targets,
                               a_batch=attributions[:, None], channel_first=False, softmax=True, device=None))
    steps = [int(round(q * SIZE * SIZE * 3 / step)) - 1 for q in FRACTIONS]
    np.testing.assert_allclose(theirs[:, steps], ours["base_score"][:, None] - ours["curves"][0], atol=1e-5)


def test_spearman_and_average_ranks_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(1)
    a = np.round(rng.normal(size=64), 1)  # ties
    b = a + rng.normal(scale=0.5, size=64)
    np.testing.assert_allclose(average_ranks(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(np.zeros(5), b[:5]) is None


def test_cascading_randomisation_changes_the_maps():
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import TargetSpec

    explainer = CamExplainer(small_functional(), target=TargetSpec(mode="label"))
    assert [layer.name for layer in head_layers(explainer.model, "last_conv")] == ["head"]
    images = random_images(6)
    targets = np.array([0, 1, 2, 0, 1, 2], np.int32)
    real = explainer(images, targets)["cam"][:, 0]
    result = cascading_randomisation(explainer, images, targets, seed=0)
    assert result["layers"] == ["head"] and len(result["per_image"]) == 6
    randomised = explainer(images, targets)["cam"][:, 0]
    expected = np.mean([spearman(a, b) or 0.0 for a, b in zip(real, randomised, strict=True)])
    assert result["correlations"][0] == pytest.approx(expected)
    assert result["correlations"][0] < 0.5
