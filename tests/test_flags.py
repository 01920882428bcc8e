"""Audit flags: per image, per class (CombineFn), and on the demo's shortcut class."""

import numpy as np
import pytest

from pipeline.demo import MOVING_SHORTCUT_CLASS, SHORTCUT_CLASS
from pipeline.runs.manifest import read_table
from tests.audit_fixtures import RUN_IDS
from transforms.class_stats import ClassStatsFn, class_contributions
from transforms.flags import IMAGE_FLAGS, FlagThresholds, cell_of, image_flags, shortcut_signal


def _attention(**kw):
    base = dict(peak_y=0.5, peak_x=0.5, entropy=0.5, border_mass=0.1, box_mass=0.9, box_area=0.16,
                box_concentration=0.9 / 0.16, peak_in_box=True)
    return {**base, **kw}


def test_cells_are_ninths_row_major():
    assert cell_of(0.05, 0.05) == 0 and cell_of(0.5, 0.5) == 4 and cell_of(0.99, 0.99) == 8
    assert cell_of(0.1, 0.9) == 2 and cell_of(1.0, 0.0) == 6 and cell_of(None, 0.3) is None


def test_image_flags_at_their_thresholds():
    right = image_flags(label=1, predicted_class=1, predicted_score=0.95, attention=_attention(), boxes=[(0.3,) * 2 + (0.7,) * 2])
    assert right == {"confident_wrong": False, "low_confidence": False, "attention_outside_box": False,
                     "attention_on_border": False, "peak_cell": 4, "box_cell": 4}
    wrong = image_flags(label=0, predicted_class=1, predicted_score=0.8, attention=_attention(), boxes=())
    assert wrong["confident_wrong"] and wrong["attention_outside_box"] is None and wrong["box_cell"] is None
    unsure = image_flags(label=0, predicted_class=1, predicted_score=0.49, attention=_attention(), boxes=())
    assert unsure["low_confidence"] and not unsure["confident_wrong"]
    assert image_flags(label=None, predicted_class=1, predicted_score=0.9, attention=_attention())["confident_wrong"] is None
    off = image_flags(label=1, predicted_class=1, predicted_score=0.9, boxes=[(0.5, 0.5, 0.9, 0.9)],
                      attention=_attention(peak_y=0.1, peak_x=0.1, peak_in_box=False, box_mass=0.16,
                                           box_concentration=1.0, border_mass=0.6))
    assert off["attention_outside_box"] and off["attention_on_border"] and off["peak_cell"] == 0 and off["box_cell"] == 8
    # The peak missing the box is not enough when the box holds more than a flat map's share of the mass
    # (relative rule: box_concentration > 1, even with well under half the mass inside).
    near = image_flags(label=1, predicted_class=1, predicted_score=0.9, boxes=[(0.5, 0.5, 0.9, 0.9)],
                       attention=_attention(peak_in_box=False, box_mass=0.17, box_concentration=0.17 / 0.16))
    assert near["attention_outside_box"] is False
    empty = image_flags(label=1, predicted_class=1, predicted_score=0.9, boxes=[(0.5, 0.5, 0.9, 0.9)],
                        attention=dict.fromkeys(_attention()))
    assert empty["attention_outside_box"] is None and empty["attention_on_border"] is None and empty["peak_cell"] is None


def test_shortcut_signal():
    corner = np.array([8, 0, 0, 0, 2, 0, 0, 0, 0])
    spread_boxes = np.array([0, 0, 0, 0, 4, 3, 0, 2, 1])
    out = shortcut_signal(corner, spread_boxes)
    assert out == {"peak_cell": 0, "peak_cell_share": 0.8, "box_cell_share": 0.0, "shortcut_score": 0.8, "shortcut": True}
    # Peaks where the objects are: no shortcut.
    assert not shortcut_signal(np.array([0, 0, 0, 0, 9, 1, 0, 0, 0]), np.array([0, 0, 0, 0, 8, 2, 0, 0, 0]))["shortcut"]
    # Too few images.
    assert not shortcut_signal(np.array([5, 0, 0, 0, 0, 0, 0, 0, 0]), spread_boxes)["shortcut"]
    # Without boxes: a corner counts, the centre never does.
    assert shortcut_signal(corner, np.zeros(9))["shortcut"]
    assert not shortcut_signal(np.array([0, 0, 0, 0, 10, 0, 0, 0, 0]), np.zeros(9))["shortcut"]
    assert shortcut_signal(np.zeros(9), np.zeros(9))["peak_cell"] is None
    strict = FlagThresholds(shortcut_peak_share=0.9)
    assert not shortcut_signal(corner, spread_boxes, strict)["shortcut"]


