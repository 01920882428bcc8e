"""Acceptance on the demo: the trained model's maps are faithful and pass the sanity check; random weights don't.

Uses the session's demo runs (tests/audit_fixtures.py: default options, so
2% of the 400 images scored and 32 images in the sanity check) and scores
64 fresh demo images directly for the trained and a random-weights model.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.audit_fixtures import RUN_IDS

IMAGES = 64


def _scores(model) -> dict:
    from pipeline.demo import make_arrays
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.faithfulness import FaithfulnessScorer

    images, _, _ = make_arrays(IMAGES, seed=4242)
    images = images.astype(np.float32)
    explainer = CamExplainer(model)
    out = explainer(images)
    scorer = FaithfulnessScorer.from_explainer(explainer)
    return scorer(images, out["cam"][:, 0], out["target_class"][:, 0], np.arange(IMAGES, dtype=np.int32))


@pytest.fixture(scope="module")
def trained_and_random(demo_runs):
    import keras

    from pipeline.demo import build_model
    from transforms.model_loading import load_keras_model

    keras.utils.set_random_seed(5)
    return _scores(load_keras_model(demo_runs.demo.model_path)), _scores(build_model())


def test_trained_demo_model_removes_more_with_its_hottest_region_than_at_random(trained_and_random):
    trained, _ = trained_and_random
    gap = trained["gap"]
    standard_error = gap.std() / np.sqrt(len(gap))
    assert gap.mean() > 0.05 and gap.mean() > 4 * standard_error, (gap.mean(), standard_error)
    # The MoRF curve is above the random one at every q on average, LeRF stays near 0.
    curves = trained["curves"].mean(axis=1)  # [morf, lerf, random] x q
    assert np.all(curves[0] > curves[2])
    assert abs(trained["lerf"].mean()) < 0.05


def test_random_weights_give_a_gap_near_zero(trained_and_random):
    """A random CNN's maps still follow the object's edges a little (0.01-0.03 on demo images); the trained
    model's gap is at least five times larger."""
    trained, random = trained_and_random
    assert abs(random["gap"].mean()) < 0.05, random["gap"].mean()
    assert abs(random["gap"].mean()) < trained["gap"].mean() / 5


def test_demo_runs_report_a_positive_gap_and_maps_that_change(demo_runs):
    for run_id in (RUN_IDS[0], RUN_IDS[1]):  # the marker model and the plain one
        summary = demo_runs.manifests[run_id]["faithfulness"]
        assert summary["sample_share"] == 1.0 and summary["rows"] == 16  # --faithfulness_images (the default)
        assert summary["mean_gap"] > 0 and summary["gap_ci95"][0] <= summary["mean_gap"] <= summary["gap_ci95"][1]
        sanity = summary["sanity"]
        assert sanity["images"] == 32 and sanity["layers"] == ["classes"]
        assert sanity["correlation"] < sanity["max_correlation"] and not sanity["flagged"]
    assert demo_runs.exit_codes[RUN_IDS[0]] == 0  # the checks never change the exit status
    page = open(os.path.join(demo_runs.run_dir(RUN_IDS[0]), "report.html"), encoding="utf-8").read()
    assert "Can the maps be trusted?" in page and "Sanity check passed" in page
    assert "alt='deletion curves'" in page
