"""The batched decode in the model handler: bad images inside batches, channels, one trace.

Reference: each image decoded on its own, eagerly (`tf.io.decode_image` +
cast + bilinear resize, the previous per-record path), and explained alone.
Tolerances: pixels equal to 1e-4 (same kernels, batched); CAMs of an image
explained in a batch with a bad neighbour vs alone: 1e-5 * max + 1e-7.
"""

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf

from pipeline.demo import make_example
from tests.helpers import good_examples, jpeg_bytes, png_bytes, read_parquet_dir, write_shard
from transforms.decode import BatchImageDecoder, DecodeImageExamples, decode_batch
from transforms.error_rows import ERRORS_TAG
from transforms.heatmap_rows import FormatHeatmapRows
from transforms.model_handler import KerasCamModelHandler
from transforms.records import ShardRecord


def checked(records, source="s.tfrecord"):
    """DecodeImageExamples over raw records: [DecodedImage (encoded)], [error rows]."""
    dofn = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label", id_key="image/filename",
                               label_offset=0, num_classes=3, max_image_pixels=1_000_000, require_label=False)
    images, errors = [], []
    for i, data in enumerate(records):
        for out in dofn.process(ShardRecord(source, i, data)):
            (errors if isinstance(out, beam.pvalue.TaggedOutput) else images).append(out)
    return images, errors


def eager_pixels(encoded: bytes, shape) -> np.ndarray:
    """The reference: one image, eager, as the per-record DoFn used to do it."""
    image = tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32)
    if shape[2] == 1:
        image = tf.image.rgb_to_grayscale(image)
    return tf.image.resize(image, shape[:2], method="bilinear").numpy()


def header_lies_png() -> bytes:
    """A PNG whose IHDR (CRC fixed up) claims 20x20 while its data holds 16x16 pixels."""
    import zlib

    data = bytearray(png_bytes(16, 16, seed=5))
    data[16:24] = (20).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


