"""ClassStatsFn tested without a pipeline, the three ways, and in a pipeline."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.class_stats import ClassStatsFn, ComputeClassStats, class_contributions
from transforms.schemas import CLASS_STATS_SCHEMA


def row(i, label, predicted, score, target=None, rank=0, box_mass=0.5, peak_in_box=True):
    cam = np.zeros((2, 2), np.float32)
    cam[i % 2, (i // 2) % 2] = 1.0 + i
    return {
        "label": label, "predicted_class": predicted, "predicted_score": score, "target_rank": rank,
        "target_class": predicted if target is None else target, "target_score": score,
        "cam": cam.ravel().tolist(), "cam_height": 2, "cam_width": 2, "cam_max": float(cam.max()),
        "peak_y": 0.25, "peak_x": 0.75, "entropy": 0.0, "border_mass": 1.0, "box_mass": box_mass,
        "peak_in_box": peak_in_box,
    }


ROWS = [
    row(0, 0, 0, 0.9), row(1, 0, 1, 0.6), row(2, 1, 1, 0.8), row(3, 1, 1, 0.7, peak_in_box=False),
    row(4, None, 0, 0.5), row(5, 0, 2, 0.4), row(6, 0, 0, 0.3, target=2, rank=1),
]


def contributions():
    by_class = {}
    for r in ROWS:
        for cls, c in class_contributions(r):
            by_class.setdefault(cls, []).append(c)
    return by_class


def one_accumulator(fn, items):
    acc = fn.create_accumulator()
    for item in items:
        acc = fn.add_input(acc, item)
    return fn.extract_output(acc)


def per_item_then_merged(fn, items):
    accs = [fn.add_input(fn.create_accumulator(), item) for item in items]
    return fn.extract_output(fn.merge_accumulators(accs))


def merged_then_compacted(fn, items):
    half = len(items) // 2
    first = fn.compact(fn.merge_accumulators([one_acc(fn, items[:half])]))
    second = fn.compact(one_acc(fn, items[half:]))
    return fn.extract_output(fn.compact(fn.merge_accumulators([first, second])))


def one_acc(fn, items):
    acc = fn.create_accumulator()
    for item in items:
        acc = fn.add_input(acc, item)
    return acc


EXPECTED = {
    0: dict(num_labelled=3, num_predicted=2, num_correct=1, accuracy=1 / 3, precision=1.0,
            mean_predicted_score=0.7, num_targeted=2, top=[(1, 1), (2, 1)]),
    1: dict(num_labelled=2, num_predicted=3, num_correct=2, accuracy=1.0, precision=2 / 3,
            mean_predicted_score=0.7, num_targeted=3, top=[]),
    2: dict(num_labelled=0, num_predicted=1, num_correct=0, accuracy=None, precision=0.0,
            mean_predicted_score=0.4, num_targeted=2, top=[]),
}


@pytest.mark.parametrize("strategy", [one_accumulator, per_item_then_merged, merged_then_compacted])
def test_three_ways_agree_with_hand_counts(strategy):
    fn = ClassStatsFn()
    for cls, items in contributions().items():
        out = strategy(fn, items)
        want = EXPECTED[cls]
        for key in ("num_labelled", "num_predicted", "num_correct", "num_targeted"):
            assert out[key] == want[key], (cls, key)
        for key in ("accuracy", "precision", "mean_predicted_score"):
            assert out[key] == pytest.approx(want[key]), (cls, key)
        assert [(c["predicted_class"], c["count"]) for c in out["top_confusions"]] == want["top"]
    # Class 1 is targeted by rows 1, 2, 3 (all correct-size maps) -> mean of normalised maps.
    out = strategy(fn, contributions()[1])
    expected = np.mean([np.asarray(ROWS[i]["cam"]) / ROWS[i]["cam_max"] for i in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(out["mean_cam"], expected, rtol=1e-6)
    assert out["pointing_accuracy"] == pytest.approx(2 / 3)


def test_the_three_ways_give_identical_outputs():
    fn = ClassStatsFn()
    for items in contributions().values():
        outs = [s(fn, items) for s in (one_accumulator, per_item_then_merged, merged_then_compacted)]
        for out in outs[1:]:
            assert out.keys() == outs[0].keys()
            for key, value in outs[0].items():
                # Sums in a different order differ in the last bits only.
                assert out[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_in_a_pipeline_rows_fit_the_schema():
    with TestPipeline() as p:
        stats = p | beam.Create(ROWS) | ComputeClassStats(["zero", "one", "two"])
        names = stats | beam.Map(lambda r: (r["class_id"], r["class_name"], r["num_labelled"]))
        assert_that(names, equal_to([(0, "zero", 3), (1, "one", 2), (2, "two", 0)]))
        fits = stats | beam.Map(lambda r: pa.Table.from_pylist([r], schema=CLASS_STATS_SCHEMA).num_rows)
        assert_that(fits, equal_to([1, 1, 1]), label="FitSchema")
