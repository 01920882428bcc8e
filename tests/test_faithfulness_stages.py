"""The faithfulness Beam stages, columns, class stats, run summary and compare, each alone; one job."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.runs import compare
from transforms.checks import (
    COLUMNS,
    CURVE_COLUMNS,
    GapSummaryFn,
    gap_item,
    id_hash,
    is_sampled,
)
from transforms.class_stats import ClassStatsFn
from transforms.decode import DecodedImage
from transforms.heatmap_rows import FormatHeatmapRows, heatmap_rows
from transforms.model_handler import Explained


def explained(image_id: str, k: int = 1) -> Explained:
    image = DecodedImage("s", 0, image_id, 1, (), 8, 8, np.zeros((8, 8, 3), np.float32), b"")
    cam = np.arange(k * 4, dtype=np.float32).reshape(k, 2, 2)
    return Explained(image, 1, 0.9, np.arange(k), np.full(k, 0.9), np.ones(k), cam)



def test_sampling_is_deterministic_and_close_to_the_share():
    ids = [f"img-{i}" for i in range(20_000)]
    picked = [i for i in ids if is_sampled(i, 0.02)]
    assert 0.017 < len(picked) / len(ids) < 0.023
    assert picked == [i for i in ids if is_sampled(i, 0.02)]  # same rows on a rerun
    assert set(picked) <= {i for i in ids if is_sampled(i, 0.05)}  # a larger share keeps them
    assert not any(is_sampled(i, 0.0) for i in ids[:100])
    assert id_hash("a") == id_hash("a") and 0 <= id_hash("a")[1] < 2**31


def test_heatmap_rows_leave_the_faithfulness_columns_null():
    """Rows are made with null scores; the sampled ones get theirs from `with_scores` on their batch."""
    rows = heatmap_rows(explained("a", k=2), method="gradcam", target_layer="l")
    assert all(row[c] is None for row in rows for c in COLUMNS + CURVE_COLUMNS)
    (plain,) = FormatHeatmapRows(method="gradcam", target_layer="l").process(explained("b"))  # one Arrow batch
    assert all(plain.to_pylist()[0][c] is None for c in COLUMNS + CURVE_COLUMNS)


def _stats_row(gap, curve=1.0):
    return {"label": 0, "predicted_class": 0, "predicted_score": 0.9, "target_rank": 0, "target_class": 0,
            "target_score": 0.9, "cam": [1.0, 0, 0, 0], "cam_height": 2, "cam_width": 2, "cam_max": 1.0,
            "faithfulness_morf": gap + 0.1, "faithfulness_lerf": 0.0, "faithfulness_random": 0.1,
            "faithfulness_gap": gap, "deletion_morf": [curve] * 4, "deletion_lerf": [0.0] * 4,
            "deletion_random": [0.1] * 4}


def test_class_stats_faithfulness_the_three_ways():
    rows = [_stats_row(0.3, 1.0), _stats_row(-0.1, 0.0), _stats_row(0.2, 0.5)]
    unscored = dict(_stats_row(0.0), **dict.fromkeys(COLUMNS + CURVE_COLUMNS))
    items = [("target", r) for r in rows + [unscored]]
    fn = ClassStatsFn()
    one = fn.create_accumulator()
    for item in items:
        one = fn.add_input(one, item)
    merged = fn.merge_accumulators([fn.add_input(fn.create_accumulator(), item) for item in items])
    compacted = fn.compact(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), i) for i in items[:2]]
                                                 + [fn.add_input(fn.create_accumulator(), i) for i in items[2:]]))
    for acc in (one, merged, compacted):
        out = fn.extract_output(acc)
        assert out["num_faithfulness"] == 3 and out["num_targeted"] == 4
        assert out["mean_faithfulness_gap"] == pytest.approx(0.4 / 3)
        assert out["mean_faithfulness_morf"] == pytest.approx(0.7 / 3)
        assert out["share_positive_gap"] == pytest.approx(2 / 3)
        assert out["mean_deletion_morf"] == pytest.approx([0.5] * 4)
    empty = fn.extract_output(fn.create_accumulator())
    assert empty["num_faithfulness"] == 0 and empty["mean_faithfulness_gap"] is None
    assert empty["mean_deletion_lerf"] is None


def test_gap_summary_mean_interval_and_merge_order():
    rng = np.random.default_rng(0)
    gaps = rng.normal(0.2, 0.1, 500)
    items = [(id_hash(f"i{k}")[0], float(g)) for k, g in enumerate(gaps)]
    fn = GapSummaryFn(sample_size=200, resamples=500)
    acc = fn.create_accumulator()
    for item in items:
        acc = fn.add_input(acc, item)
    one = fn.extract_output(acc)
    parts = [fn.create_accumulator() for _ in range(3)]
    for k, item in enumerate(reversed(items)):
        fn.add_input(parts[k % 3], item)
    merged = fn.extract_output(fn.merge_accumulators(parts))
    # The same bounded sample (so the same interval) whatever the order and the merge tree.
    assert one["gap_ci95"] == merged["gap_ci95"] and one["rows"] == merged["rows"]
    assert one["mean_gap"] == pytest.approx(merged["mean_gap"], abs=1e-12)
    assert one["rows"] == 500 and one["bootstrap_sample"] == 200
    assert one["mean_gap"] == pytest.approx(gaps.mean())
    low, high = one["gap_ci95"]
    assert low < gaps.mean() < high and high - low < 0.06  # ~4 standard errors of a 200-sample mean
    assert one["share_positive_gap"] == pytest.approx((gaps > 0).mean())
    assert fn.extract_output(fn.create_accumulator())["mean_gap"] is None
    assert list(gap_item({"target_rank": 0, "faithfulness_gap": 0.5, "image_id": "z"}))[0][1] == 0.5
    assert not list(gap_item({"target_rank": 1, "faithfulness_gap": 0.5, "image_id": "z"}))


def test_gap_summary_in_a_pipeline():
    with TestPipeline() as p:
        out = (p | beam.Create([(0.1, 1.0), (0.2, 3.0)]) | beam.CombineGlobally(GapSummaryFn())
               | beam.Map(lambda s: (s["rows"], s["mean_gap"])))
        assert_that(out, equal_to([(2, 2.0)]))


def _class(gap, n=10):
    return {"class_id": 0, "class_name": "a", "num_labelled": 100, "accuracy": 0.9, "mean_predicted_score": 0.9,
            "num_faithfulness": n, "mean_faithfulness_gap": gap}


def test_compare_flags_a_drop_of_the_mean_gap():
    t = compare.CompareThresholds()
    row = compare.compare_class(0, _class(0.30), _class(0.15), t)
    assert row["flagged"] and "faithfulness gap 0.300 -> 0.150" in row["reasons"][0]
    assert row["faithfulness_gap_change"] == pytest.approx(-0.15)
    assert not compare.compare_class(0, _class(0.30), _class(0.25), t)["flagged"]
    assert not compare.compare_class(0, _class(0.10), _class(0.40), t)["flagged"]  # a rise is fine
    assert not compare.compare_class(0, _class(0.30), _class(0.0, n=4), t)["flagged"]  # too few scored rows
    assert compare.compare_class(0, _class(0.30), _class(0.0, n=4), t)["faithfulness_gap_change"] is None
    strict = compare.CompareThresholds(max_gap_drop=0.01)
    assert compare.compare_class(0, _class(0.30), _class(0.25), strict)["flagged"]
    assert compare.build_parser().parse_args(["--baseline", "a", "--current", "b", "--max_gap_drop", "0.2"]
                                             ).max_gap_drop == 0.2


def test_job_scores_the_sampled_rows_and_writes_the_summary(dataset, model_path, tmp_path):
    """The whole job with half the images sampled: the scored rows are exactly the hashed ones, and their
    scores are what the scorer gives for those images."""
    from pipeline.graph import run
    from pipeline.runs.manifest import read_table

    _, manifest = run(["--input", dataset["pattern"], "--model", model_path, "--output", str(tmp_path),
                       "--batch_size", "4", "--max_image_pixels", "1000000", "--run_id", "f",
                       "--faithfulness_sample", "0.5", "--sanity_images", "6", "--no_report", "--quiet"])
    rows = read_table(manifest["output"], "heatmaps").to_pylist()
    scored = {r["image_id"] for r in rows if r["faithfulness_gap"] is not None}
    assert scored == {r["image_id"] for r in rows if is_sampled(r["image_id"], 0.5)} and 3 < len(scored) < len(rows)
    for r in rows:
        if r["image_id"] in scored:
            assert r["faithfulness_gap"] == pytest.approx(r["faithfulness_morf"] - r["faithfulness_random"], abs=1e-6)
            assert r["faithfulness_morf"] == pytest.approx(np.mean(r["deletion_morf"]), abs=1e-6)
    summary = manifest["faithfulness"]
    assert summary == json.load(open(os.path.join(manifest["output"], "faithfulness.json")))
    assert summary["rows"] == len(scored) and summary["sample_share"] == 0.5
    gaps = [r["faithfulness_gap"] for r in rows if r["image_id"] in scored]
    assert summary["mean_gap"] == pytest.approx(np.mean(gaps), abs=1e-6)
    sanity = summary["sanity"]
    assert sanity["images"] == 6 and sanity["layers"] == ["head"] and len(sanity["correlations"]) == 1
    ids = sorted({r["image_id"] for r in rows}, key=lambda i: id_hash(i)[0])[:6]
    assert sorted(sanity["image_ids"]) == sorted(ids)  # the 6 smallest id hashes: the same every run
    stats = read_table(manifest["output"], "class_stats").to_pylist()
    assert sum(s["num_faithfulness"] for s in stats) == len(scored)


def _summary(correlation=0.1, flagged=False, gap=0.2, ci=(0.1, 0.3)):
    return {"sample_share": 0.02, "fractions": [0.1, 0.2, 0.3, 0.5], "rows": 40, "mean_gap": gap,
            "gap_ci95": list(ci), "share_positive_gap": 0.9,
            "sanity": {"images": 32, "layers": ["head"], "correlations": [correlation], "correlation": correlation,
                       "max_correlation": 0.5, "flagged": flagged}}


def test_summary_lines_say_the_gap_and_flag_a_failed_sanity_check():
    from pipeline.runs.summary import faithfulness_lines

    ok = faithfulness_lines(_summary())
    assert ok[0].startswith("Faithfulness on 40 sampled images") and "+0.200" in ok[0] and "95% CI +0.100" in ok[0]
    assert ok[1].startswith("Sanity check: ") and not any(line.startswith("!") for line in ok)
    bad = faithfulness_lines(_summary(correlation=0.9, flagged=True, gap=-0.01, ci=(-0.02, 0.0)))
    assert bad[1].startswith("! faithfulness:") and bad[2].startswith("! sanity check:") and "0.90" in bad[2]
    assert faithfulness_lines(None) == []


def test_report_section_draws_the_deletion_curves_of_scored_classes():
    from pipeline.report.figures import deletion_curves_figure
    from pipeline.report.page import faithfulness_section

    stats = [{"class_id": c, "class_name": None, "num_faithfulness": 3, "mean_faithfulness_gap": 0.2,
              "share_flagged": 0.1 * c, "mean_deletion_morf": [0.2, 0.3, 0.3, 0.4],
              "mean_deletion_lerf": [0.0, 0.0, 0.0, 0.01], "mean_deletion_random": [0.0, 0.05, 0.1, 0.2]}
             for c in range(3)]
    unscored = {"class_id": 3, "class_name": None, "num_faithfulness": 0, "mean_deletion_morf": None}
    assert deletion_curves_figure(stats + [unscored], {}, [0.1, 0.2, 0.3, 0.5], 2).startswith("data:image/png")
    assert deletion_curves_figure([unscored], {}, [0.1, 0.2, 0.3, 0.5], 2) is None
    page = faithfulness_section({"faithfulness": _summary()}, stats, {})
    assert "Can the maps be trusted?" in page and "Sanity check passed" in page and "alt='deletion curves'" in page
    failed = faithfulness_section({"faithfulness": _summary(correlation=0.9, flagged=True)}, [unscored], {})
    assert "Sanity check failed" in failed and "deletion curves" not in failed
    assert faithfulness_section({}, stats, {}) == ""


def test_options_defaults_and_bad_values_exit_2(capsys):
    from pipeline.options import parse_args

    config, _ = parse_args(["--input", "x", "--model", "m"])
    checks = config.checks
    assert (checks.faithfulness_sample, checks.faithfulness_images, checks.sanity_images,
            checks.max_sanity_correlation, config.compare.max_gap_drop) == (1.0, 16, 32, 0.5, 0.1)
    config, _ = parse_args(["--input", "x", "--model", "m", "--faithfulness_sample", "0", "--sanity_images", "0"])
    assert config.checks.faithfulness_sample == 0 and config.checks.sanity_images == 0
    assert config.as_json()["faithfulness_sample"] == 0  # the manifest keeps the flat option names
    for bad in (["--faithfulness_sample", "1.5"], ["--faithfulness_sample", "x"], ["--sanity_images", "-1"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--input", "x", "--model", "m", *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "expected" in err
