"""Multi-label records and targets (README "Multi-label").

A tiny CNN with a sigmoid head is trained here (seeded, ~20-40 s on 2 busy
cores) on images holding up to two of the demo's four shapes
(`pipeline.demo._shape_mask` on `_background`), each shape's box in the
record. Then the job runs with `--label_format index --target labels`:

- one heatmap row per true label (an image without labels: one fallback row);
- each map's peak lies on its own shape: the test asserts that at least 80%
  of the two-shape rows peak inside (within the pointing tolerance of) the
  box of the shape they explain (measured: see the assertion message);
- class_stats' support, precision, recall, F1 and mean score equal a hand
  computation from the rank-0 rows' scores and labels;
- a label index out of range and a missing label feature are error rows
  with their bytes.

Plus: decoding multi-hot vectors (wrong length, not 0/1), `above:T` with one
compiled function for any number of classes above T, and the per-run errors
(exit status 2, one line).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.demo import _background, _shape_mask, encode
from tests.helpers import read_parquet_dir, write_shard

SIZE = 40
NUM_CLASSES = 4  # the demo's shapes: circle, square, triangle, cross
TINTS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.float64)
TOLERANCE_PX = 3  # the pointing game's tolerance here (--pointing_tolerance; the default 15 px is for photos)


def make_image(rng: np.random.Generator, classes):
    """An image [SIZE, SIZE, 3] uint8 with one shape per class (apart), and each shape's box (fractions)."""
    image = _background(rng, SIZE)
    boxes, placed = {}, []
    for kind in classes:
        for _ in range(100):
            r = rng.uniform(0.15, 0.2) * SIZE
            cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 3) ** 2 for y, x, q in placed):
                break
        placed.append((cy, cx, r))
        # Half the shape's colour is its class's tint: the tiny model learns in seconds, and the tint is on
        # the shape only, so a map on the right place is still what the test asks for.
        image[_shape_mask(int(kind), SIZE, cy, cx, r)] = 0.5 * TINTS[int(kind)] + 0.5 * rng.uniform(0, 255, 3)
        boxes[int(kind)] = tuple(min(max(v / SIZE, 0.0), 1.0) for v in (cy - r, cx - r, cy + r, cx + r))
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def label_sets(rng: np.random.Generator, n: int) -> list[tuple]:
    """Mostly two distinct shapes, some one, a few none."""
    out = []
    for i in range(n):
        count = 0 if i % 20 == 0 else (1 if i % 5 == 0 else 2)
        out.append(tuple(sorted(rng.choice(NUM_CLASSES, count, replace=False).tolist())))
    return out


def example(image_bytes: bytes, image_id: str, boxes: dict, labels=None, label_key="image/class/label") -> bytes:
    """A tf.train.Example: the labels as an int64 list, each shape's box with its class."""
    import tensorflow as tf

    f = tf.train.Feature
    feature = {"image/encoded": f(bytes_list=tf.train.BytesList(value=[image_bytes])),
               "image/filename": f(bytes_list=tf.train.BytesList(value=[image_id.encode()]))}
    if labels is not None:
        feature[label_key] = f(int64_list=tf.train.Int64List(value=[int(v) for v in labels]))
    classes = sorted(boxes)
    feature["image/object/class/label"] = f(int64_list=tf.train.Int64List(value=classes))
    for i, name in enumerate(("ymin", "xmin", "ymax", "xmax")):
        feature[f"image/object/bbox/{name}"] = f(float_list=tf.train.FloatList(value=[boxes[c][i] for c in classes]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def build_model():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)  # 20x20 maps
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="sigmoid", name="tags")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(path of the .keras model, training seconds, training binary accuracy)."""
    import time

    import keras
    from tensorflow.python.framework import config

    deterministic = config.is_op_determinism_enabled()
    config.enable_op_determinism()
    try:
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(3)
        sets = label_sets(rng, 1000)
        images = np.stack([make_image(rng, s)[0] for s in sets]).astype("float32")
        hot = np.zeros((len(sets), NUM_CLASSES), "float32")
        for i, s in enumerate(sets):
            hot[i, list(s)] = 1
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy", metrics=["binary_accuracy"])
        started = time.time()
        history = model.fit(images, hot, batch_size=32, epochs=8, verbose=0)
        seconds = time.time() - started
    finally:
        if not deterministic:
            config.disable_op_determinism()
    path = str(tmp_path_factory.mktemp("ml_model") / "tags.keras")
    model.save(path)
    return path, seconds, float(history.history["binary_accuracy"][-1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 good records (index lists) over two shards + one index out of range + one without labels."""
    rng = np.random.default_rng(11)
    folder = str(tmp_path_factory.mktemp("ml_data"))
    truth, records = {}, []
    for i, labels in enumerate(label_sets(rng, 60)):
        image, boxes = make_image(rng, labels)
        image_id = f"ml-{i:03d}"
        truth[image_id] = (labels, boxes)
        records.append(example(encode(image), image_id, boxes, labels))
    image, boxes = make_image(rng, (1,))
    bad = {"ml-bad-index": example(encode(image), "ml-bad-index", boxes, [1, 7]),
           "ml-no-labels": example(encode(image), "ml-no-labels", boxes, None)}
    write_shard(folder, "ml-00000.tfrecord", records[:30] + [bad["ml-bad-index"]])
    write_shard(folder, "ml-00001.tfrecord", records[30:] + [bad["ml-no-labels"]])
    return {"pattern": os.path.join(folder, "*.tfrecord"), "truth": truth, "bad": bad}


