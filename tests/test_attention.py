"""Localisation on the map as users see it: upsampling, peak, concentration, pointing game, the relative flag."""

import numpy as np
import pytest

from transforms.attention import attention_stats, grid_shape, upsample
from transforms.flags import FlagThresholds, image_flags


def test_upsampling_matches_tensorflow_bilinear_resize():
    """Reference: tf.image.resize (bilinear, half-pixel centres, no antialias), what CAM tools display."""
    import tensorflow as tf

    cam = np.random.default_rng(0).uniform(0, 1, (7, 5))
    ours = upsample(cam, 157, 224)
    ref = tf.image.resize(cam[None, :, :, None], (157, 224), method="bilinear", antialias=False)[0, :, :, 0]
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_grid_keeps_the_image_aspect_capped_for_cost():
    assert grid_shape(480, 640) == (168, 224)
    assert grid_shape(100, 60) == (100, 60)  # small images: their own size
    assert grid_shape(1000, 250) == (224, 56)


def test_known_peak_and_box_on_a_non_square_image():
    """A 7x7 map whose hottest cell is (3, 4), on a 480x640 image: the peak is that cell's centre."""
    cam = np.zeros((7, 7))
    cam[3, 4] = 1.0
    cam[3, 5] = 0.5
    stats = attention_stats(cam, [(0.3, 0.5, 0.7, 0.8)], image_size=(480, 640))
    h, w = grid_shape(480, 640)
    assert stats["peak_y"] == pytest.approx(3.5 / 7, abs=1 / h)
    assert stats["peak_x"] == pytest.approx(4.5 / 7, abs=1 / w)
    assert stats["peak_in_box"] is True
    # Box mass from the upsampled map (tf reference), area and concentration on the same grid.
    up = upsample(cam, h, w)
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    inside = np.outer((ys >= 0.3) & (ys <= 0.7), (xs >= 0.5) & (xs <= 0.8))
    assert stats["box_mass"] == pytest.approx(up[inside].sum() / up.sum(), rel=1e-6)
    assert stats["box_area"] == pytest.approx(0.4 * 0.3, abs=0.01)
    assert stats["box_concentration"] == pytest.approx(stats["box_mass"] / stats["box_area"], rel=1e-6)
    assert stats["box_concentration"] > 5


def test_a_flat_map_has_concentration_one_and_the_border_band_share():
    stats = attention_stats(np.ones((5, 5)), [(0.2, 0.2, 0.6, 0.5)], image_size=(224, 224))
    assert stats["box_concentration"] == pytest.approx(1.0, abs=1e-9)
    assert stats["border_mass"] == pytest.approx(1 - 0.75**2, abs=0.01)  # the 12.5% band is 43.75% of the image
    assert stats["entropy"] == pytest.approx(1.0)


def test_pointing_game_tolerance_is_15_pixels_at_the_image_resolution():
    """Peak at the centre of cell (2, 2) of 5x5 on a 600x800 image: (300, 400) px. Box 10 px / 20 px right of it."""
    cam = np.zeros((5, 5))
    cam[2, 2] = 1.0
    near = (0.4, (400 + 10) / 800, 0.6, 0.9)
    far = (0.4, (400 + 20) / 800, 0.6, 0.9)
    assert attention_stats(cam, [near], image_size=(600, 800))["peak_in_box"] is True
    assert attention_stats(cam, [far], image_size=(600, 800))["peak_in_box"] is False
    assert attention_stats(cam, [near], image_size=(600, 800), tolerance_px=5)["peak_in_box"] is False
    assert attention_stats(cam, [far], image_size=(600, 800), tolerance_px=25)["peak_in_box"] is True


