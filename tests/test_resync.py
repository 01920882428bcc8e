"""Reading past damage: the next good record is found and reading goes on (transforms/records.py)."""

import os
import struct
import time

import numpy as np
import pytest

from tests.test_records_and_decode import run_dofn
from transforms.records import (
    RAW_RECORD_CAP,
    ReadShardRecords,
    find_next_record,
    header_candidates,
    masked_crc32c,
    masked_length_crcs,
    write_records,
)


def record_offsets(records):
    offsets, offset = [], 0
    for data in records:
        offsets.append(offset)
        offset += 12 + len(data) + 4
    return offsets


def shard(tmp_path, records, name="s.tfrecord"):
    path = str(tmp_path / name)
    write_records(path, records)
    return path, bytearray(open(path, "rb").read())


def test_vectorised_length_crc_equals_google_crc32c():
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 4096, dtype=np.uint8)
    starts = np.arange(0, 4096 - 8, 37, dtype=np.int64)
    expected = [masked_crc32c(buf[s : s + 8].tobytes()) for s in starts]
    assert masked_length_crcs(buf, starts).tolist() == expected


def test_header_candidates_find_every_record_start():
    records = [bytes(range(n % 256)) * 3 for n in (5, 0, 300, 77)]
    framed = b"".join(struct.pack("<Q", len(d)) + struct.pack("<I", masked_crc32c(struct.pack("<Q", len(d))))
                      + d + struct.pack("<I", masked_crc32c(d)) for d in records)
    found = header_candidates(framed, 0, len(framed)).tolist()
    assert set(record_offsets(records)) <= set(found)


def test_one_flipped_byte_in_record_5_of_20(tmp_path):
    records = [f"record-{i}".encode() * (i + 1) for i in range(20)]
    path, data = shard(tmp_path, records)
    start = record_offsets(records)[5]
    data[start + 12 + 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.index for r in main] == [i for i in range(20) if i != 5]
    assert [r.data for r in main] == records[:5] + records[6:]
    (error,) = errors
    assert (error["stage"], error["error"], error["record_index"]) == ("read", "CorruptRecord", 5)
    assert error["raw_record"] == bytes(data[start : start + 12 + len(records[5]) + 4])


def test_flipped_length_byte_resyncs_at_the_next_record(tmp_path):
    records = [os.urandom(1000) for _ in range(6)]
    path, data = shard(tmp_path, records)
    start = record_offsets(records)[2]
    data[start] ^= 0x40  # the length itself: its CRC fails, the length cannot be trusted
    open(path, "wb").write(bytes(data))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.data for r in main] == records[:2] + records[3:]
    assert errors[0]["record_index"] == 2 and "length" in errors[0]["message"]
    assert len(errors[0]["raw_record"]) == 1016


def test_truncated_last_record(tmp_path):
    records = [os.urandom(500) for _ in range(5)]
    path, data = shard(tmp_path, records)
    open(path, "wb").write(bytes(data[:-100]))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.data for r in main] == records[:4]
    (error,) = errors
    assert error["record_index"] == 4 and "truncated" in error["message"]
    assert error["raw_record"] == bytes(data[record_offsets(records)[4] : -100])


def test_garbage_between_records_is_one_span(tmp_path):
    records = [os.urandom(300) for _ in range(4)]
    path, data = shard(tmp_path, records)
    cut = record_offsets(records)[2]
    garbage = bytes(2000) + os.urandom(3000)  # zeros look like lengths; their CRCs do not check
    open(path, "wb").write(bytes(data[:cut]) + garbage + bytes(data[cut:]))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.data for r in main] == records
    assert [r.index for r in main] == [0, 1, 3, 4]  # the span took index 2
    (error,) = errors
    assert error["raw_record"] == garbage and f"span of {len(garbage)} bytes" in error["message"]


def test_200_mb_shard_damaged_at_its_first_record(tmp_path):
    rng = np.random.default_rng(1)
    first = rng.bytes(100 << 20)
    rest = [rng.bytes(4 << 20) for _ in range(25)]
    path = str(tmp_path / "big.tfrecord")
    write_records(path, [first, *rest])
    assert os.path.getsize(path) > 200 * 10**6
    with open(path, "r+b") as handle:  # damage the first record's length: the scan crosses 100 MiB
        handle.seek(1)
        handle.write(b"\x7f")
    del first
    started = time.perf_counter()
    main, errors = run_dofn(ReadShardRecords(), path)
    seconds = time.perf_counter() - started
    assert [r.index for r in main] == list(range(1, 26))
    assert all(r.data == d for r, d in zip(main, rest, strict=True))
    (error,) = errors
    assert len(error["raw_record"]) == RAW_RECORD_CAP
    assert f"span of {12 + (100 << 20) + 4} bytes" in error["message"]
    assert seconds < 60, f"reading past 100 MiB of damage took {seconds:.1f} s"


def test_find_next_record_returns_the_end_when_nothing_checks(tmp_path):
    path = str(tmp_path / "noise.bin")
    noise = bytes(10_000) + os.urandom(50_000)
    open(path, "wb").write(noise)
    with open(path, "rb") as handle:
        assert find_next_record(handle, 0, len(noise)) == len(noise)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_scan_finds_a_record_straddling_chunk_edges(tmp_path, monkeypatch, chunk):
    import transforms.records as records_module

    monkeypatch.setattr(records_module, "_SCAN_CHUNK", chunk)
    records = [os.urandom(40) for _ in range(8)]
    path, data = shard(tmp_path, records)
    offsets = record_offsets(records)
    with open(path, "rb") as handle:
        assert find_next_record(handle, offsets[3] + 1, len(data)) == offsets[4]


def test_gzip_shard_is_read_and_resynchronised(tmp_path):
    import gzip

    records = [f"gz-{i}".encode() * 20 for i in range(6)]
    plain, data = shard(tmp_path, records)
    data[record_offsets(records)[3] + 12 + 4] ^= 0x08
    path = str(tmp_path / "s.tfrecord.gz")
    with gzip.open(path, "wb") as handle:
        handle.write(bytes(data))
    main, errors = run_dofn(ReadShardRecords(), path)
    assert [r.data for r in main] == records[:3] + records[4:]
    assert [e["record_index"] for e in errors] == [3]
