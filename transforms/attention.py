"""Where a CAM puts its mass: per-image attention statistics (numpy).

The statistics are read off the map *as users see it*: CAM tools
(pytorch-grad-cam, tf-keras-vis, the keras.io example) show a map upsampled
bilinearly to the image, not its coarse cells. So the map (h x w cells at
the layer's resolution) is first upsampled bilinearly, with half-pixel
centres and clamped edges (what `cv2.resize`, `PIL` and `tf.image.resize`
do), to a grid of the image's own aspect ratio: the image's size, scaled
down so its longer side is at most `MAX_GRID_SIDE` (224) pixels. Peak, border
mass and box mass are those of that grid; the pointing game is played at the
image's own resolution with the tolerance of Zhang et al. 2016 (15 px).

The grid is rarely built: for a non-negative map every mass on it is a
weighted sum of the map's cells (`_band_weights`), and its first maximum lies
on one of ~2h x 2w candidate pixels (`upsampled_peak`), so one image's
statistics cost ~60 us instead of ~0.3-1 ms (the grid's 300 kB temporaries).

Entropy stays on the layer's cells (0 = one cell, 1 = uniform): upsampling
would only smooth it.

The map maths other modules share lives here too: `upsample` (the bilinear
resize; `pipeline.runs.compare` resamples maps of two runs with it) and
`correlation` (of two maps; the comparison and the strategies' rule).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np

BORDER_FRACTION = 0.125  # the band along each edge that counts as "border"
MAX_GRID_SIDE = 224  # longest side of the upsampled grid (pixels)
POINTING_TOLERANCE_PX = 15.0  # Zhang et al. 2016, "Top-down neural attention by excitation backprop"

STAT_KEYS = ("peak_y", "peak_x", "entropy", "border_mass", "box_mass", "box_area", "box_concentration",
             "peak_in_box")


@functools.lru_cache(maxsize=256)
def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation, half-pixel centres, edges clamped.

    Cached (read-only): the maps of a job have one size and its images a few."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), lo] += 1.0 - frac
    weights[np.arange(n_out), hi] += frac
    weights.flags.writeable = False
    return weights


def grid_shape(image_height: int, image_width: int, max_side: int = MAX_GRID_SIDE) -> tuple[int, int]:
    """The upsampled grid: the image's size, scaled so its longer side is at most max_side."""
    scale = min(1.0, max_side / max(image_height, image_width, 1))
    return max(1, round(image_height * scale)), max(1, round(image_width * scale))


def upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of cam[h, w] to [height, width] (half-pixel centres, as image resizers do)."""
    cam = np.asarray(cam, np.float64)
    return _interpolation_matrix(cam.shape[0], height) @ cam @ _interpolation_matrix(cam.shape[1], width).T


def correlation(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Pearson correlation of two maps of one shape (as flat vectors); None when either is constant."""
    a, b = np.ravel(a), np.ravel(b)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def box_mask(height: int, width: int, boxes: Sequence) -> np.ndarray:
    """[height, width] bool: pixels whose centre lies inside any box (fractions ymin, xmin, ymax, xmax)."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    mask = np.zeros((height, width), bool)
    for ymin, xmin, ymax, xmax in boxes:
        mask |= np.outer((ys >= ymin) & (ys <= ymax), (xs >= xmin) & (xs <= xmax))
    return mask


def distance_to_box_px(y: float, x: float, box, image_height: int, image_width: int) -> float:
    """Distance in image pixels from point (y, x) (fractions) to a box (0 inside it)."""
    ymin, xmin, ymax, xmax = box
    dy = max(ymin - y, 0.0, y - ymax) * image_height
    dx = max(xmin - x, 0.0, x - xmax) * image_width
    return math.hypot(dy, dx)


@functools.lru_cache(maxsize=1024)
def _band_weights(n_in: int, n_out: int, lo: float, hi: float) -> np.ndarray:
    """[n_in]: the interpolation weights summed over the output pixels whose centres lie in [lo, hi]
    (fractions), so that `band_rows @ cam @ band_cols` is the upsampled map's mass in a box."""
    centres = (np.arange(n_out) + 0.5) / n_out
    weights = _interpolation_matrix(n_in, n_out)[(centres >= lo) & (centres <= hi)].sum(axis=0)
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=256)
def _peak_candidates(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, their rows of the interpolation matrix): the output samples that can hold the first
    maximum of a 1-D linear upsampling, i.e. the first and last sample between each pair of input
    centres (the samples in between lie on a line, so they never beat both ends; ties go to the
    first, as `np.argmax` does)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    segment = np.floor(pos).astype(int)
    starts = np.flatnonzero(np.diff(segment, prepend=-1))
    ends = np.append(starts[1:] - 1, n_out - 1)
    candidates = np.unique(np.concatenate([starts, ends]))
    weights = _interpolation_matrix(n_in, n_out)[candidates]
    candidates.flags.writeable = weights.flags.writeable = False
    return candidates, weights


