"""Shared fixtures: a small saved model and a dataset with every kind of bad input."""

import os

import pytest

from pipeline.demo import make_example
from tests.helpers import good_examples, jpeg_bytes, png_bytes, small_functional, write_shard
from tests.infra.portable import loopback_only_grpc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Beam's in-process runner opens its gRPC control/data/state/logging servers
# on [::]:0 for multi-process workers; in the tests every server binds 127.0.0.1.
loopback_only_grpc()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "small.keras")
    small_functional().save(path)
    return path


BAD_RECORDS = {
    # image_id -> the error kind it must produce
    "bad-truncated-jpeg": "UndecodableImage",
    "bad-not-an-image": "UndecodableImage",
    "bad-too-large": "ImageTooLarge",
    "bad-label": "LabelOutOfRange",
    "bad-no-image": "MissingFeature",
}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Shards with good images, every bad-record case, a corrupt, a truncated and an empty shard.

    Returns a dict with the glob, and the expected counts.
    """
    folder = str(tmp_path_factory.mktemp("data"))
    jpeg = jpeg_bytes(40, 40)
    grey = make_example(png_bytes(36, 36, channels=1), label=1, image_id="grey-png")
    rgba = make_example(png_bytes(30, 30, channels=4), label=2, image_id="rgba-png")
    jpg = make_example(jpeg_bytes(50, 40), label=0, image_id="rgb-jpeg")
    bad = [
        make_example(jpeg[: len(jpeg) // 2], label=0, image_id="bad-truncated-jpeg"),
        make_example(b"hello", label=0, image_id="bad-not-an-image"),
        make_example(png_bytes(1200, 1000, channels=1), label=0, image_id="bad-too-large"),
        make_example(png_bytes(32, 32), label=9, image_id="bad-label"),
        make_example(b"", label=0, image_id="bad-no-image"),
        b"\x08\x96\x01 not an Example",
    ]
    write_shard(folder, "data-00000.tfrecord", good_examples(10, "a") + [grey, rgba, jpg])
    write_shard(folder, "data-00001.tfrecord", good_examples(8, "b", seed=100) + bad)
    # A shard whose third record fails its CRC: the reader skips it and keeps the other three.
    corrupt = write_shard(folder, "data-00002.tfrecord", good_examples(4, "c", seed=200))
    data = bytearray(open(corrupt, "rb").read())
    offset, kept = 0, 0
    for _ in range(2):
        length = int.from_bytes(data[offset : offset + 8], "little")
        offset += 12 + length + 4
        kept += 1
    data[offset + 12 + 5] ^= 0x55
    open(corrupt, "wb").write(bytes(data))
    kept += 1  # c-3, read after the damaged span
    # A truncated shard: three whole records, then half of the fourth.
    cut = write_shard(folder, "data-00003.tfrecord", good_examples(4, "d", seed=300))
    raw = open(cut, "rb").read()
    open(cut, "wb").write(raw[: len(raw) - 40])
    open(os.path.join(folder, "data-00004.tfrecord"), "wb").close()
    return {
        "pattern": os.path.join(folder, "data-*.tfrecord"),
        "good": 10 + 3 + 8 + kept + 3,
        "bad": len(bad),
        "shard_errors": 3,
        "records": 10 + 3 + 8 + len(bad) + kept + 3,
    }


# The demo's nightly runs (history, comparison, flags, report tests).
from tests.audit_fixtures import demo_runs  # noqa: E402, F401