def test_outside_box_is_relative_to_the_objects_size():
    """The issue's dog: 39% of the mass on 13% of the image, peak just beside the box -> not flagged."""
    boxes = [(0.5, 0.5, 0.9, 0.825)]  # 13% of the image
    attention = dict(peak_y=0.3, peak_x=0.3, border_mass=0.3, box_mass=0.39, box_area=0.13,
                     box_concentration=3.0, peak_in_box=False)
    flags = image_flags(label=1, predicted_class=1, predicted_score=0.9, attention=attention, boxes=boxes)
    assert flags["attention_outside_box"] is False
    flat = {**attention, "box_mass": 0.13, "box_concentration": 1.0}
    assert image_flags(label=1, predicted_class=1, predicted_score=0.9, attention=flat, boxes=boxes)[
        "attention_outside_box"] is True
    # The threshold is an option.
    strict = FlagThresholds(outside_box_concentration=3.5)
    assert image_flags(label=1, predicted_class=1, predicted_score=0.9, attention=attention, boxes=boxes,
                       thresholds=strict)["attention_outside_box"] is True
    # A peak inside the box (within tolerance) never flags.
    hit = {**flat, "peak_in_box": True}
    assert image_flags(label=1, predicted_class=1, predicted_score=0.9, attention=hit, boxes=boxes)[
        "attention_outside_box"] is False


def test_empty_map_gives_no_statistics():
    stats = attention_stats(np.zeros((4, 4)), [(0.1, 0.1, 0.5, 0.5)], image_size=(64, 64))
    assert all(v is None for v in stats.values())


def _grid_reference(cam, boxes, image_size):
    """The statistics read off the whole upsampled grid, pixel by pixel (what the module avoids building)."""
    h, w = grid_shape(*image_size)
    up = np.maximum(upsample(cam, h, w), 0.0)
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w

    def mask(box):
        return np.outer((ys >= box[0]) & (ys <= box[2]), (xs >= box[1]) & (xs <= box[3]))

    row, col = np.unravel_index(np.argmax(up), up.shape)
    out = {"peak_value": up[row, col], "up": up, "grid": (h, w),
           "border_mass": 1.0 - up[mask((0.125, 0.125, 0.875, 0.875))].sum() / up.sum()}
    if boxes:
        union = np.logical_or.reduce([mask(b) for b in boxes])
        out.update(box_mass=up[union].sum() / up.sum(), box_area=union.mean())
    return out


def test_statistics_equal_the_full_grid_on_random_maps():
    """Random maps (sparse, tied, signed, 1xN), image sizes and 0-3 boxes: the masses equal the full
    grid's within 1e-12 and the peak is a maximum of the grid (ties within 1e-12 may pick another)."""
    rng = np.random.default_rng(1)
    for trial in range(600):
        h, w = (int(v) for v in rng.integers(1, 15, 2))
        cam = rng.uniform(0, 1, (h, w)) ** rng.choice([1.0, 4.0, 0.2])
        if trial % 7 == 0:
            cam[rng.uniform(size=cam.shape) < 0.5] = 0.0
        if trial % 11 == 0:
            cam = np.round(cam * 3) / 3  # many ties
        if trial % 13 == 0:
            cam = cam - 0.3  # a signed map: clipped after upsampling
        size = tuple(int(v) for v in rng.integers(20, 1200, 2))
        boxes = []
        for _ in range(trial % 4):
            y, x = np.sort(rng.uniform(0, 1, 2)), np.sort(rng.uniform(0, 1, 2))
            boxes.append((y[0], x[0], y[1], x[1]))
        if not cam.sum() > 0:  # no mass: every statistic is None (test_empty_map_gives_no_statistics)
            assert attention_stats(cam, boxes, image_size=size)["peak_y"] is None
            continue
        stats = attention_stats(cam, boxes, image_size=size)
        ref = _grid_reference(cam, boxes, size)
        gh, gw = ref["grid"]
        row, col = round(stats["peak_y"] * gh - 0.5), round(stats["peak_x"] * gw - 0.5)
        assert ref["up"][row, col] == pytest.approx(ref["peak_value"], rel=1e-12, abs=1e-15), trial
        assert stats["border_mass"] == pytest.approx(ref["border_mass"], abs=1e-12), trial
        if boxes:
            assert stats["box_mass"] == pytest.approx(ref["box_mass"], abs=1e-12), trial
            assert stats["box_area"] == pytest.approx(ref["box_area"], abs=1e-12), trial


