"""Strategies (SpRAy): eigengap and purity on synthetic map sets, the combiner, the rule, the transform."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.schemas import CLUSTER_SCHEMA, HEATMAP_SCHEMA
from transforms.strategies import (
    ASSIGN_COLUMNS,
    AssignStrategies,
    ClusterStatsFn,
    FindStrategies,
    SampleBatchMaps,
    SampleMapsFn,
    StrategySettings,
    _members,
    cluster_maps,
    cluster_rows,
    normalised_map,
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


def assign_one(model, vector: np.ndarray) -> tuple[int, float]:
    """(nearest cluster, its Euclidean distance) for one max-normalised map: the reference the job's
    batched assignment (`AssignStrategies`) is tested against."""
    distances = np.linalg.norm(model.means - vector[None, :], axis=1)
    best = int(np.argmin(distances))
    return best, float(distances[best])


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
    assigned = np.array([assign_one(model, m)[0] for m in fresh])
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


def _partial(items, exemplars=3):
    """A batch's members as AssignStrategies sums them: items of (vector, distance, id, concentration, box mass,
    border, cell, peak_in_box as 1.0 / 0.0 / NaN)."""
    vectors, distances, ids, conc, mass, border, cells, hits = zip(*items, strict=True)
    return _members(np.stack(vectors).astype(np.float32), np.array(distances), list(ids), np.array(conc, float),
                    np.array(mass, float), np.array(border, float), np.array(cells, np.int64), np.array(hits, float),
                    exemplars)


def test_cluster_combiner_three_ways_agree():
    """One partial for all members, partials of three chunks, one per member: the same cluster stats,
    and those computed by hand (NaN / -1 = the column was null: left out of that mean / count)."""
    fn = ClusterStatsFn(exemplars=3)
    items = [(np.full(4, float(i)), float(i), f"img-{i}", 0.5 + i / 10, i / 20, 0.2, i % 9, float(i % 4 == 0))
             for i in range(10)]
    items.append((np.full(4, 4.5), 20.0, "no-stats", np.nan, np.nan, np.nan, -1, np.nan))

    def feed(partials):
        acc = fn.create_accumulator()
        for partial in partials:
            acc = fn.add_input(acc, partial)
        return acc

    one = fn.extract_output(feed([_partial(items)]))
    merged = fn.extract_output(fn.merge_accumulators([feed([_partial(items[i::3])]) for i in range(3)]))
    singles = fn.extract_output(feed([_partial([it]) for it in items]))
    for out in (merged, singles):
        assert out["size"] == one["size"] == 11
        np.testing.assert_allclose(out["mean_map"], one["mean_map"], rtol=1e-12)
        assert out["mean_box_concentration"] == pytest.approx(one["mean_box_concentration"], rel=1e-12)
        assert out["mean_border_mass"] == pytest.approx(one["mean_border_mass"], rel=1e-12)
        assert out["miss_share"] == one["miss_share"]
        assert out["mean_box_mass"] == pytest.approx(one["mean_box_mass"], rel=1e-12)
        assert out["peak_cell"] == one["peak_cell"]
        assert out["exemplar_ids"] == one["exemplar_ids"]
    np.testing.assert_allclose(one["mean_map"], np.full(4, 4.5), rtol=1e-6)
    assert one["mean_box_concentration"] == pytest.approx(0.95)  # the ten known values only
    assert one["mean_border_mass"] == pytest.approx(0.2)
    assert one["miss_share"] == pytest.approx(7 / 10)  # hits at 0, 4, 8 of the ten with boxes
    assert one["mean_box_mass"] == pytest.approx(45 / 200)
    assert one["peak_cell"] == 0  # cells 0..8 and 0 again
    assert one["exemplar_ids"] == ["img-0", "img-1", "img-2"]


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
    # ... or when most members peak off their own boxes and most of the mass lies outside them, whatever the
    # concentration: a corner-marker strategy at 1.06 or 2.8 (the object draws some mass), beside a diffuse
    # one that points at its objects.
    for concentration in (1.06, 2.8):
        flagged, reason = suspicion(_cluster(mean_box_concentration=concentration, miss_share=0.68,
                                             mean_box_mass=0.2), None, s)
        assert flagged and "68% of them peak off their own boxes (limit 50%), 80% of the mass lies outside" in reason
    assert suspicion(_cluster(mean_box_concentration=1.2, miss_share=0.5, mean_box_mass=0.49), None, s)[0]
    assert not suspicion(_cluster(mean_box_concentration=1.06, miss_share=0.29, mean_box_mass=0.2), None, s)[0]
    assert not suspicion(_cluster(mean_box_concentration=1.2, miss_share=0.9, mean_box_mass=0.5), None, s)[0]
    assert not suspicion(_cluster(mean_box_concentration=1.06, miss_share=None, mean_box_mass=None), None, s)[0]
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
         "cam_width": 8, "cam_max": 1.0, "box_concentration": 2.0 if t == 0 else 0.2,
         "box_mass": 0.5 if t == 0 else 0.05, "border_mass": 0.3,
         "peak_cell": 4, "peak_in_box": bool(t == 0 or i % 5 == 0), "truth": int(t)}
        for i, (m, t) in enumerate(zip(maps, truth, strict=True))
    ]


# The heatmaps columns the assignment uses, with their job types, and the test's own "truth".
TEST_SCHEMA = pa.schema([*(HEATMAP_SCHEMA.field(name) for name in ASSIGN_COLUMNS), pa.field("truth", pa.int64())])


def test_assign_strategies_on_a_batch_equals_assigning_each_row():
    """Numpy over a batch gives each row the cluster `ClassStrategies.assign` gives it alone; the
    members' partial sums and the exemplar candidates are those of the rows one by one."""
    from transforms.exemplars import ROW_FIELDS

    rows = _rows(90, 2, seed=3, class_id=0) + _rows(40, 1, seed=4, class_id=1)
    for row in rows[::7]:
        row["cam_max"] = 2.0  # maps not already max-normalised
        row["cam"] = [2.0 * v for v in row["cam"]]
    rows[5]["box_concentration"] = None
    rows[6]["peak_in_box"] = None  # no box
    rows += [
        {**rows[0], "image_id": "empty", "cam": [0.0] * 64, "cam_max": 0.0},
        {**rows[1], "image_id": "small", "cam": [1.0] * 16, "cam_height": 4, "cam_width": 4},
        {**rows[2], "image_id": "unclustered", "target_class": 5},
    ]
    models = {c: strategies_of([((8, 8), np.asarray(r["cam"], np.float32) / r["cam_max"])
                                for r in rows[:130] if r["target_class"] == c]) for c in (0, 1)}
    batch = pa.RecordBatch.from_pylist(rows, schema=TEST_SCHEMA)
    out = list(AssignStrategies(exemplars=3, per_kind=2).process(batch, models))
    (assigned,) = [o for o in out if isinstance(o, pa.RecordBatch)]
    tagged = {}
    for o in out:
        if not isinstance(o, pa.RecordBatch):
            tagged.setdefault(o.tag, []).append(o.value)

    expected, distances = [], {}
    for r in rows:
        model = models.get(r["target_class"])
        if model is None or not r["cam_max"] or (r["cam_height"], r["cam_width"]) != model.shape:
            expected.append(None)
            continue
        vector = np.asarray(r["cam"], np.float32) / np.float32(r["cam_max"])
        cluster, distance = assign_one(model, vector)
        expected.append(cluster)
        distances.setdefault((r["target_class"], cluster), []).append((distance, r["image_id"], vector, r))
    assert assigned.column("cluster_id").to_pylist() == expected
    assert assigned.drop_columns(["cluster_id"]).equals(batch.drop_columns(["cluster_id"]))

    members = dict(tagged["members"])
    assert set(members) == set(distances) and len(members) == 3
    for key, found in distances.items():
        partial = members[key]
        assert partial.count == len(found)
        np.testing.assert_allclose(partial.sum_map, np.sum([v for _, _, v, _ in found], axis=0), rtol=1e-6)
        known = [r["box_concentration"] for *_, r in found if r["box_concentration"] is not None]
        assert partial.num_concentration == len(known)
        assert partial.sum_concentration == pytest.approx(sum(known), rel=1e-6)
        assert partial.sum_box_mass == pytest.approx(sum(r["box_mass"] for *_, r in found), rel=1e-6)
        pointed = [r["peak_in_box"] for *_, r in found if r["peak_in_box"] is not None]
        assert (partial.num_pointed, partial.misses) == (len(pointed), pointed.count(False))
        closest = sorted(found, key=lambda t: (t[0], t[1]))[:3]
        assert sorted(i for _, i in partial.closest) == sorted(i for _, i, _, _ in closest)

    candidates = {}
    for kind, cand in tagged["exemplar_candidates"]:
        candidates.setdefault(kind, []).append(cand)
    assert set(candidates) == {f"strategy:{c}:{k}" for c, k in distances}
    for (class_id, cluster), found in distances.items():
        best = sorted(found, key=lambda t: (t[0], t[1]))[:2]
        got = candidates[f"strategy:{class_id}:{cluster}"]
        assert [c.image_id for c in got] == [i for _, i, _, _ in best]
        assert [c.score for c in got] == pytest.approx([-d for d, *_ in best], rel=1e-6)
        assert sum(c.count for c in got) == len(found)  # the kind's total survives the pre-selection
        assert all(c.raw_record == b"" and set(c.fields) == set(ROW_FIELDS) for c in got)
        assert got[0].fields["cam"] == pytest.approx(best[0][3]["cam"])


