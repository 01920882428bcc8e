"""What finding strategies (SpRAy) costs: clustering bounded samples of maps, per class.

    python -m bench.strategies [--classes 100] [--maps 1000] [--shape 7x7] [--json PATH]

The job clusters at most --strategy_sample_size (default 1000) maps per
class (`transforms.strategies.strategies_of`: k-nearest-neighbour graph,
eigenvalues of its Laplacian, spectral clustering), so the cost depends on
the number of classes, not on the dataset's size. This measures that step
alone on synthetic map sets (three groups of jittered blobs per class plus
noise, max-normalised, like a class with three strategies), class after
class in one process: total seconds and seconds per class, and the time to
assign a row to its nearest cluster mean (`AssignStrategies` over Arrow
batches of 512 rows, as in the job: the per-row cost).
Results go to bench/results/strategies.json.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def synthetic_class(maps: int, shape: tuple[int, int], seed: int, groups: int = 3) -> list:
    """(shape, max-normalised map) items of one class with `groups` strategies."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    centres = rng.uniform(0, 1, (groups, 2)) * (h - 1, w - 1)
    items = []
    for i in range(maps):
        cy, cx = centres[i % groups] + rng.normal(0, 0.1 * h, 2)
        m = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.15 * h) ** 2)) + rng.uniform(0, 0.3, shape)
        items.append((shape, (m / m.max()).ravel().astype(np.float32)))
    return items


def assign_microseconds(model, shape: tuple[int, int], seed: int, rows: int = 512, repeats: int = 20) -> float:
    """Per-row microseconds of `AssignStrategies` over Arrow batches of `rows` rows of one class (as
    the job assigns them: cluster ids, members summed per cluster, exemplar candidates), median of repeats."""
    import pyarrow as pa

    from transforms.schemas import HEATMAP_SCHEMA
    from transforms.strategies import ASSIGN_COLUMNS, AssignStrategies

    schema = pa.schema([HEATMAP_SCHEMA.field(name) for name in ASSIGN_COLUMNS])
    batch = pa.RecordBatch.from_pylist(
        [{"image_id": f"im-{i}", "target_class": 0, "cam": v.tolist(), "cam_height": shape[0], "cam_width": shape[1],
          "cam_max": 1.0, "box_concentration": 1.0, "border_mass": 0.2, "peak_cell": i % 9}
         for i, (_, v) in enumerate(synthetic_class(rows, shape, seed=seed))], schema=schema)
    assign, models = AssignStrategies(), {0: model}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in assign.process(batch, models):
            pass
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / rows * 1e6


def measure(classes: int = 100, maps: int = 1000, shape: tuple[int, int] = (7, 7)) -> dict:
    """Seconds to find the strategies of `classes` classes of `maps` maps each."""
    from transforms.strategies import strategies_of

    strategies_of(synthetic_class(200, shape, seed=-1 % 2**32))  # warm-up: imports, first calls
    seconds, found = [], []
    model = None
    for c in range(classes):
        items = synthetic_class(maps, shape, seed=c)
        t0 = time.perf_counter()
        model = strategies_of(items)
        seconds.append(time.perf_counter() - t0)
        found.append(len(model.means))
    assign_us = assign_microseconds(model, shape, seed=classes)
    return {
        "classes": classes, "maps_per_class": maps, "shape": list(shape),
        "total_seconds": float(sum(seconds)), "seconds_per_class_median": float(np.median(seconds)),
        "seconds_per_class_max": float(max(seconds)), "strategies_found": dict(zip(*np.unique(found, return_counts=True),
                                                                                  strict=True)),
        "assign_microseconds_per_row": assign_us,
    }


def main(argv=None) -> dict:
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--shape", default="7x7", help="map size HxW (7x7: ResNet50 at 224; 16x16: the demo)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "strategies.json"))
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    result = measure(args.classes, args.maps, shape)
    result["strategies_found"] = {str(k): int(v) for k, v in result["strategies_found"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{result['classes']} classes x {result['maps_per_class']} maps of {args.shape}: "
          f"{result['total_seconds']:.1f} s ({result['seconds_per_class_median']:.2f} s per class, "
          f"max {result['seconds_per_class_max']:.2f}); assigning a row: "
          f"{result['assign_microseconds_per_row']:.0f} us; strategies found {result['strategies_found']}")
    return result


if __name__ == "__main__":
    main()