@pytest.fixture(scope="module")
def audited(trained, dataset, tmp_path_factory):
    from pipeline.graph import run

    output = tmp_path_factory.mktemp("ml_out")
    _, manifest = run(["--input", dataset["pattern"], "--model", trained[0], "--output", str(output),
                       "--run_id", "ml", "--label_format", "index", "--target", "labels", "--batch_size", "16",
                       "--sanity_images", "0", "--faithfulness_sample", "0.2",
                       "--pointing_tolerance", str(TOLERANCE_PX), "--quiet"])
    run_dir = output / "run=ml"
    tables = {name: read_parquet_dir(str(run_dir / name)) for name in ("heatmaps", "class_stats", "errors")}
    tables["report"] = (run_dir / "report.html").read_text()
    return tables, manifest


def in_box(y, x, box, tolerance: float = TOLERANCE_PX / SIZE) -> bool:
    """The pointing game against one box (a map without mass has no peak: a miss)."""
    if y is None:
        return False
    ymin, xmin, ymax, xmax = box
    dy = max(ymin - y, 0.0, y - ymax)
    dx = max(xmin - x, 0.0, x - xmax)
    return dy * dy + dx * dx <= tolerance * tolerance


def test_one_row_per_true_label_each_map_on_its_own_shape(trained, audited, dataset):
    tables, manifest = audited
    rows = tables["heatmaps"].to_pylist()
    truth = dataset["truth"]
    assert manifest["counts"]["images_explained"] == len(truth) and manifest["counts"]["balanced"]
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    assert set(by_image) == set(truth)
    for image_id, image_rows in by_image.items():
        labels, _ = truth[image_id]
        image_rows.sort(key=lambda r: r["target_rank"])
        assert [r["target_rank"] for r in image_rows] == list(range(len(image_rows)))
        assert all(r["labels"] == list(labels) and r["label"] is None for r in image_rows)
        if labels:  # one row per true label, by descending score
            assert sorted(r["target_class"] for r in image_rows) == list(labels)
            assert all(r["target_is_label"] for r in image_rows)
            scores = [r["target_score"] for r in image_rows]
            assert scores == sorted(scores, reverse=True)
        else:  # no label: one row, the top-scoring class
            assert len(image_rows) == 1 and image_rows[0]["target_is_label"] is False
            assert image_rows[0]["target_class"] == image_rows[0]["predicted_class"]
        first = image_rows[0]
        assert len(first["scores"]) == NUM_CLASSES and all(r["scores"] is None for r in image_rows[1:])
        assert first["predicted_labels"] == [c for c, s in enumerate(first["scores"]) if s >= np.float32(0.5)]
    # Each map peaks on its own shape: the peak within the pointing tolerance of the box of the shape it
    # explains, on images with two shapes (where the other shape is the obvious wrong place).
    pairs = [r for r in rows if len(truth[r["image_id"]][0]) == 2]
    own = [in_box(r["peak_y"], r["peak_x"], truth[r["image_id"]][1][r["target_class"]]) for r in pairs]
    other = [in_box(r["peak_y"], r["peak_x"], truth[r["image_id"]][1][next(
        c for c in truth[r["image_id"]][0] if c != r["target_class"])], tolerance=0.0) for r in pairs]
    share, wrong = float(np.mean(own)), float(np.mean(other))
    message = (f"{sum(own)}/{len(own)} maps peak on their own shape ({share:.2f}), {sum(other)} inside the other "
               f"shape's box ({wrong:.2f}); model trained in {trained[1]:.0f} s, binary accuracy {trained[2]:.3f}")
    print(message, f"; {sum(r['cam_max'] == 0 for r in rows)} of {len(rows)} maps without mass")
    assert len(pairs) >= 60 and share >= 0.8 and wrong <= 0.1, message