JPEG = jpeg_bytes(40, 40, seed=1)
BAD = {
    "truncated-jpeg": JPEG[: len(JPEG) // 2],
    "truncated-png": png_bytes(32, 32, seed=2)[:80],
    "header-lies": header_lies_png(),
    "corrupt-jpeg-body": JPEG[:400] + bytes(len(JPEG) - 400),
    "not-an-image": b"plain text",  # the per-record check rejects it; here it also reaches the batch
}


@pytest.fixture(scope="module")
def worker(model_path):
    handler = KerasCamModelHandler(model_path, target_layer="last_conv")
    return handler, handler.load_model()


def test_one_bad_image_in_each_batch_is_one_error_row_and_the_rest_explained(worker):
    handler, loaded = worker
    good = good_examples(15, "g", seed=40)
    images, errors = checked(good)
    assert errors == [] and len(images) == 15
    bad_items = []
    for k, (name, data) in enumerate(BAD.items()):
        base = images[0]
        raw = make_example(data, label=0, image_id=f"bad-{name}")
        bad_items.append(base._replace(image_id=f"bad-{name}", record_index=100 + k, raw_record=raw, encoded=data,
                                       image_format="png" if data[:4] == b"\x89PNG" else "jpeg"))
    batches = []  # 5 batches of 4, the bad image at a different position in each
    for b, bad in enumerate(bad_items):
        batch = images[3 * b : 3 * b + 3]
        batch.insert(b % 4, bad)
        batches.append(batch)
    rows, error_rows = [], []
    fmt = FormatHeatmapRows(method="gradcam", target_layer="last_conv")
    explained = []
    for batch in batches:
        results = list(handler.run_inference(batch, loaded))
        assert [r.image.image_id for r in results] == [item.image_id for item in batch]
        explained += results
        for out in fmt.process(results):  # the batch's results: one Arrow batch of rows, an error row per bad image
            if isinstance(out, beam.pvalue.TaggedOutput):
                assert out.tag == ERRORS_TAG
                error_rows.append(out.value)
            else:
                rows += out.to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(item.image_id for item in images)
    assert len(error_rows) == len(BAD)
    by_id = {e["image_id"]: e for e in error_rows}
    for item in bad_items:
        row = by_id[item.image_id]
        assert (row["stage"], row["error"]) == ("decode", "UndecodableImage")
        assert row["raw_record"] == item.raw_record and row["record_index"] == item.record_index
        assert row["message"] and "Graph execution" not in row["message"]
    # Good images keep their pixels and CAMs: the same as each image decoded and explained alone.
    explainer = loaded.explainer
    for result in explained:
        if result.error is not None:
            continue
        reference = eager_pixels(result.image.encoded, (32, 32, 3))
        np.testing.assert_allclose(result.image.pixels, reference, atol=1e-4)
        alone = explainer(reference[None])["cam"][0]
        np.testing.assert_allclose(result.cam, alone, atol=1e-5 * np.abs(alone).max() + 1e-7, rtol=0)


def test_decoded_size_must_match_the_header():
    images, _ = checked(good_examples(3, "m", seed=7))
    lying = images[1]._replace(image_height=33)  # as if the header had said 32x33
    pixels, good, failed = decode_batch(BatchImageDecoder((32, 32, 3)), [images[0], lying, images[2]])
    assert [g.image_id for g in good] == ["m-0", "m-2"] and pixels.shape == (2, 32, 32, 3)
    assert np.shares_memory(good[0].pixels, pixels)
    ((item, exc),) = failed
    assert item.image_id == "m-1" and exc.error == "UndecodableImage"
    assert "header says 32x33, decoded 32x32" in exc.message


@pytest.mark.parametrize("shape", [(24, 20, 3), (24, 20, 1)])
def test_channels_and_size_follow_the_model(shape):
    sources = [png_bytes(30, 26, channels=c, seed=c) for c in (1, 2, 3, 4)] + [jpeg_bytes(50, 40)]
    images, _ = checked([make_example(data, label=0) for data in sources])
    pixels, good, failed = decode_batch(BatchImageDecoder(shape), images)
    assert failed == [] and pixels.shape == (5, *shape) and pixels.dtype == np.float32
    for item in good:
        np.testing.assert_allclose(item.pixels, eager_pixels(item.encoded, shape), atol=1e-4)
    if shape[2] == 3:  # grey is replicated, alpha dropped
        grey = good[0].pixels
        np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_one_trace_for_every_batch_size():
    decoder = BatchImageDecoder((16, 16, 3))
    data = [png_bytes(20, 20, seed=i) for i in range(7)]
    for n in (1, 7, 3):
        assert decoder(data[:n])[0].shape == (n, 16, 16, 3)
    assert decoder.tracing_count == 1


def test_pipeline_with_a_bad_image_in_several_batches(model_path, tmp_path):
    from pipeline.graph import run

    records = good_examples(16, "p", seed=60)
    bad_ids = []
    for position, (name, data) in zip((1, 6, 11, 17), list(BAD.items())[:4], strict=True):
        records.insert(position, make_example(data, label=0, image_id=f"bad-{name}"))
        bad_ids.append(f"bad-{name}")
    write_shard(str(tmp_path), "one-00000.tfrecord", records)
    _, manifest = run(["--input", str(tmp_path / "one-*.tfrecord"), "--model", model_path,
                       "--output", str(tmp_path / "out"), "--batch_size", "4", "--run_id", "t", "--no_report",
                       "--quiet"])
    counts = manifest["counts"]
    assert counts["images_explained"] == 16 and counts["records_rejected"] == {"decode": 4, "compute": 0}
    assert counts["records_read"] == counts["records_read_by_runner"] == 20 and counts["balanced"]
    errors = read_parquet_dir(str(tmp_path / "out" / "run=t" / "errors")).to_pylist()
    assert sorted(e["image_id"] for e in errors) == sorted(bad_ids)
    for e in errors:
        assert e["stage"] == "decode" and e["raw_record"] == records[e["record_index"]]


def test_explain_batches_overlaps_batches_and_loses_nothing(model_path):
    """ExplainBatches (the job's explaining step) called as a runner does: 11 images in batches of 4
    (two full batches run in the background while elements keep coming, the rest at the bundle's
    end), each batch one element: every image comes out once, in the global window, in the order it
    came (two batches decode at once, one is explained at a time), with the CAM the handler gives alone."""
    from apache_beam.transforms.window import GlobalWindow

    from transforms.model_handler import ExplainBatches, acquire_worker

    handler = KerasCamModelHandler(model_path, target_layer="last_conv", batch_size=4)
    images, _ = checked(good_examples(10, "e", seed=70))
    bad = images[0]._replace(image_id="bad-truncated", record_index=99, encoded=BAD["truncated-jpeg"])
    images.insert(5, bad)
    dofn = ExplainBatches(handler, depth=1)
    dofn.setup()
    try:
        dofn.start_bundle()
        streamed = [out for image in images for out in dofn.process(image)]
        emitted = streamed + list(dofn.finish_bundle())
    finally:
        dofn.teardown()
    # depth 1: submitting the second full batch waits for the first, which comes out (one element: the
    # batch) while elements are still arriving, not only at the bundle's end.
    assert len(streamed) >= 1
    assert all(out.windows == (GlobalWindow(),) for out in emitted)
    assert len(emitted) == 3  # one element per batch: 4 + 4 + 3 images
    assert dofn._decoders == 2
    assert [image.image_id for out in emitted for image in out.value.images] == \
        [image.image_id for image in images if image is not bad]
    results, cams, failed = {}, {}, {}
    for out in emitted:
        batch = out.value
        for j, image in enumerate(batch.images):
            results[image.image_id] = batch.predicted_class[j]
            cams[image.image_id] = batch.cam[batch.row_image == j]
        failed.update({r.image.image_id: r for r in batch.failed})
    assert len(results) + len(failed) == 11 and set(failed) == {"bad-truncated"}
    assert failed["bad-truncated"].error_stage == "decode" and failed["bad-truncated"].error[0] == "UndecodableImage"
    worker = acquire_worker(handler)
    for item in images:
        if item.image_id == "bad-truncated":
            continue
        (alone,) = handler.run_inference([item], worker)
        np.testing.assert_allclose(cams[item.image_id], alone.cam, atol=1e-5 * np.abs(alone.cam).max() + 1e-7,
                                   rtol=0)
        assert results[item.image_id] == alone.predicted_class
