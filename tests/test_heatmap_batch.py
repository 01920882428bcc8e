"""Batches as elements: `heatmap_batch` (an explained batch's rows as one Arrow batch, columns from arrays)
gives exactly the rows `heatmap_rows` gives image by image, and `batch_candidates` the exemplar candidates
`audit_candidates` gives row by row (each kind's best, counting for the rest)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from transforms.decode import DecodedImage
from transforms.exemplars import FLAG_RANKING, audit_candidates, batch_candidates, rank_key
from transforms.flags import FlagThresholds
from transforms.heatmap_rows import FormatHeatmapRows, exemplar_batch, heatmap_batch, heatmap_rows
from transforms.model_handler import ExplainedBatch, _explained, batch_attention
from transforms.schemas import heatmap_schema

K, H, W, CLASSES = 3, 5, 6, 7
BOXES = [(), ((0.1, 0.2, 0.6, 0.7),), ((0.0, 0.0, 0.3, 0.3), (0.5, 0.4, 0.9, 1.0)),
         ((0.7, 0.7, 1.0, 1.0), (0.0, 0.0, 0.2, 0.2), (0.4, 0.1, 0.6, 0.3))]


def fake_batch(n: int, seed: int, multilabel: bool):
    """(images, the explainer's output dict) for n images: maps non-negative, signed, empty and peaked;
    0-3 boxes; labels known or not; some slots invalid; one image with non-finite output."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        labels = None if multilabel and i % 5 == 0 else (
            tuple(sorted(rng.choice(CLASSES, size=int(rng.integers(0, 3)), replace=False).tolist())) if multilabel
            else None)
        images.append(DecodedImage(
            source=f"s-{i % 2}", record_index=i, image_id=f"img-{seed}-{i:03d}",
            label=None if multilabel or i % 4 == 3 else int(rng.integers(0, CLASSES)), boxes=BOXES[i % len(BOXES)],
            image_height=int(rng.integers(20, 400)), image_width=int(rng.integers(20, 400)), pixels=None,
            raw_record=f"record-{i}".encode(), record_offset=-1 if i % 3 == 0 else 100 * i, labels=labels))
    cam = rng.random((n, K, H, W)).astype(np.float32) * 3
    cam[1::5] -= 1.0  # signed maps
    cam[2::7, 1] = 0.0  # no mass
    cam[3::6, 0, 0, 0] = 40.0  # peaked in a corner
    logits = rng.normal(size=(n, CLASSES)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.argsort(-probs, axis=1)[:, :K]
    valid = np.ones((n, K), bool)
    valid[::4, 2] = False
    valid[1::6, 1:] = False
    finite = np.ones(n, bool)
    finite[min(5, n - 1)] = False
    out = {"predicted_class": probs.argmax(1).astype(np.int32), "predicted_score": probs.max(1).astype(np.float32),
           "target_class": targets.astype(np.int32), "target_valid": valid,
           "target_score": np.take_along_axis(probs, targets, 1).astype(np.float32),
           "target_logit": np.take_along_axis(logits, targets, 1), "cam": cam, "finite": finite,
           "scores": probs.astype(np.float32)}
    return images, out


@pytest.mark.parametrize("multilabel", [False, True])
def test_batch_columns_are_the_rows_image_by_image(multilabel):
    thresholds = FlagThresholds(outside_box_concentration=1.2, pointing_tolerance_px=25.0)
    label_threshold = 0.2 if multilabel else None
    images, out = fake_batch(30, seed=3 if multilabel else 4, multilabel=multilabel)
    batch = ExplainedBatch.from_output(images, out, multilabel=multilabel)
    assert [r.image.image_id for r in batch.failed] == [images[5].image_id]
    assert batch.failed[0].error[0] == "NonFiniteOutput"
    rows, exact = heatmap_batch(batch, method="gradcam", target_layer="conv", thresholds=thresholds,
                                label_threshold=label_threshold)
    assert rows.schema.equals(heatmap_schema(multilabel))
    # The reference: each image's Explained as the per-image path made it, formatted as dicts.
    attention = batch_attention(out, images)
    per_image = [_explained(item, out, i, attention, multilabel) for i, item in enumerate(images)]
    dicts = [row for r in per_image if r.error is None
             for row in heatmap_rows(r, method="gradcam", target_layer="conv", thresholds=thresholds,
                                     label_threshold=label_threshold)]
    expected = pa.RecordBatch.from_pylist(dicts, schema=heatmap_schema(multilabel))
    assert rows.num_rows == len(dicts) > 50
    assert rows.to_pylist() == expected.to_pylist()
    for name, (values, nulls) in exact.items():  # the float64 values before the table's rounding
        want = [d[name] for d in dicts]
        assert [None if null else v for v, null in zip(values.tolist(), nulls.tolist(), strict=True)] == want
    # The same from per-image results (RunInference's, --large_model), and from a batch of none.
    again, _ = heatmap_batch(ExplainedBatch.from_results(per_image), method="gradcam", target_layer="conv",
                             thresholds=thresholds, label_threshold=label_threshold)
    assert again.to_pylist() == expected.to_pylist()
    empty, _ = heatmap_batch(ExplainedBatch.from_results([]), method="gradcam", target_layer="conv",
                             label_threshold=label_threshold)
    assert empty.num_rows == 0 and empty.schema.equals(heatmap_schema(multilabel))


def test_format_heatmap_rows_emits_one_batch_its_errors_and_its_exemplar_source():
    images, out = fake_batch(12, seed=5, multilabel=False)
    fmt = FormatHeatmapRows(method="gradcam", target_layer="conv", exemplar_sources=True)
    outputs = list(fmt.process(ExplainedBatch.from_output(images, out)))
    main = [o for o in outputs if isinstance(o, pa.RecordBatch)]
    tagged = {}
    for o in outputs:
        if not isinstance(o, pa.RecordBatch):
            tagged.setdefault(o.tag, []).append(o.value)
    assert len(main) == 1 and len(tagged["exemplar_sources"]) == 1
    (error,) = tagged["errors"]
    assert error["image_id"] == images[5].image_id and error["stage"] == "compute"
    assert error["raw_record"] == images[5].raw_record
    assert sorted(set(main[0].column("image_id").to_pylist())) == sorted(
        item.image_id for i, item in enumerate(images) if i != 5)


@pytest.mark.parametrize("per_kind", [None, 2])
def test_batch_candidates_are_each_kinds_best_of_the_rows(per_kind):
    images, out = fake_batch(40, seed=6, multilabel=False)
    out["predicted_class"][:] = np.arange(40) % 2  # few (class, ninth) kinds, each with several images
    batch = ExplainedBatch.from_output(images, out)
    rows, exact = heatmap_batch(batch, method="gradcam", target_layer="conv")
    source = exemplar_batch(rows, exact, batch)
    got: dict = {}
    for kind, c in batch_candidates(source, per_kind):
        got.setdefault(kind, []).append(c)
    # The reference: every rank-0 row's candidates, from the dict rows.
    attention = batch_attention(out, images)
    want: dict = {}
    for i, item in enumerate(images):
        result = _explained(item, out, i, attention)
        if result.error is None:
            first = heatmap_rows(result, method="gradcam", target_layer="conv")[0]
            for kind, c in audit_candidates(first, item.raw_record, item.boxes):
                want.setdefault(kind, []).append(c)
    assert set(got) == set(want) and any(k.startswith("flag:") for k in want) and len(want) > 4
    for kind, candidates in want.items():
        best = sorted(candidates, key=rank_key, reverse=True)
        if per_kind is not None:
            best = best[:per_kind]
        mine = got[kind]
        assert [c.image_id for c in mine] == [c.image_id for c in best], kind
        assert sum(c.count for c in mine) == len(candidates)
        for a, b in zip(mine, best, strict=True):
            assert a.score == b.score and a.raw_record == b.raw_record and a.boxes == b.boxes
            fields = dict(b.fields, cam=pa.array(b.fields["cam"], pa.float32()).to_pylist())
            for name in ("box_mass", "box_concentration", "border_mass", "predicted_score"):  # float32 in the table
                if fields[name] is not None:
                    fields[name] = float(np.float32(fields[name]))
            assert a.fields == fields
    assert set(FLAG_RANKING) >= {k.split(":")[1] for k in got if k.startswith("flag:")}