def test_class_stats_match_a_hand_computation(audited):
    tables, _ = audited
    first = [r for r in tables["heatmaps"].to_pylist() if r["target_rank"] == 0]
    stats = {r["class_id"]: r for r in tables["class_stats"].to_pylist()}
    assert set(stats) == set(range(NUM_CLASSES))
    for c in range(NUM_CLASSES):
        truth = np.array([c in r["labels"] for r in first])
        scores = np.array([r["scores"][c] for r in first], np.float32)
        predicted = scores >= np.float32(0.5)
        tp = int((truth & predicted).sum())
        precision = tp / predicted.sum() if predicted.sum() else None
        recall = tp / truth.sum()
        s = stats[c]
        assert s["threshold"] == 0.5
        assert (s["support"], s["num_labelled"], s["num_predicted"], s["num_correct"]) == (
            truth.sum(), truth.sum(), predicted.sum(), tp)
        assert s["precision"] == pytest.approx(precision) and s["recall"] == pytest.approx(recall)
        assert s["accuracy"] == pytest.approx(recall)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert s["f1"] == pytest.approx(f1)
        assert s["mean_score"] == pytest.approx(float(scores.astype(np.float64).mean()), rel=1e-6)
        targeted = [r for r in tables["heatmaps"].to_pylist() if r["target_class"] == c]
        assert s["num_targeted"] == len(targeted) and s["mean_cam"] is not None
        assert s["top_confusions"] == []


def test_report_shows_precision_recall_and_f1_per_class(audited):
    """The report's class table of a multi-label run: support, precision, recall and F1 as class_stats has them."""
    import re

    tables, _ = audited
    html = tables["report"]
    assert "<th>recall</th><th>F1</th>" in html
    for s in tables["class_stats"].to_pylist():
        row = re.search(rf"<tr class='[^']*' data-class='{s['class_id']}'>(.*?)</tr>", html).group(1)
        for column in ("precision", "recall", "f1"):
            shown = re.search(rf"<td class={column}>([^<]*)</td>", row).group(1)
            assert shown == ("-" if s[column] is None else f"{s[column]:.2f}"), (s["class_id"], column, shown)


def test_bad_records_are_error_rows_with_their_bytes(audited, dataset):
    tables, _ = audited
    errors = {e["image_id"]: e for e in tables["errors"].to_pylist()}
    assert set(errors) == set(dataset["bad"])
    assert errors["ml-bad-index"]["error"] == "LabelOutOfRange" and "7" in errors["ml-bad-index"]["message"]
    assert errors["ml-no-labels"]["error"] == "MissingFeature"
    assert "--target labels" in errors["ml-no-labels"]["message"]
    for image_id, raw in dataset["bad"].items():
        assert errors[image_id]["raw_record"] == raw and errors[image_id]["stage"] == "decode"


def test_schemas_are_the_multilabel_variants(audited):
    from transforms.schemas import MULTILABEL_CLASS_STATS_SCHEMA, MULTILABEL_HEATMAP_SCHEMA

    tables, _ = audited
    assert tables["heatmaps"].schema.equals(MULTILABEL_HEATMAP_SCHEMA)
    assert tables["class_stats"].schema.equals(MULTILABEL_CLASS_STATS_SCHEMA)