def test_batch_statistics_equal_each_map_on_its_own():
    """`attention_batch` (the explaining step's whole-batch numpy) against `attention_stats` map by map:
    batches of one map size, images of a few shared sizes and of their own, 0-3 boxes, maps without
    mass, signed maps and many ties. Every statistic within 1e-12 of the single map's (None where it
    is None); the peak the same pixel, or with ties one whose upsampled value equals the maximum
    within 1e-12 (the full grid's, `_grid_reference`)."""
    from transforms.attention import GEOMETRY_KEYS, attention_batch

    rng = np.random.default_rng(2)
    shared_sizes = [(375, 500), (333, 500), (500, 375), (100, 60)]
    checked = {"peak": 0, "box": 0, "none": 0}
    for trial in range(40):
        n, h, w = int(rng.integers(1, 40)), *(int(v) for v in rng.integers(1, 12, 2))
        cams = rng.uniform(0, 1, (n, h, w)) ** rng.choice([1.0, 4.0, 0.2])
        cams[rng.uniform(size=n) < 0.1] = 0.0  # no mass
        cams[rng.uniform(size=n) < 0.1] -= 0.3  # signed
        if trial % 5 == 0:
            cams = np.round(cams * 3) / 3  # ties
        sizes = [shared_sizes[int(rng.integers(4))] if rng.uniform() < 0.7
                 else tuple(int(v) for v in rng.integers(20, 1200, 2)) for _ in range(n)]
        boxes = []
        for _ in range(n):
            image_boxes = []
            for _ in range(int(rng.choice(4, p=[0.3, 0.5, 0.1, 0.1]))):
                y, x = np.sort(rng.uniform(0, 1, 2)), np.sort(rng.uniform(0, 1, 2))
                image_boxes.append((float(y[0]), float(x[0]), float(y[1]), float(x[1])))
            boxes.append(tuple(image_boxes))
        batch = attention_batch(cams.astype(np.float32), sizes, boxes)
        assert len(batch) == n
        for i in range(n):
            single = attention_stats(cams[i].astype(np.float32), boxes[i], image_size=sizes[i])
            assert set(batch[i]) == set(GEOMETRY_KEYS), (trial, i)
            for key in GEOMETRY_KEYS:
                if single[key] is None:
                    assert batch[i][key] is None, (trial, i, key)
                    checked["none"] += 1
                elif key in ("peak_y", "peak_x") and batch[i][key] != single[key]:
                    ref = _grid_reference(cams[i].astype(np.float32).astype(np.float64), boxes[i], sizes[i])
                    gh, gw = ref["grid"]
                    row, col = round(batch[i]["peak_y"] * gh - 0.5), round(batch[i]["peak_x"] * gw - 0.5)
                    assert ref["up"][row, col] == pytest.approx(ref["peak_value"], rel=1e-12), (trial, i)
                else:
                    assert batch[i][key] == pytest.approx(single[key], rel=1e-12, abs=1e-12), (trial, i, key)
            checked["peak"] += single["peak_y"] is not None
            checked["box"] += single["box_mass"] is not None
    assert min(checked.values()) > 50, checked  # every kind of case was met


def test_pointing_game_on_batch_statistics_equals_attention_stats():
    from transforms.attention import attention_batch, pointing_game

    cam = np.zeros((1, 5, 5), np.float32)
    cam[0, 2, 2] = 1.0
    for box, tolerance in [((0.4, 0.5125, 0.6, 0.9), 15.0), ((0.4, 0.525, 0.6, 0.9), 15.0),
                           ((0.4, 0.525, 0.6, 0.9), 25.0)]:
        stats = attention_batch(cam, [(600, 800)], [(box,)])[0]
        expected = attention_stats(cam[0], [box], image_size=(600, 800), tolerance_px=tolerance)["peak_in_box"]
        assert pointing_game(stats, [box], (600, 800), tolerance) is expected
    assert pointing_game(attention_batch(cam, [(600, 800)], [()])[0], [], (600, 800)) is None
    assert pointing_game(attention_batch(cam * 0, [(600, 800)], [((0.1, 0.1, 0.2, 0.2),)])[0],
                         [(0.1, 0.1, 0.2, 0.2)], (600, 800)) is None