def _sampled(batches, n: int, seed: int, merge: str = "fold") -> dict:
    """class -> [(shape, map)]: SampleBatchMaps over the batches, then SampleMapsFn, its accumulators
    made one per batch and merged ("merge"), or every part added to one ("fold")."""
    sampler, fn = SampleBatchMaps(n, salt=f"{seed}:"), SampleMapsFn(n)
    parts: dict = {}
    for batch in batches:
        for class_id, part in sampler.process(batch):
            parts.setdefault(class_id, []).append(part)
    out = {}
    for class_id, class_parts in parts.items():
        if merge == "fold":
            acc = fn.create_accumulator()
            for part in class_parts:
                acc = fn.add_input(acc, part)
        else:
            acc = fn.merge_accumulators([fn.add_input(fn.create_accumulator(), part) for part in class_parts[::-1]])
        out[class_id] = fn.extract_output(acc)
    return out


@pytest.mark.parametrize("merge", ["fold", "merge"])
def test_sampling_keeps_every_map_of_a_class_below_the_sample_size(merge):
    """With fewer maps than the sample size, a class's sample is all its maps with mass, each exactly its
    row's `normalised_map` with its size; maps of another size are kept under their own size."""
    rows = _rows(90, 2, seed=5, class_id=0) + _rows(40, 1, seed=6, class_id=1)
    for row in rows[::9]:
        row["cam_max"], row["cam"] = 2.0, [2.0 * v for v in row["cam"]]
    rows[3].update(cam=[0.0] * 64, cam_max=0.0)  # no mass: never sampled
    rows[4].update(cam=[1.0, 0.5], cam_height=1, cam_width=2, cam_max=1.0)
    batches = [pa.RecordBatch.from_pylist(rows[i : i + 50], schema=TEST_SCHEMA) for i in range(0, len(rows), 50)]
    sample = _sampled(batches, 1000, seed=0, merge=merge)
    for class_id in (0, 1):
        want = sorted((((r["cam_height"], r["cam_width"]), normalised_map(r).tobytes()) for r in rows
                       if r["target_class"] == class_id and r["cam_max"] > 0))
        got = sorted((shape, m.astype(np.float32).tobytes()) for shape, m in sample[class_id])
        assert got == want, class_id
    assert ((1, 2), np.float32([1.0, 0.5]).tobytes()) in {(s, m.tobytes()) for s, m in sample[0]}


