"""Strategies (SpRAy): eigengap and purity on synthetic map sets, the combiner, the rule, the transform."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.schemas import CLUSTER_SCHEMA
from transforms.strategies import (
    ClusterStatsFn,
    FindStrategies,
    StrategySettings,
    cluster_maps,
    cluster_rows,
    strategies_of,
    suspicion,
)

CENTRES = [(1.0, 1.0), (1.0, 6.0), (6.0, 1.0), (6.0, 6.0), (3.5, 3.5)]


def group_maps(n: int, groups: int, seed: int, size: int = 8):
    """n max-normalised maps (flattened) of `groups` kinds: a blob near one of CENTRES, jittered, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    maps, truth = [], []
    for i in range(n):
        g = i % groups
        cy, cx = np.asarray(CENTRES[g]) + rng.normal(0, 0.7, 2)
        m = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.2**2)) + rng.uniform(0, 0.3, (size, size))
        maps.append((m / m.max()).ravel())
        truth.append(g)
    return np.asarray(maps), np.asarray(truth)


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of items in the majority true group of their cluster."""
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(labels)


@pytest.mark.parametrize("groups", [1, 2, 3, 5])
def test_eigengap_picks_the_number_of_groups_and_rows_go_to_their_group(groups):
    maps, truth = group_maps(400, groups, seed=groups)
    labels, gap = cluster_maps(maps)
    assert len(np.unique(labels)) == groups
    assert gap is not None and gap > 0
    assert purity(labels, truth) >= 0.9
    # Every row of the class (fresh maps, not the sample) goes to its nearest cluster mean.
    model = strategies_of([((8, 8), m) for m in maps])
    fresh, fresh_truth = group_maps(300, groups, seed=100 + groups)
    assigned = np.array([model.assign(m)[0] for m in fresh])
    assert purity(assigned, fresh_truth) >= 0.9


def test_when_arpack_fails_the_spectrum_is_computed_densely(monkeypatch, caplog):
    """ARPACK can fail on a class's sample ("error 3: No shifts could be applied", seen on a near-free
    model's maps); that must not fail the job: the dense spectrum gives the same groups."""
    import scipy.sparse.linalg
    from sklearn.neighbors import kneighbors_graph

    from transforms.strategies import eigengap_clusters

    maps, _ = group_maps(400, 3, seed=3)
    connectivity = kneighbors_graph(maps, n_neighbors=10, include_self=True)
    affinity = 0.5 * (connectivity + connectivity.T)
    k, gap, values = eigengap_clusters(affinity, 8)
    assert eigengap_clusters(affinity, 8)[2].tolist() == values.tolist()  # a fixed start vector: repeatable

    def failing(*args, **kwargs):
        raise scipy.sparse.linalg.ArpackError(3)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", failing)
    dense_k, dense_gap, dense_values = eigengap_clusters(affinity, 8)
    assert "ARPACK failed on 400 maps" in caplog.text
    assert (dense_k, k) == (3, 3)
    np.testing.assert_allclose(dense_values, values, atol=1e-8)
    assert dense_gap == pytest.approx(gap, abs=1e-8)
    labels, _ = cluster_maps(maps)
    assert len(np.unique(labels)) == 3


def test_small_samples_are_one_strategy():
    maps, _ = group_maps(10, 2, seed=0)
    labels, gap = cluster_maps(maps, StrategySettings(min_sample=20))
    assert set(labels.tolist()) == {0} and gap is None


def _member(i):
    vector = np.full(4, float(i))
    return (float(i), f"img-{i}", vector, 0.5 + i / 10, 0.2, i % 9)


def test_cluster_combiner_three_ways_agree():
    fn = ClusterStatsFn(exemplars=3)
    items = [_member(i) for i in range(10)]

    def feed(chunk):
        acc = fn.create_accumulator()
        for item in chunk:
            acc = fn.add_input(acc, item)
        return acc

    one = fn.extract_output(feed(items))
    merged = fn.extract_output(fn.merge_accumulators([feed(items[i::3]) for i in range(3)]))
    singles = fn.extract_output(fn.merge_accumulators([feed([it]) for it in items]))
    for out in (merged, singles):
        assert out["size"] == one["size"] == 10
        np.testing.assert_allclose(out["mean_map"], one["mean_map"])
        assert out["mean_box_concentration"] == pytest.approx(one["mean_box_concentration"])
        assert out["exemplar_ids"] == one["exemplar_ids"] == ["img-0", "img-1", "img-2"]
    np.testing.assert_allclose(one["mean_map"], np.full(4, 4.5))
    assert one["mean_box_concentration"] == pytest.approx(0.95)