def test_multi_hot_records_are_checked():
    from transforms.decode import DecodeImageExamples
    from transforms.records import ShardRecord

    decode = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label", id_key="image/filename",
                                 label_offset=0, num_classes=NUM_CLASSES, max_image_pixels=10**6,
                                 require_label=True, label_format="multi_hot")
    image, boxes = make_image(np.random.default_rng(0), (0, 2))
    png = encode(image)

    def one(labels):
        data = example(png, "x", boxes, labels)
        out = list(decode.process(ShardRecord("s.tfrecord", 0, data)))
        assert len(out) == 1
        return out[0], data

    good, _ = one([1, 0, 1, 0])
    assert good.labels == (0, 2) and good.label is None
    assert one([0, 0, 0, 0])[0].labels == ()
    for labels, words in (([1, 0, 1], "expected a multi-hot vector of 4 values (the model's classes), found 3"),
                          ([1, 0, 2, 0], "expected a multi-hot vector of 0/1, found [2]")):
        tagged, data = one(labels)
        row = tagged.value
        assert (row["error"], row["stage"], row["raw_record"]) == ("InvalidLabel", "decode", data)
        assert words in row["message"] and "\n" not in row["message"]


def test_above_threshold_rows_with_one_trace(trained):
    """`above:T`: one row per class scoring >= T (the top one when none does), any count, one trace."""
    import keras

    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import parse_target
    from transforms.decode import DecodedImage
    from transforms.model_handler import explain_decoded

    explainer = CamExplainer(keras.models.load_model(trained[0]), target=parse_target("above:0.3"))
    rng = np.random.default_rng(5)
    sets = [(), (1,), (0, 3), (2, 3), (0, 1), (2,)]
    pixels = np.stack([make_image(rng, s)[0] for s in sets]).astype(np.float32)
    items = [DecodedImage("s", i, f"a-{i}", None, (), SIZE, SIZE, pixels[i], b"", labels=None)
             for i in range(len(sets))]
    scores = explainer(pixels)["scores"]
    for batch in (slice(0, 6), slice(0, 1), slice(2, 5)):
        results = explain_decoded(explainer, pixels[batch], items[batch], multilabel=True)
        for result in results:
            s = scores[result.image.record_index]
            above = sorted(np.flatnonzero(s >= np.float32(0.3)).tolist(), key=lambda c: -s[c])
            assert result.target_class.tolist() == (above or [int(s.argmax())])
            assert result.cam.shape[0] == len(result.target_class) == len(result.attention)
    assert explainer.explain.experimental_get_tracing_count() == 1
    assert explainer.target.k == NUM_CLASSES  # --max_targets 8 capped at the class count


def test_per_run_errors_exit_2_with_one_line(trained, dataset, tmp_path, capsys):
    from tests.audit_fixtures import audit_cli
    from tests.helpers import small_functional

    softmax = str(tmp_path / "softmax.keras")
    small_functional(num_classes=NUM_CLASSES, size=SIZE).save(softmax)
    base = ["--input", dataset["pattern"], "--output", str(tmp_path / "out"), "--report=false"]
    cases = [
        ([*base, "--model", trained[0], "--target", "labels"], "--target labels explains every true label"),
        ([*base, "--model", trained[0], "--target", "label", "--label_format", "multi_hot"], "use --target labels"),
        ([*base, "--model", softmax, "--target", "above:0.5"], "needs a sigmoid head"),
        ([*base, "--model", trained[0], "--target", "above:1.5"], "0 < T <= 1"),
    ]
    for args, words in cases:
        code, manifest = audit_cli(args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and manifest is None, (args, err)
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_labels_from_index_lists_or_multi_hot_arrays(trained):
    import keras

    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import parse_target

    explainer = CamExplainer(keras.models.load_model(trained[0]), target=parse_target("labels", max_targets=2))
    sets = [(0, 3), (), (1,), (0, 1, 2)]
    pixels = np.stack([make_image(np.random.default_rng(i), s)[0] for i, s in enumerate(sets)]).astype(np.float32)
    hot = np.zeros((len(sets), NUM_CLASSES), np.int32)
    for i, s in enumerate(sets):
        hot[i, list(s)] = 1
    from_lists, from_hot = explainer(pixels, [list(s) for s in sets]), explainer(pixels, hot)
    for key in ("target_class", "target_valid", "cam"):
        np.testing.assert_array_equal(from_lists[key], from_hot[key])
    valid, targets, scores = from_lists["target_valid"], from_lists["target_class"], from_lists["scores"]
    assert valid.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    assert set(targets[0]) == {0, 3} and targets[2][0] == 1
    assert targets[1][0] == scores[1].argmax()  # no label: the top-scoring class, once
    assert set(targets[3]) <= {0, 1, 2} and scores[3][targets[3][0]] >= scores[3][targets[3][1]]  # capped at 2