def test_sampling_is_uniform_whatever_the_batches():
    """10 maps of a class in batches of 7 and 3, a sample of 2, 4000 salts of the id hash: every map is in the sample
    with probability 2/10 (within 4 standard deviations: 0.2 +- 0.025), whichever batch holds it."""
    rows = _rows(10, 1, seed=7, class_id=0)
    batches = [pa.RecordBatch.from_pylist(rows[:7], schema=TEST_SCHEMA),
               pa.RecordBatch.from_pylist(rows[7:], schema=TEST_SCHEMA)]
    index = {normalised_map(r).tobytes(): i for i, r in enumerate(rows)}
    hits = np.zeros(10)
    trials = 4000
    for seed in range(trials):
        sample = _sampled(batches, 2, seed=seed, merge="merge" if seed % 2 else "fold")[0]
        assert len(sample) == 2
        for _, m in sample:
            hits[index[m.astype(np.float32).tobytes()]] += 1
    np.testing.assert_allclose(hits / trials, 0.2, atol=0.025)


def test_find_strategies_in_a_pipeline():
    """Class 0: two groups (one off the objects), class 1: one; every row gets its group's cluster."""
    rows = _rows(120, 2, seed=1, class_id=0) + _rows(60, 1, seed=2, class_id=1)
    rows.append({**rows[0], "image_id": "empty", "cam": [0.0] * 64, "cam_max": 0.0})
    with TestPipeline() as p:
        out = p | beam.Create(rows) | FindStrategies(StrategySettings(sample_size=100), schema=TEST_SCHEMA,
                                                     batch_rows=50)
        # Rows keep their fields and gain cluster_id (None without mass); groups map one-to-one to clusters.
        assigned = out["heatmaps"] | beam.FlatMap(lambda batch: batch.to_pylist())
        assert_that(assigned | beam.Map(lambda r: r["image_id"]), equal_to([r["image_id"] for r in rows]),
                    label="EveryRowOnce")
        pairs = (assigned | beam.Map(lambda r: (r["target_class"], r["truth"], r["cluster_id"]))
                 | beam.Distinct())
        assert_that(pairs | beam.combiners.Count.Globally(), equal_to([4]), label="OneClusterPerGroup")
        summary = out["clusters"] | beam.Map(lambda r: (r["class_id"], r["size"], r["suspicious"]))
        assert_that(summary, equal_to([(0, 60, False), (0, 60, True), (1, 60, False)]), label="Clusters")
        fits = out["clusters"] | beam.Map(lambda r: pa.Table.from_pylist([r], schema=CLUSTER_SCHEMA).num_rows)
        assert_that(fits, equal_to([1, 1, 1]), label="FitSchema")
        totals = (out["exemplar_candidates"] | beam.MapTuple(lambda kind, c: (kind, c.count))
                  | beam.CombinePerKey(sum))
        assert_that(totals, equal_to([("strategy:0:0", 60), ("strategy:0:1", 60), ("strategy:1:0", 60)]),
                    label="CandidateTotals")