def _cluster(**kw):
    base = dict(share=0.2, size=40, peak_cell=0, mean_box_concentration=None, mean_border_mass=0.3,
                mean_cam=[1.0, 0.0, 0.0, 0.0])
    return {**base, **kw}


def test_the_suspicious_rule():
    s = StrategySettings()
    # With boxes: off the objects when no more mass on them than a flat map.
    flagged, reason = suspicion(_cluster(mean_box_concentration=0.4), None, s)
    assert flagged and "off the objects" in reason and "top-left" in reason
    assert suspicion(_cluster(mean_box_concentration=2.5), None, s) == (False, None)
    assert suspicion(_cluster(mean_box_concentration=0.9), None, s)[0]  # at the limit (0.9)
    assert not suspicion(_cluster(mean_box_concentration=0.95), None, s)[0]  # diffuse, about flat: not called off
    # Too small a share, or too few maps: never.
    assert not suspicion(_cluster(mean_box_concentration=0.4, share=0.04), None, s)[0]
    assert not suspicion(_cluster(mean_box_concentration=0.4, size=4), None, s)[0]
    # Without boxes: on the border, or a minority looking where the rest does not.
    assert suspicion(_cluster(mean_border_mass=0.7), None, s)[0]
    others = np.array([0.0, 0.0, 0.0, 1.0])
    flagged, reason = suspicion(_cluster(), others, s)
    assert flagged and "other strategies do not" in reason
    assert not suspicion(_cluster(), np.array([1.0, 0.1, 0.0, 0.0]), s)[0]  # looks where the rest looks
    assert not suspicion(_cluster(share=0.6), others, s)[0]  # the majority strategy


def test_cluster_rows_shares_and_suspicion():
    model = strategies_of([((2, 2), np.array([1.0, 0, 0, 0]))] * 30)
    clusters = [
        (0, {"size": 90, "mean_map": np.array([0, 0, 0, 1.0], np.float32), "mean_box_concentration": 3.0,
             "mean_border_mass": 0.2, "peak_cell": 8, "exemplar_ids": ["a"]}),
        (1, {"size": 10, "mean_map": np.array([1.0, 0, 0, 0], np.float32), "mean_box_concentration": 0.3,
             "mean_border_mass": 0.7, "peak_cell": 0, "exemplar_ids": ["b"]}),
    ]
    rows = cluster_rows(7, clusters, model)
    assert [r["share"] for r in rows] == [0.9, 0.1]
    assert [r["suspicious"] for r in rows] == [False, True]
    table = pa.Table.from_pylist(rows, schema=CLUSTER_SCHEMA)
    assert table.num_rows == 2 and table.schema.equals(CLUSTER_SCHEMA)


def _rows(n: int, groups: int, seed: int, class_id: int):
    maps, truth = group_maps(n, groups, seed)
    return [
        {"image_id": f"c{class_id}-{i}", "target_class": class_id, "cam": m.tolist(), "cam_height": 8,
         "cam_width": 8, "cam_max": 1.0, "box_concentration": 2.0 if t == 0 else 0.2, "border_mass": 0.3,
         "peak_cell": 4, "truth": int(t)}
        for i, (m, t) in enumerate(zip(maps, truth, strict=True))
    ]


def test_find_strategies_in_a_pipeline():
    """Class 0: two groups (one off the objects), class 1: one; every row gets its group's cluster."""
    rows = _rows(120, 2, seed=1, class_id=0) + _rows(60, 1, seed=2, class_id=1)
    rows.append({**rows[0], "image_id": "empty", "cam": [0.0] * 64, "cam_max": 0.0})
    with TestPipeline() as p:
        out = p | beam.Create(rows) | FindStrategies(StrategySettings(sample_size=100))
        # Rows keep their fields and gain cluster_id (None without mass); groups map one-to-one to clusters.
        pairs = (out["heatmaps"] | beam.Map(lambda r: (r["target_class"], r["truth"], r["cluster_id"]))
                 | beam.Distinct())
        assert_that(pairs | beam.combiners.Count.Globally(), equal_to([4]), label="OneClusterPerGroup")
        summary = out["clusters"] | beam.Map(lambda r: (r["class_id"], r["size"], r["suspicious"]))
        assert_that(summary, equal_to([(0, 60, False), (0, 60, True), (1, 60, False)]), label="Clusters")
        fits = out["clusters"] | beam.Map(lambda r: pa.Table.from_pylist([r], schema=CLUSTER_SCHEMA).num_rows)
        assert_that(fits, equal_to([1, 1, 1]), label="FitSchema")