def upsampled_peak(cam: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """(row, col) of `np.argmax(upsample(cam, height, width))` without the full grid.

    Bilinear upsampling is linear along each axis between input centres, so the first maximum lies
    on a candidate row and a candidate column (`_peak_candidates`): ~2h x 2w values instead of
    height x width (a 7x7 map on a 168x224 grid: 14x14)."""
    rows, row_weights = _peak_candidates(cam.shape[0], height)
    cols, col_weights = _peak_candidates(cam.shape[1], width)
    values = row_weights @ cam @ col_weights.T
    r, c = divmod(int(np.argmax(values)), values.shape[1])
    return int(rows[r]), int(cols[c])


def _box_mass(cam: np.ndarray, grid_h: int, grid_w: int, box) -> float:
    """Mass of the upsampled (non-negative) map on the grid pixels whose centres lie inside box."""
    ymin, xmin, ymax, xmax = box
    return float(_band_weights(cam.shape[0], grid_h, float(ymin), float(ymax)) @ cam
                 @ _band_weights(cam.shape[1], grid_w, float(xmin), float(xmax)))


def _band_share(n: int, lo: float, hi: float) -> float:
    centres = (np.arange(n) + 0.5) / n
    return float(np.count_nonzero((centres >= lo) & (centres <= hi))) / n


def attention_stats(
    cam: np.ndarray,
    boxes: Sequence = (),
    *,
    image_size: Optional[tuple[int, int]] = None,
    tolerance_px: float = POINTING_TOLERANCE_PX,
    max_side: int = MAX_GRID_SIDE,
) -> dict[str, Optional[float]]:
    """Statistics of one map cam[h, w] (non-negative, as after a CAM's ReLU).

    Args:
      cam: the map at the layer's resolution.
      boxes: object boxes as fractions (ymin, xmin, ymax, xmax).
      image_size: (height, width) of the image in pixels; sets the grid's
        aspect and the pointing game's tolerance. Default: a square image of
        max_side pixels.
      tolerance_px: pointing-game tolerance in image pixels.
      max_side: longest side of the upsampled grid.

    Returns:
      peak_y, peak_x: the hottest pixel of the upsampled map (its centre, as
        fractions of the image height/width).
      entropy: of the normalised map at layer resolution, divided by
        log(h * w) (0 = one cell, 1 = uniform).
      border_mass: share of the upsampled map's mass within BORDER_FRACTION of
        an edge.
      box_mass: share of its mass inside the union of the boxes.
      box_area: share of the image inside the union of the boxes.
      box_concentration: box_mass / box_area (1 = no more mass on the objects
        than a flat map puts there).
      peak_in_box: pointing game: the peak lies within tolerance_px (image
        pixels) of a box.
      The box statistics are None without boxes; all statistics are None
      when the map has no mass (e.g. all zeros after the ReLU).
    """
    cam = np.asarray(cam, np.float64)
    height, width = cam.shape
    total = float(cam.sum())
    result: dict = dict.fromkeys(STAT_KEYS)
    if not total > 0.0 or not math.isfinite(total):
        return result
    image_h, image_w = image_size if image_size else (max_side, max_side)
    grid_h, grid_w = grid_shape(image_h, image_w, max_side)
    cells = cam / total
    nonzero = cells[cells > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / math.log(height * width)) if height * width > 1 else 0.0
    inner = (BORDER_FRACTION,) * 2 + (1 - BORDER_FRACTION,) * 2
    if float(cam.min()) >= 0.0:
        # Non-negative cells upsample to non-negative pixels: every mass is a weighted sum of the
        # cells (`_box_mass`) and the peak needs ~2h x 2w values, not the whole grid.
        row, col = upsampled_peak(cam, grid_h, grid_w)
        up_total = _box_mass(cam, grid_h, grid_w, (0.0, 0.0, 1.0, 1.0))
        border_mass = 1.0 - _box_mass(cam, grid_h, grid_w, inner) / up_total
        if len(boxes) == 1:
            ymin, xmin, ymax, xmax = boxes[0]
            mass = _box_mass(cam, grid_h, grid_w, boxes[0]) / up_total
            area = _band_share(grid_h, ymin, ymax) * _band_share(grid_w, xmin, xmax)
        elif boxes:
            up = upsample(cam, grid_h, grid_w)
            union = box_mask(grid_h, grid_w, boxes)
            area, mass = float(union.mean()), float(up[union].sum() / up_total)
    else:  # a signed map: clip the upsampled grid, as users see it
        up = np.maximum(upsample(cam, grid_h, grid_w), 0.0)
        up_total = float(up.sum())
        p = up / up_total
        row, col = np.unravel_index(int(np.argmax(up)), up.shape)
        border_mass = float(1.0 - p[box_mask(grid_h, grid_w, [inner])].sum())
        if boxes:
            union = box_mask(grid_h, grid_w, boxes)
            area, mass = float(union.mean()), float(p[union].sum())
    peak_y, peak_x = (row + 0.5) / grid_h, (col + 0.5) / grid_w
    result.update(peak_y=float(peak_y), peak_x=float(peak_x), entropy=entropy, border_mass=float(border_mass))
    if boxes:
        result.update(
            box_mass=float(mass),
            box_area=float(area),
            box_concentration=float(mass) / area if area > 0 else None,
            peak_in_box=pointing_game(result, boxes, (image_h, image_w), tolerance_px),
        )
    return result


GEOMETRY_KEYS = tuple(key for key in STAT_KEYS if key != "peak_in_box")


def pointing_game(stats: dict, boxes: Sequence, image_size: tuple[int, int],
                  tolerance_px: float = POINTING_TOLERANCE_PX) -> Optional[bool]:
    """`peak_in_box` from a map's peak (`stats`' peak_y, peak_x): within tolerance_px of a box at the
    image's resolution; None without boxes or without a peak (no mass)."""
    if not boxes or stats.get("peak_y") is None:
        return None
    image_h, image_w = image_size
    return any(distance_to_box_px(stats["peak_y"], stats["peak_x"], b, image_h, image_w) <= tolerance_px
               for b in boxes)


def attention_batch(cams: np.ndarray, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[Sequence], *,
                    max_side: int = MAX_GRID_SIDE) -> list[dict]:
    """`attention_stats` of N maps cam[N, h, w] at once, but `peak_in_box` (which takes the
    pointing tolerance: `pointing_game`): a dict of `GEOMETRY_KEYS` per map (`attention_columns` as
    dicts, None where a statistic is null).
    """
    columns = {key: [None if null else value for value, null in zip(values.tolist(), nulls.tolist(), strict=True)]
               for key, (values, nulls) in attention_columns(cams, image_sizes, boxes, max_side=max_side).items()}
    return [{key: columns[key][i] for key in GEOMETRY_KEYS} for i in range(len(cams))]


def attention_columns(cams: np.ndarray, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[Sequence], *,
                      max_side: int = MAX_GRID_SIDE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`attention_stats` of N maps cam[N, h, w] at once, but `peak_in_box` (which takes the
    pointing tolerance: `pointing_game`), as columns: {key of `GEOMETRY_KEYS`: (values [N] float64,
    nulls [N] bool)} (a null value is NaN; a statistic `attention_stats` gives as None is null).

    The explaining step's batch of maps is one array, so the statistics are whole-array numpy: the
    entropies in one pass, and per grid size (images of one size share it) the masses and peak
    candidates as batched matrix products, single boxes too. Maps with a negative cell (clipped after
    upsampling) and images with several boxes (a union) take `attention_stats` one by one. Results
    equal `attention_stats`' within float rounding (the products are summed in another order).
    """
    cams = np.asarray(cams, np.float64)
    n, height, width = cams.shape
    out = {key: (np.full(n, np.nan), np.ones(n, bool)) for key in GEOMETRY_KEYS}
    if n == 0:
        return out
    totals = cams.sum(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        has_mass = np.isfinite(totals) & (totals > 0)
        fast = has_mass & (cams.min(axis=(1, 2)) >= 0.0)
    fast &= np.array([len(b) <= 1 for b in boxes])
    for i in np.flatnonzero(has_mass & ~fast):
        stats = attention_stats(cams[i], boxes[i], image_size=tuple(image_sizes[i]), max_side=max_side)
        for key in GEOMETRY_KEYS:
            if stats[key] is not None:
                out[key][0][i], out[key][1][i] = stats[key], False
    index = np.flatnonzero(fast)
    if not len(index):
        return out
    cells = cams[index] / totals[index, None, None]
    logs = np.log(np.where(cells > 0, cells, 1.0))
    columns = {key: np.full(len(index), np.nan) for key in GEOMETRY_KEYS}
    if height * width > 1:
        columns["entropy"] = -(cells * logs).sum(axis=(1, 2)) / math.log(height * width)
    else:
        columns["entropy"][:] = 0.0
    sizes = np.asarray(image_sizes, np.int64)[index].reshape(-1, 2)
    scale = np.minimum(1.0, max_side / np.maximum(sizes.max(axis=1), 1))
    grids = np.maximum(1, np.rint(sizes * scale[:, None])).astype(np.int64)
    boxed = np.array([len(boxes[i]) == 1 for i in index])
    inner = (BORDER_FRACTION, 1 - BORDER_FRACTION)
    for grid_h, grid_w in sorted(set(map(tuple, grids.tolist()))):
        members = np.flatnonzero((grids[:, 0] == grid_h) & (grids[:, 1] == grid_w))
        maps = cams[index[members]]
        up_total = _masses(maps, _band_weights(height, grid_h, 0.0, 1.0), _band_weights(width, grid_w, 0.0, 1.0))
        columns["border_mass"][members] = 1.0 - _masses(
            maps, _band_weights(height, grid_h, *inner), _band_weights(width, grid_w, *inner)) / up_total
        rows, row_weights = _peak_candidates(height, grid_h)
        cols, col_weights = _peak_candidates(width, grid_w)
        values = np.matmul(np.matmul(row_weights, maps), col_weights.T).reshape(len(members), -1)
        peak_r, peak_c = np.divmod(values.argmax(axis=1), len(cols))
        columns["peak_y"][members] = (rows[peak_r] + 0.5) / grid_h
        columns["peak_x"][members] = (cols[peak_c] + 0.5) / grid_w
        with_box = boxed[members]
        if with_box.any():
            box = np.array([boxes[i][0] for i in index[members[with_box]]], np.float64).reshape(-1, 4)
            mass, area = _single_box_masses(maps[with_box], box, grid_h, grid_w)
            columns["box_mass"][members[with_box]] = mass / up_total[with_box]
            columns["box_area"][members[with_box]] = area
    with np.errstate(divide="ignore", invalid="ignore"):
        columns["box_concentration"] = np.where(columns["box_area"] > 0,
                                                columns["box_mass"] / columns["box_area"], np.nan)
    for key in GEOMETRY_KEYS:  # NaN -> null (a fast map's statistic it has no value for)
        out[key][0][index] = columns[key]
        out[key][1][index] = np.isnan(columns[key])
    return out


def _masses(maps: np.ndarray, row_weights: np.ndarray, col_weights: np.ndarray) -> np.ndarray:
    """[N]: row_weights @ map @ col_weights of each map (band weights of one box, `_band_weights`)."""
    return np.matmul(maps, col_weights) @ row_weights


def _single_box_masses(maps: np.ndarray, box: np.ndarray, grid_h: int, grid_w: int):
    """(mass, area) [M] of maps [M, h, w] with one box each [M, 4] on one grid: the upsampled map's
    mass on the grid pixels whose centres lie in the box (`_box_mass`), and their share of the grid."""
    ys, xs = (np.arange(grid_h) + 0.5) / grid_h, (np.arange(grid_w) + 0.5) / grid_w
    in_rows = (ys >= box[:, :1]) & (ys <= box[:, 2:3])  # [M, grid_h]
    in_cols = (xs >= box[:, 1:2]) & (xs <= box[:, 3:4])
    row_weights = in_rows @ _interpolation_matrix(maps.shape[1], grid_h)  # [M, h]
    col_weights = in_cols @ _interpolation_matrix(maps.shape[2], grid_w)  # [M, w]
    mass = np.einsum("mh,mhw,mw->m", row_weights, maps, col_weights)
    return mass, in_rows.mean(axis=1) * in_cols.mean(axis=1)
