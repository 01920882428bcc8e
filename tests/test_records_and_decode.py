"""Reading shards (CRC, truncation, empty) and decoding records (every bad case).

Decoding is two steps: `DecodeImageExamples` (per record: Example, features,
header size check) and `decode_batch` (the model handler's batch decode);
`decode_one` runs both, so every bad case is checked whichever step finds it.
"""


import apache_beam as beam
import numpy as np
import pytest

from pipeline.demo import make_example
from tests.helpers import good_examples, jpeg_bytes, png_bytes, write_shard
from transforms.decode import BatchImageDecoder, DecodedImage, DecodeImageExamples, decode_batch
from transforms.error_rows import ERRORS_TAG, error_row
from transforms.image_header import read_header
from transforms.records import CorruptRecord, ReadShardRecords, ShardRecord, iter_records, read_record_at


def run_dofn(dofn, element):
    """Runs a DoFn's process() on one element: (main outputs, error rows)."""
    main, errors = [], []
    dofn.setup()
    for out in dofn.process(element):
        if isinstance(out, beam.pvalue.TaggedOutput):
            assert out.tag == ERRORS_TAG
            errors.append(out.value)
        else:
            main.append(out)
    return main, errors


def test_reads_every_record_with_position(tmp_path):
    path = write_shard(str(tmp_path), "a.tfrecord", [b"one", b"two", b"three"])
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [(r.index, r.data) for r in main] == [(0, b"one"), (1, b"two"), (2, b"three")]
    assert all(r.source == path for r in main) and errors == []


def test_crc_failure_skips_only_the_damaged_record(tmp_path):
    path = write_shard(str(tmp_path), "bad.tfrecord", [b"first", b"second", b"third"])
    data = bytearray(open(path, "rb").read())
    second_start = 12 + 5 + 4
    data[second_start + 12 + 2] ^= 0xFF  # a byte inside "second"
    open(path, "wb").write(bytes(data))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [(r.index, r.data) for r in main] == [(0, b"first"), (2, b"third")]
    (error,) = errors
    assert (error["stage"], error["error"], error["record_index"]) == ("read", "CorruptRecord", 1)
    second_length = 12 + 6 + 4
    assert error["raw_record"] == bytes(data[second_start : second_start + second_length])
    assert "CRC" in error["message"] and f"at byte {second_start}" in error["message"]
    assert f"span of {second_length} bytes" in error["message"]


def test_offsets_read_each_record_again_also_after_damage_and_in_compressed_shards(tmp_path):
    """ShardRecord.offset: read_record_at(source, offset) returns the same bytes (one seek, CRCs checked),
    past a damaged record and in a .gz shard; an offset where no record starts is a clear error."""
    import gzip

    records = [b"first", b"second" * 50, b"third", b"fourth"]
    path = write_shard(str(tmp_path), "bad.tfrecord", records)
    data = bytearray(open(path, "rb").read())
    data[12 + 5 + 4 + 12 + 2] ^= 0xFF  # inside record 1
    open(path, "wb").write(bytes(data))
    zipped = str(tmp_path / "z.tfrecord.gz")
    with open(path, "rb") as raw, gzip.open(zipped, "wb") as out:
        out.write(raw.read())
    for source in (path, zipped):
        main, errors = run_dofn(ReadShardRecords(), source)
        assert [r.index for r in main] == [0, 2, 3] and len(errors) == 1
        assert [read_record_at(source, r.offset) for r in main] == [records[0], records[2], records[3]]
    with pytest.raises(ValueError, match="no intact record at byte 3"):
        read_record_at(path, 3)


def test_truncated_shard(tmp_path):
    path = write_shard(str(tmp_path), "cut.tfrecord", [b"first", b"second"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-3])
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.data for r in main] == [b"first"]
    (error,) = errors
    assert error["error"] == "CorruptRecord" and "truncated" in error["message"]
    assert error["raw_record"] == data[21:-3] and error["record_index"] == 1


def test_iter_records_reads_a_whole_file_and_stops_at_the_first_damage(tmp_path):
    """iter_records (a plain file's records, for the benches) checks what ReadShardRecords checks."""
    path = write_shard(str(tmp_path), "a.tfrecord", [b"one", b"two", b"three"])
    data = open(path, "rb").read()
    with open(path, "rb") as handle:
        assert list(iter_records(handle)) == [b"one", b"two", b"three"]
    for damaged, message in ((data[:-3], "truncated record"), (data[:5], "truncated record header"),
                             (data[:12 + 2] + b"X" + data[12 + 3:], "CRC mismatch in the record data"),
                             (b"\xff" + data[1:], "CRC mismatch in the record length")):
        open(path, "wb").write(damaged)
        with open(path, "rb") as handle, pytest.raises(CorruptRecord, match=message):
            list(iter_records(handle))


