"""The checks' sample: chosen by id hash without pixels, read again by offset, scored in full batches;
the same scores as scoring each image alone the way the job did before (`tests/reference_checks.py::ScoreFaithfulness`)."""

from __future__ import annotations

import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.helpers import good_examples, write_shard
from transforms.checks import (
    COLUMNS,
    CURVE_COLUMNS,
    CheckImage,
    SelectCheckImages,
    check_candidates,
    faithfulness_sample,
    id_hash,
    read_check_pixels,
    record_key,
    with_scores,
)
from transforms.decode import DecodedImage
from transforms.heatmap_rows import heatmap_rows
from transforms.model_handler import Explained
from transforms.schemas import HEATMAP_SCHEMA


def _rows(image_id: str, offset: int | None = 0, k: int = 1, source: str = "s") -> list[dict]:
    image = DecodedImage(source, 0, image_id, 1, (), 8, 8, None, b"",
                         record_offset=-1 if offset is None else offset)
    cam = np.arange(k * 4, dtype=np.float32).reshape(k, 2, 2) + 1
    return heatmap_rows(Explained(image, 1, 0.9, np.arange(k), np.full(k, 0.9), np.ones(k), cam),
                        method="gradcam", target_layer="l")


def _batch(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=HEATMAP_SCHEMA)


def test_the_sample_is_the_k_smallest_id_hashes_over_batches_without_pixels():
    ids = [f"img-{i}" for i in range(300)]
    batches = [_batch([r for i in ids[start:start + 64] for r in _rows(i, offset=int(i[4:]) * 100, k=2)])
               for start in range(0, len(ids), 64)]
    no_offset = _batch(_rows("no-offset", offset=None))  # cannot be read again: never offered
    expected = sorted(ids, key=lambda i: id_hash(i)[0])[:10]
    offered = [c for b in batches for c in check_candidates(b, 10)]
    assert len(offered) == 10 * len(batches) and not check_candidates(no_offset, 10)
    item = offered[0]
    assert isinstance(item, CheckImage) and item.record_offset == int(item.image_id[4:]) * 100
    np.testing.assert_array_equal(item.cam, np.arange(4, dtype=np.float32).reshape(2, 2) + 1)  # rank 0's map
    assert item.hash == id_hash(item.image_id)[0] and item.target_class == 0
    with TestPipeline() as p:
        sample = p | beam.Create(batches + [no_offset]) | SelectCheckImages(10)
        assert_that(sample | beam.Map(lambda s: [c.image_id for c in s]), equal_to([expected]))


def test_the_faithfulness_images_are_the_smaller_of_the_two_bounds():
    ids = [f"x{i}" for i in range(400)]
    sample = sorted((CheckImage(id_hash(i)[0], i, "s", 0, 0, np.zeros((2, 2), np.float32)) for i in ids),
                    key=lambda c: c.hash)
    in_share = [c.image_id for c in sample if c.hash < 0.02]
    assert 3 <= len(in_share) < 32
    assert [c.image_id for c in faithfulness_sample(sample[:40], 0.02, 32)] == in_share  # the share binds
    assert [c.image_id for c in faithfulness_sample(sample, 0.5, 32)] == [c.image_id for c in sample[:32]]
    assert faithfulness_sample(sample, 0.0, 32) == [] and faithfulness_sample(sample, 0.5, 0) == []


def test_scores_fill_only_the_scored_rank_0_rows_and_other_batches_pass_as_they_are():
    rows = _rows("a", offset=10, k=2) + _rows("b", offset=20) + _rows("a", offset=30, source="t")
    scores = {"faithfulness_morf": 0.5, "faithfulness_lerf": 0.0, "faithfulness_random": 0.25,
              "faithfulness_gap": 0.25, "deletion_morf": [0.5] * 4, "deletion_lerf": [0.0] * 4,
              "deletion_random": [0.25] * 4}
    score_row = {"image_id": "a", "source": "s", "record_offset": 10, "target_rank": 0, "target_class": 0, **scores}
    lookup = dict([record_key(score_row)])
    out = with_scores(_batch(rows), lookup).to_pylist()
    assert {c: out[0][c] for c in scores} == scores  # image "a" in shard s at byte 10, rank 0
    for row in out[1:]:  # its rank-1 row, another image, the same id at another record
        assert all(row[c] is None for c in COLUMNS + CURVE_COLUMNS)
    other = _batch(_rows("c"))
    assert with_scores(other, lookup) is other and with_scores(other, {}) is other