# -- on the demo (tests/audit_fixtures.py: run 1 the shortcut model, run 2 a model trained without markers) ----


def _demo_clusters(demo_runs, run_id):
    from pipeline.manifest import read_table

    return read_table(demo_runs.run_dir(run_id), "clusters").to_pylist()


def assert_moving_shortcut_caught(clusters: list[dict], stats: dict) -> None:
    """The moving-marker class: suspicious corner strategies holding most of it; the clean classes: none."""
    from pipeline.demo import MOVING_SHORTCUT_CLASS

    corners = {0, 2, 6, 8}
    moving = [c for c in clusters if c["class_id"] == MOVING_SHORTCUT_CLASS]
    bad = [c for c in moving if c["suspicious"]]
    assert len(bad) >= 2, moving  # split over the corners, not one place
    assert {c["peak_cell"] for c in bad} <= corners and len({c["peak_cell"] for c in bad}) >= 2
    assert sum(c["share"] for c in bad) >= 0.5
    assert all("off the objects" in c["reason"] for c in bad)
    for clean in (0, 1):  # circle, square
        assert not any(c["suspicious"] for c in clusters if c["class_id"] == clean), clean
        assert stats[clean]["suspicious_strategy"] is False
    assert stats[MOVING_SHORTCUT_CLASS]["suspicious_strategy"] is True
    assert stats[MOVING_SHORTCUT_CLASS]["num_strategies"] == len(moving)


def test_demo_strategies_catch_the_moving_shortcut(demo_runs):
    from pipeline.manifest import read_table
    from tests.audit_fixtures import RUN_IDS
    from tests.helpers import parquet_schema

    run = demo_runs.run_dir(RUN_IDS[0])
    assert parquet_schema(f"{run}/clusters").equals(CLUSTER_SCHEMA)
    clusters = _demo_clusters(demo_runs, RUN_IDS[0])
    stats = {r["class_id"]: r for r in read_table(run, "class_stats").to_pylist()}
    assert_moving_shortcut_caught(clusters, stats)
    # Shares add up per class; cluster_id in heatmaps agrees with the clusters' sizes.
    heat = read_table(run, "heatmaps", ["target_class", "cluster_id", "cam_max"]).to_pylist()
    for class_id in {c["class_id"] for c in clusters}:
        mine = [c for c in clusters if c["class_id"] == class_id]
        assert sum(c["share"] for c in mine) == pytest.approx(1.0)
        for c in mine:
            assert c["size"] == sum(1 for r in heat if r["target_class"] == class_id
                                    and r["cluster_id"] == c["cluster_id"])
            assert 1 <= len(c["exemplar_ids"]) <= 6
    assert all(r["cluster_id"] is not None for r in heat if r["cam_max"] > 0)
    # The model trained without markers has no suspicious strategy in any class.
    plain = _demo_clusters(demo_runs, RUN_IDS[1])
    assert plain and not any(c["suspicious"] for c in plain)


def test_demo_strategies_on_data_the_demo_never_saw(demo_runs, tmp_path):
    """Fresh shards (another seed) audited with the demo model: the same verdicts."""
    from pipeline.demo import write_dataset
    from pipeline.manifest import read_table
    from tests.audit_fixtures import audit_cli

    write_dataset(str(tmp_path / "data"), n=200, shards=2, seed=123, broken=False)
    code, manifest = audit_cli(["--input", str(tmp_path / "data" / "*.tfrecord"), "--model", demo_runs.demo.model_path,
                                "--output", str(tmp_path / "out"), "--quiet", "--no_report", "--run_id", "unseen"])
    assert code == 0
    run = manifest["output"]
    stats = {r["class_id"]: r for r in read_table(run, "class_stats").to_pylist()}
    assert_moving_shortcut_caught(read_table(run, "clusters").to_pylist(), stats)
