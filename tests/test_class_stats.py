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


def random_heatmap_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of every HEATMAP_SCHEMA column with what varies in a job: missing labels, wrong and right
    predictions, topk ranks, maps without mass, null statistics and flags, boxes or none, a few rows
    with faithfulness scores and curves."""
    from transforms.flags import IMAGE_FLAGS
    from transforms.schemas import HEATMAP_SCHEMA

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cam = (rng.uniform(0, 1, (3, 4)) * (rng.uniform() > 0.1)).astype(np.float32)
        has_box, mass = bool(rng.uniform() < 0.6), bool(cam.max() > 0)
        row = dict.fromkeys(HEATMAP_SCHEMA.names)
        row.update(
            image_id=f"im-{i}", source="s.tfrecord", record_index=i, record_offset=i * 100,
            label=None if rng.uniform() < 0.2 else int(rng.integers(5)), predicted_class=int(rng.integers(5)),
            predicted_score=float(rng.uniform()), target_rank=int(rng.uniform() < 0.3),
            target_class=int(rng.integers(5)), target_score=float(rng.uniform()), target_logit=0.0,
            method="gradcam", target_layer="conv", cam=cam.ravel().tolist(), cam_height=3, cam_width=4,
            cam_max=float(cam.max()), num_boxes=int(has_box), image_height=30, image_width=40,
            peak_cell=int(rng.integers(9)) if mass else None, box_cell=int(rng.integers(9)) if has_box else None,
        )
        if mass:
            row.update(peak_y=float(rng.uniform()), peak_x=float(rng.uniform()), entropy=float(rng.uniform()),
                       border_mass=float(rng.uniform()))
            if has_box:
                row.update(box_mass=float(rng.uniform()), box_area=0.3, box_concentration=float(rng.uniform(0, 3)),
                           peak_in_box=bool(rng.uniform() < 0.5))
        for flag in IMAGE_FLAGS:
            row[flag] = None if rng.uniform() < 0.3 else bool(rng.uniform() < 0.4)
        if row["target_rank"] == 0 and rng.uniform() < 0.1:
            row.update(faithfulness_morf=float(rng.uniform()), faithfulness_lerf=float(rng.uniform()),
                       faithfulness_random=float(rng.uniform()), faithfulness_gap=float(rng.uniform(-1, 1)),
                       **{key: rng.uniform(0, 1, 5).tolist() for key in ("deletion_morf", "deletion_lerf",
                                                                        "deletion_random")})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=HEATMAP_SCHEMA).to_pylist()  # values as the table holds them


@pytest.mark.parametrize("same_map_size", [True, False])
def test_batch_partials_equal_adding_each_row(same_map_size):
    """`batch_accumulators` (numpy over an Arrow batch, as the job computes class statistics) against
    each row's contributions added one by one: every output column equal (counts, confusions, cells
    exactly; sums within 1e-12 relative), for a batch of one map size and one of mixed sizes (row by row)."""
    from transforms.class_stats import batch_accumulators
    from transforms.schemas import HEATMAP_SCHEMA

    rows = random_heatmap_rows(300)
    if not same_map_size:
        rows[7].update(cam=[1.0, 0.5], cam_height=1, cam_width=2, cam_max=1.0)
    fn = ClassStatsFn()
    by_row: dict = {}
    for r in rows:
        for cls, c in class_contributions(r):
            by_row[cls] = fn.add_input(by_row.get(cls, fn.create_accumulator()), c)
    batches = [pa.RecordBatch.from_pylist(rows[i : i + 128], schema=HEATMAP_SCHEMA) for i in range(0, 300, 128)]
    by_batch: dict = {}
    for batch in batches:
        for cls, part in batch_accumulators(batch):
            by_batch[cls] = fn.add_input(by_batch.get(cls, fn.create_accumulator()), part)
    assert set(by_batch) == set(by_row) == set(range(5))
    sampled = 0
    for cls in by_row:
        want, got = fn.extract_output(by_row[cls]), fn.extract_output(by_batch[cls])
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-12), (cls, key)
            elif isinstance(value, list) and value and isinstance(value[0], float):
                np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=f"{cls} {key}")  # float32 means
            else:
                assert got[key] == value, (cls, key)
        sampled += want["num_faithfulness"]
        assert want["num_labelled"] and want["top_confusions"] and want["mean_cam"] is not None
    assert sampled >= 5  # the faithfulness rows were met


def test_in_a_pipeline_batches_give_the_rows_statistics():
    """ComputeClassStats over Arrow batches of rows (the job's input to it) gives each class the
    counts it gives over the rows themselves."""
    from transforms.schemas import HEATMAP_SCHEMA
    from transforms.sinks import ToRecordBatches

    rows = random_heatmap_rows(200, seed=1)

    def counts(row):
        return (row["class_id"], row["num_labelled"], row["num_predicted"], row["num_targeted"], row["num_correct"],
                round(row["share_flagged"], 9))

    with TestPipeline() as p:
        source = p | beam.Create(rows)
        from_rows = source | "FromRows" >> ComputeClassStats() | "RowCounts" >> beam.Map(counts)
        from_batches = (source | ToRecordBatches(HEATMAP_SCHEMA, 64) | "FromBatches" >> ComputeClassStats()
                        | "BatchCounts" >> beam.Map(counts))
        expected = [counts(r) for r in _class_rows(rows)]
        assert_that(from_rows, equal_to(expected), label="Rows")
        assert_that(from_batches, equal_to(expected), label="Batches")


def _class_rows(rows):
    fn = ClassStatsFn()
    accs: dict = {}
    for r in rows:
        for cls, c in class_contributions(r):
            accs[cls] = fn.add_input(accs.get(cls, fn.create_accumulator()), c)
    return [{"class_id": cls, **fn.extract_output(acc)} for cls, acc in accs.items()]