def _row(i: int, label: int, predicted: int, score: float, peak_cell: int, box_cell: int) -> dict:
    y, x = (peak_cell // 3 + 0.5) / 3, (peak_cell % 3 + 0.5) / 3
    return {
        "label": label, "predicted_class": predicted, "predicted_score": score, "target_rank": 0,
        "target_class": predicted, "target_score": score, "cam": [1.0, 0.0, 0.0, 0.0], "cam_max": 1.0,
        "cam_height": 2, "cam_width": 2, "peak_y": y, "peak_x": x, "entropy": 0.0, "border_mass": 0.7,
        "box_mass": 0.1, "peak_in_box": False,
        **image_flags(label=label, predicted_class=predicted, predicted_score=score,
                      attention={"peak_y": y, "peak_x": x, "border_mass": 0.7, "box_mass": 0.1,
                                 "box_concentration": 0.9, "peak_in_box": False},
                      boxes=[((box_cell // 3) / 3, (box_cell % 3) / 3, (box_cell // 3 + 1) / 3, (box_cell % 3 + 1) / 3)]),
    }


def test_class_stats_flag_columns_merge_the_same_three_ways():
    rows = [_row(i, label=i % 2, predicted=1, score=0.3 + 0.05 * i, peak_cell=0 if i % 4 else 4, box_cell=4 + i % 5)
            for i in range(14)]
    contributions = [c for r in rows for k, c in class_contributions(r) if k == 1]
    fn = ClassStatsFn()

    def feed(items):
        acc = fn.create_accumulator()
        for item in items:
            acc = fn.add_input(acc, item)
        return acc

    one = fn.extract_output(feed(contributions))
    merged = fn.extract_output(fn.compact(fn.merge_accumulators([feed(contributions[i::3]) for i in range(3)])))
    assert one.keys() == merged.keys()
    for key in ("share_confident_wrong", "share_low_confidence", "share_attention_outside_box",
                "share_attention_on_border", "share_flagged", "peak_cell", "peak_cell_share", "box_cell_share",
                "shortcut_score", "shortcut"):
        assert one[key] == merged[key], key
    assert one["peak_cell"] == 0 and one["peak_cell_share"] == pytest.approx(10 / 14)
    assert one["share_attention_on_border"] == 1.0 and one["share_flagged"] == 1.0
    assert one["share_low_confidence"] == pytest.approx(sum(r["predicted_score"] < 0.5 for r in rows) / 14)
    assert one["shortcut"]


def _stats(demo_runs, run_id):
    return {r["class_id"]: r for r in read_table(demo_runs.run_dir(run_id), "class_stats").to_pylist()}


def test_the_demo_shortcut_class_and_only_it_is_flagged(demo_runs):
    stats = _stats(demo_runs, RUN_IDS[0])
    flagged = sorted(c for c, s in stats.items() if s["shortcut"])
    assert flagged == [SHORTCUT_CLASS]
    triangle = stats[SHORTCUT_CLASS]
    assert triangle["peak_cell"] == 0  # the marker's top-left ninth
    assert triangle["peak_cell_share"] >= 0.6 and triangle["box_cell_share"] == 0.0
    for cls, s in stats.items():
        if cls not in (SHORTCUT_CLASS, MOVING_SHORTCUT_CLASS):
            assert s["shortcut_score"] < 0.2, (cls, s["shortcut_score"])
    # The moving marker (a random corner per image) escapes this signal: its peaks split over four corners.
    # The strategies catch it (tests/test_strategies.py).
    moving = stats[MOVING_SHORTCUT_CLASS]
    assert not moving["shortcut"] and moving["peak_cell_share"] < 0.4
    assert demo_runs.manifests[RUN_IDS[0]]["attention"]["shortcut_classes"] == [SHORTCUT_CLASS]
    # The control model (the markers on every class alike) has no shortcut.
    assert not any(s["shortcut"] for s in _stats(demo_runs, RUN_IDS[1]).values())


def test_heatmap_flag_columns(demo_runs):
    rows = read_table(demo_runs.run_dir(RUN_IDS[0]), "heatmaps").to_pylist()
    for r in rows:
        assert r["peak_cell"] is not None or r["peak_y"] is None
        assert r["box_cell"] is not None  # every demo image has a box
        if r["attention_outside_box"]:
            assert not r["peak_in_box"] and r["box_concentration"] <= 1.0
        assert r["confident_wrong"] == (r["predicted_class"] != r["label"] and r["predicted_score"] >= 0.8)
    stats = _stats(demo_runs, RUN_IDS[0])
    for flag in IMAGE_FLAGS:
        assert all(s[f"share_{flag}"] is not None for s in stats.values())
    # The fixed marker draws most of the triangle maps' mass to the top-left corner on many images, which the
    # relative rule (peak off the box AND no more mass on it than a flat map) flags; the object-bound class
    # (circle) is never so flagged. The moving-marker class's peaks miss its boxes too (the pointing game
    # below), but its maps keep some mass on the object, so this per-image flag rarely fires there: its
    # strategies catch it (tests/test_strategies.py). Shares seen over bench/demo_seeds.py's 10 models:
    # circle 0.00-0.01, triangle 0.10-0.58, cross 0.03-0.20.
    shares = {cls: sum(bool(r["attention_outside_box"]) for r in rows if r["target_class"] == cls)
              / sum(1 for r in rows if r["target_class"] == cls) for cls in stats}
    for cls, share in shares.items():
        assert share == pytest.approx(stats[cls]["share_attention_outside_box"])
    assert shares[0] <= 0.05 and shares[SHORTCUT_CLASS] > shares[0], shares


def test_pointing_game_of_the_demo_model(demo_runs):
    """Pointing game (CAM peak within 15 px of the object's box, Zhang et al.), rank-0 rows.

    What every model that learnt the markers shows (bench/demo_seeds.py, 5 seeds x oneDNN on/off): the two
    shortcut classes look at their markers (a corner, never within 15 px of a box), so each points at its
    boxes on at most half of its images (seen 0.03-0.39); the clean classes look at their objects, each
    pointing at least 0.15 better than either shortcut class (circle 0.95-1.00, square 0.60-0.96, the
    class the model predicts when it sees neither a marker nor a circle). Overall that is ~0.55 (seen
    0.50-0.61): [0.45, 0.7]. A random peak would land in a box of 8-19% of the image area. Without the
    shortcuts (same shards, the control model: markers on every class alike) the pointing game rises by at least 0.15.
    """
    manifest = demo_runs.manifests[RUN_IDS[0]]
    overall = manifest["attention"]["pointing_accuracy"]
    assert 0.45 <= overall <= 0.7, overall
    stats = _stats(demo_runs, RUN_IDS[0])
    shortcut = [stats[cls]["pointing_accuracy"] for cls in (SHORTCUT_CLASS, MOVING_SHORTCUT_CLASS)]
    clean = [s["pointing_accuracy"] for cls, s in stats.items() if cls not in (SHORTCUT_CLASS, MOVING_SHORTCUT_CLASS)]
    assert max(shortcut) <= 0.5 and min(clean) >= max(shortcut) + 0.15, (clean, shortcut)
    assert demo_runs.manifests[RUN_IDS[1]]["attention"]["pointing_accuracy"] >= overall + 0.15