# -- on the demo (tests/audit_fixtures.py: run 1 the shortcut model, run 2 the control model) ---------------------


def _demo_clusters(demo_runs, run_id):
    from pipeline.runs.manifest import read_table

    return read_table(demo_runs.run_dir(run_id), "clusters").to_pylist()


def assert_moving_shortcut_caught(clusters: list[dict], stats: dict, corners_apart: int = 2) -> None:
    """The moving-marker class: suspicious corner strategies holding most of it, at least `corners_apart`
    corners apart (the demo's 400 images: 3 or 4 in every one of bench.demo_seeds' 10 models; a sample of
    50 crosses may make one cluster); the clean classes: none."""
    from pipeline.demo import MOVING_SHORTCUT_CLASS

    corners = {0, 2, 6, 8}
    moving = [c for c in clusters if c["class_id"] == MOVING_SHORTCUT_CLASS]
    bad = [c for c in moving if c["suspicious"]]
    assert len(bad) >= corners_apart, moving  # split over the corners, not one place
    assert {c["peak_cell"] for c in bad} <= corners and len({c["peak_cell"] for c in bad}) >= corners_apart
    assert sum(c["share"] for c in bad) >= 0.5
    assert all("off the objects" in c["reason"] for c in bad)
    for clean in (0, 1):  # circle, square
        assert not any(c["suspicious"] for c in clusters if c["class_id"] == clean), clean
        assert stats[clean]["suspicious_strategy"] is False
    assert stats[MOVING_SHORTCUT_CLASS]["suspicious_strategy"] is True
    assert stats[MOVING_SHORTCUT_CLASS]["num_strategies"] == len(moving)


def test_demo_strategies_catch_the_moving_shortcut(demo_runs):
    from pipeline.runs.manifest import read_table
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
    # The control model (the markers on every class alike) has no suspicious strategy in any class.
    plain = _demo_clusters(demo_runs, RUN_IDS[1])
    assert plain and not any(c["suspicious"] for c in plain)


def test_demo_strategies_on_data_the_demo_never_saw(demo_runs, tmp_path):
    """Fresh shards (another seed) audited with the demo model: the same verdicts."""
    from pipeline.demo import write_dataset
    from pipeline.runs.manifest import read_table
    from tests.audit_fixtures import audit_cli

    write_dataset(str(tmp_path / "data"), n=200, shards=2, seed=123, broken=False)
    code, manifest = audit_cli(["--input", str(tmp_path / "data" / "*.tfrecord"), "--model", demo_runs.demo.model_path,
                                "--output", str(tmp_path / "out"), "--quiet", "--no_report", "--run_id", "unseen"])
    assert code == 0
    run = manifest["output"]
    stats = {r["class_id"]: r for r in read_table(run, "class_stats").to_pylist()}
    assert_moving_shortcut_caught(read_table(run, "clusters").to_pylist(), stats, corners_apart=1)