def test_empty_shard(tmp_path):
    path = str(tmp_path / "empty.tfrecord")
    open(path, "wb").close()
    main, errors = run_dofn(ReadShardRecords(), path)
    assert main == [] and errors[0]["error"] == "EmptyShard" and errors[0]["record_index"] is None


def decoder(**overrides):
    settings = dict(image_key="image/encoded", label_key="image/class/label", id_key="image/filename",
                    label_offset=0, num_classes=3, max_image_pixels=100_000, require_label=False)
    settings.update(overrides)
    return DecodeImageExamples(**settings)


_BATCH_DECODERS: dict = {}


def batch_decoder(shape=(32, 32, 3)) -> BatchImageDecoder:
    if shape not in _BATCH_DECODERS:
        _BATCH_DECODERS[shape] = BatchImageDecoder(shape)
    return _BATCH_DECODERS[shape]


def decode_records(records, shape=(32, 32, 3), **overrides):
    """Both decode steps over records: (decoded images, error rows), as the pipeline makes them."""
    checked, errors = [], []
    dofn = decoder(**overrides)
    for record in records:
        main, rejected = run_dofn(dofn, record)
        checked += main
        errors += rejected
    _, images, failed = decode_batch(batch_decoder(shape), checked)
    errors += [error_row(source=item.source, record_index=item.record_index, image_id=item.image_id,
                         stage="decode", error=exc.error, message=exc.message, raw_record=item.raw_record)
               for item, exc in failed]
    return images, errors


def decode_one(data: bytes, **overrides):
    return decode_records([ShardRecord("gs://b/s-0.tfrecord", 4, data)], **overrides)


def test_good_record_is_resized_with_metadata():
    (image,), errors = decode_one(good_examples(1, "x", size=48)[0])
    assert errors == [] and isinstance(image, DecodedImage)
    assert image.pixels.shape == (32, 32, 3) and image.pixels.dtype == np.float32
    assert (image.image_id, image.label, image.record_index) == ("x-0", 0, 4)
    np.testing.assert_allclose(image.boxes, [(0.1, 0.1, 0.6, 0.7)], rtol=1e-6)
    assert (image.image_height, image.image_width) == (48, 48)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_grey_and_rgba_are_converted(channels):
    (image,), errors = decode_one(make_example(png_bytes(32, 32, channels), label=1))
    assert errors == [] and image.pixels.shape == (32, 32, 3)


def test_id_defaults_to_shard_and_index():
    (image,), _ = decode_one(make_example(png_bytes(32, 32), label=1))
    assert image.image_id == "s-0.tfrecord:4"


def test_label_offset():
    (image,), _ = decode_one(make_example(png_bytes(32, 32), label=3), label_offset=1)
    assert image.label == 2


JPEG = jpeg_bytes(40, 40)


@pytest.mark.parametrize(
    "data, overrides, error",
    [
        (b"\x08\x96\x01garbage", {}, "InvalidExample"),
        (make_example(b"", label=1), {}, "MissingFeature"),
        (make_example(png_bytes(32, 32)), {"require_label": True}, "MissingFeature"),
        (make_example(b"plain text, no image", label=1), {}, "UndecodableImage"),
        (make_example(JPEG[: len(JPEG) // 2], label=1), {}, "UndecodableImage"),
        (make_example(png_bytes(32, 32)[:60], label=1), {}, "UndecodableImage"),
        (make_example(png_bytes(400, 300), label=1), {}, "ImageTooLarge"),
        (make_example(png_bytes(32, 32), label=7), {}, "LabelOutOfRange"),
    ],
    ids=["not-example", "no-image", "no-label", "not-image", "truncated-jpeg", "truncated-png", "too-large",
         "label-range"],
)
def test_bad_records_become_error_rows(data, overrides, error):
    main, (row,) = decode_one(data, **overrides)
    assert main == []
    assert (row["stage"], row["error"], row["record_index"]) == ("decode", error, 4)
    assert row["raw_record"] == data and row["message"]


def test_size_is_read_from_the_header_before_decoding():
    assert read_header(png_bytes(30, 20))[1:3] == (20, 30)
    assert read_header(jpeg_bytes(30, 20))[1:3] == (20, 30)
    # A PNG header claiming 100000 x 100000 is rejected without decoding.
    fake = bytearray(png_bytes(8, 8))
    fake[16:24] = (100_000).to_bytes(4, "big") * 2
    _, (row,) = decode_one(make_example(bytes(fake), label=0))
    assert row["error"] == "ImageTooLarge"


def test_decoder_pickles_small():
    import pickle

    assert len(pickle.dumps(decoder())) < 2000


def test_fan_out_records_keeps_every_record_once():
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.records import FanOutRecords

    records = [ShardRecord("s", i, bytes([i]) * 3) for i in range(50)] + [ShardRecord("s", 0, b"\x00" * 3)]
    with TestPipeline(runner="FnApiRunner") as p:
        assert_that(p | beam.Create(records) | FanOutRecords(), equal_to(records))