def test_a_record_that_cannot_be_read_again_is_left_out(tmp_path):
    from transforms.decode import BatchImageDecoder
    from transforms.records import ReadShardRecords

    path = write_shard(str(tmp_path), "s.tfrecord", good_examples(3, "g"))
    offsets = [r.offset for r in ReadShardRecords().process(path)]
    items = [CheckImage(0.1, "g-0", path, offsets[0], 0, None), CheckImage(0.2, "bad-offset", path, offsets[0] + 3, 0, None),
             CheckImage(0.3, "gone", str(tmp_path / "missing.tfrecord"), 0, 0, None),
             CheckImage(0.4, "g-2", path, offsets[2], 0, None)]
    pixels, kept = read_check_pixels(items, "image/encoded", BatchImageDecoder((32, 32, 3)), batch_size=2)
    assert [k.image_id for k in kept] == ["g-0", "g-2"] and pixels.shape == (2, 32, 32, 3)


def test_batched_rereading_gives_each_image_its_per_image_scores_and_sanity(dataset, model_path, tmp_path):
    """The job (bad records and damaged shards included) scores the 5 smallest id hashes of the 50%
    share, read again and scored in one batch; each equals the in-stream scorer (`ScoreFaithfulness`,
    the job's code before) run on that image alone after the main pass's own decode and explain, and
    the sanity check equals `cascading_randomisation` on the same images' pixels."""
    from pipeline.graph import run
    from pipeline.runs.manifest import read_table
    from tests.reference_checks import ScoreFaithfulness
    from transforms.cam.faithfulness import cascading_randomisation
    from transforms.checks import load_sanity_explainer, sanity_pixels
    from transforms.decode import DecodeImageExamples
    from transforms.model_handler import KerasCamModelHandler, acquire_worker
    from transforms.records import ReadShardRecords

    _, manifest = run(["--input", dataset["pattern"], "--model", model_path, "--output", str(tmp_path),
                       "--batch_size", "8", "--max_image_pixels", "1000000", "--run_id", "c",
                       "--faithfulness_sample", "0.5", "--faithfulness_images", "5", "--sanity_images", "6",
                       "--no_report", "--quiet"])
    rows = {r["image_id"]: r for r in read_table(manifest["output"], "heatmaps").to_pylist()}
    by_hash = sorted(rows, key=lambda i: id_hash(i)[0])
    expected = [i for i in by_hash if id_hash(i)[0] < 0.5][:5]
    assert {i for i, r in rows.items() if r["faithfulness_gap"] is not None} == set(expected)
    summary = manifest["faithfulness"]
    assert summary == json.load(open(os.path.join(manifest["output"], "faithfulness.json")))
    assert (summary["rows"], summary["bootstrap_sample"], summary["max_images"], summary["sample_share"]) == (5, 5, 5, 0.5)
    stats = read_table(manifest["output"], "class_stats").to_pylist()
    assert sum(s["num_faithfulness"] for s in stats) == 5
    assert sum(s["mean_faithfulness_gap"] * s["num_faithfulness"] for s in stats if s["num_faithfulness"]) \
        == pytest.approx(sum(rows[i]["faithfulness_gap"] for i in expected), abs=1e-6)

    # The previous code's path, image by image: read, check, decode and explain as the main pass does.
    handler = KerasCamModelHandler(model_path, batch_size=8)
    worker = acquire_worker(handler)
    check = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label", id_key="image/filename",
                                label_offset=0, num_classes=worker.explainer.num_classes, max_image_pixels=1_000_000,
                                require_label=False)
    wanted = set(expected) | set(by_hash[:6])
    images = {}
    for shard in sorted(glob.glob(dataset["pattern"])):
        for record in ReadShardRecords().process(shard):
            if not isinstance(record, beam.pvalue.TaggedOutput):
                for image in check.process(record):
                    if not isinstance(image, beam.pvalue.TaggedOutput) and image.image_id in wanted:
                        images[image.image_id] = handler.run_inference([image], worker)[0]
    scorer = ScoreFaithfulness(handler)
    scorer.setup()
    for image_id in expected:
        (measured,) = scorer.process([images[image_id]])
        row = rows[image_id]
        np.testing.assert_allclose(row["cam"], np.ravel(images[image_id].cam[0]), atol=1e-6)
        for column in COLUMNS + CURVE_COLUMNS:
            np.testing.assert_allclose(row[column], measured.scores[column], atol=1e-5, err_msg=column)

    sanity = summary["sanity"]
    first = by_hash[:6]
    assert sanity["image_ids"] == first and sanity["images"] == 6
    settings = {"model_uri": model_path, "weights": None, "safe_mode": True, "target_layer": worker.explainer.target_layer,
                "method": "gradcam", "preprocess": "none", "image_size": tuple(worker.explainer.input_shape[:2])}
    reference = cascading_randomisation(
        load_sanity_explainer(**settings),
        sanity_pixels(np.stack([images[i].image.pixels for i in first])),
        np.array([int(images[i].target_class[0]) for i in first], np.int32))
    assert sanity["layers"] == reference["layers"]
    np.testing.assert_allclose(sanity["correlations"], reference["correlations"], atol=1e-5)
