"""Reading TFRecord shards while keeping every record's source and position.

Beam's ReadFromTFRecord drops where a record came from and fails the whole
job on a corrupt shard. `ReadShardRecords` reads one shard per call through
Beam's FileSystems (local, gs://, ...) and checks both CRCs of every record.
A record that is truncated or fails a CRC starts a *damaged span*: the
reader scans forward for the next byte offset where a whole record checks
(length CRC and data CRC, `find_next_record`) and goes on reading there.
Each damaged span becomes one error row (stage "read", error
"CorruptRecord") with its byte offset and length in the message and its
first `RAW_RECORD_CAP` bytes in `raw_record`.
"""

from __future__ import annotations

import io
import os
import random
import struct
from typing import Iterator, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.error_rows import ERRORS_TAG, error_row
from transforms.progress_tally import flush as flush_progress
from transforms.progress_tally import tally

_HEADER = 12  # uint64 length + masked crc32c of the length
_FOOTER = 4  # masked crc32c of the data
_MAX_RECORD_BYTES = 1 << 31
RAW_RECORD_CAP = 1 << 20  # bytes of a damaged span kept in its error row's raw_record (the first ones)
_SCAN_CHUNK = 8 << 20  # bytes read at a time while looking for the next good record
_CRC_CHUNK = 8 << 20  # bytes read at a time while checking a candidate record's data CRC
_MASK_DELTA = 0xA282EAD8


class ShardRecord(NamedTuple):
    """One serialized record and where it came from."""

    source: str
    index: int
    data: bytes
    offset: int = -1  # byte offset of the record's header in the (decompressed) shard; -1: not known


class DamagedSpan(NamedTuple):
    """Bytes [offset, offset + length) of a shard that hold no readable record."""

    offset: int
    length: int
    reason: str


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    return _mask(_crc32c(data))


class CorruptRecord(Exception):
    """A record whose framing or checksum is wrong."""


def iter_records(handle) -> Iterator[bytes]:
    """Yields the records of an open TFRecord file, checking both CRCs.

    Raises:
      CorruptRecord: at the first record that is truncated or fails a CRC.
    """
    while (checked := _read_record(handle)) is not None:
        if isinstance(checked, str):
            raise CorruptRecord(checked)
        yield checked


def _read_record(handle, left: Optional[int] = None) -> Union[bytes, str, None]:
    """The data of the record at the handle's position (both CRCs checked), why it is damaged (a str),
    or None when nothing is left to read.

    Args:
      left: the bytes from the position to the end of the file, when known: a record longer than
        that is truncated, found without reading its data.
    """
    header = handle.read(_HEADER)
    if not header:
        return None
    if len(header) < _HEADER:
        return f"truncated record header ({len(header)} of {_HEADER} bytes)"
    (length,) = struct.unpack("<Q", header[:8])
    if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
        return "CRC mismatch in the record length"
    if length > _MAX_RECORD_BYTES:
        return f"record length {length} exceeds {_MAX_RECORD_BYTES}"
    if left is not None and length + _FOOTER > left - _HEADER:
        return f"truncated record ({max(0, min(length, left - _HEADER))} of {length} data bytes)"
    data = handle.read(length)
    footer = handle.read(_FOOTER)
    if len(data) < length or len(footer) < _FOOTER:
        return f"truncated record ({len(data)} of {length} data bytes)"
    if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        return "CRC mismatch in the record data"
    return data


def _crc_table():
    """The 256-entry table of reflected CRC-32C (Castagnoli, 0x82F63B78), as numpy uint32."""
    import numpy as np

    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = None


def masked_length_crcs(buf, starts):
    """Masked CRC-32C of the 8 bytes at each of `starts` in `buf`, for many offsets at once.

    Args:
      buf: numpy uint8 array.
      starts: numpy int64 array of offsets (each + 8 <= len(buf)).

    Returns:
      numpy uint32 array, shape (len(starts),): what a record header starting
      at each offset must carry in its bytes 8-11.
    """
    import numpy as np

    global _TABLE
    if _TABLE is None:
        _TABLE = _crc_table()
    crc = np.full(len(starts), 0xFFFFFFFF, dtype=np.uint32)
    for k in range(8):
        crc = _TABLE[(crc ^ buf[starts + k]) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    return ((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)


def header_candidates(chunk: bytes, base: int, size: int):
    """Offsets (relative to `chunk`) where a record header whose length CRC checks starts.

    Vectorised: the length's four high bytes must be zero (lengths < 2**31),
    the record must fit in the shard (`base` is the chunk's offset in a shard
    of `size` bytes), and then the masked CRC of the length is computed for
    the few survivors at once. Only offsets with 12 bytes in `chunk` count.
    """
    import numpy as np

    buf = np.frombuffer(chunk, dtype=np.uint8)
    n = len(buf) - _HEADER + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    zero = buf == 0
    plausible = zero[4 : 4 + n] & zero[5 : 5 + n] & zero[6 : 6 + n] & zero[7 : 7 + n] & (buf[3 : 3 + n] < 0x80)
    # Runs of zero bytes (black pixels, padding) read as length 0 everywhere: keep only those whose
    # stored CRC is the one of length 0, with whole-array comparisons instead of one CRC per offset.
    crc_of_empty = masked_crc32c(bytes(8)).to_bytes(4, "little")
    empty_ok = buf[8:8 + n] == crc_of_empty[0]
    for k in range(1, 4):
        empty_ok &= buf[8 + k : 8 + k + n] == crc_of_empty[k]
    plausible &= ~(zero[0:n] & zero[1 : 1 + n] & zero[2 : 2 + n] & zero[3 : 3 + n]) | empty_ok
    starts = np.flatnonzero(plausible)
    if not len(starts):
        return starts
    lengths = np.zeros(len(starts), dtype=np.int64)
    for k in range(4):
        lengths |= buf[starts + k].astype(np.int64) << (8 * k)
    starts = starts[base + starts + _HEADER + lengths + _FOOTER <= size]
    if not len(starts):
        return starts
    stored = np.zeros(len(starts), dtype=np.uint32)
    for k in range(4):
        stored |= buf[starts + 8 + k].astype(np.uint32) << np.uint32(8 * k)
    return starts[masked_length_crcs(buf, starts) == stored]


def _data_checks(handle, offset: int, length: int) -> bool:
    """Whether the record at `offset` (whose length CRC checked) has a good data CRC."""
    import google_crc32c

    handle.seek(offset + _HEADER)
    checksum = google_crc32c.Checksum()
    left = length
    while left:
        piece = handle.read(min(left, _CRC_CHUNK))
        if not piece:
            return False
        checksum.update(piece)
        left -= len(piece)
    footer = handle.read(_FOOTER)
    if len(footer) < _FOOTER:
        return False
    return _mask(int.from_bytes(checksum.digest(), "big")) == struct.unpack("<I", footer)[0]


def find_next_record(handle, start: int, size: int) -> int:
    """The first offset >= `start` where a whole record checks (both CRCs); `size` if none.

    Reads the shard in chunks of `_SCAN_CHUNK` bytes, finds candidate headers
    with `header_candidates` (numpy, no Python loop over bytes) and checks the
    data CRC only at those.
    """
    position = start
    while position + _HEADER <= size:
        handle.seek(position)
        chunk = handle.read(min(_SCAN_CHUNK, size - position))
        if len(chunk) < _HEADER:
            break
        for candidate in header_candidates(chunk, position, size).tolist():
            offset = position + candidate
            length = int.from_bytes(chunk[candidate : candidate + 8], "little")
            if _data_checks(handle, offset, length):
                return offset
        position += len(chunk) - _HEADER + 1  # the next chunk overlaps by 11 bytes
    return size


def _check_record(handle, offset: int, size: int) -> Union[bytes, str]:
    """The data of the record at `offset` (handle positioned there), or why it is damaged."""
    checked = _read_record(handle, left=size - offset)
    return f"truncated record header (0 of {_HEADER} bytes)" if checked is None else checked


def read_shard(handle, size: int) -> Iterator[Union[bytes, DamagedSpan]]:
    """Yields every record's data of a TFRecord file, and a `DamagedSpan` for each damaged stretch.

    Args:
      handle: a seekable binary file object, at offset 0.
      size: the file's size in bytes.

    A record that is truncated or fails a CRC starts a span that ends where
    the next whole record checks (`find_next_record`) or at the end of the
    file; reading goes on from there.
    """
    offset = 0
    while offset < size:
        checked = _check_record(handle, offset, size)
        if isinstance(checked, bytes):
            yield checked
            offset += _HEADER + len(checked) + _FOOTER
            continue
        resume = find_next_record(handle, offset + 1, size)
        yield DamagedSpan(offset, resume - offset, checked)
        offset = resume
        handle.seek(offset)


def write_records(path: str, records) -> None:
    """Writes `records` (bytes) as a TFRecord file through Beam's FileSystems."""
    with FileSystems.create(path) as handle:
        for data in records:
            length = struct.pack("<Q", len(data))
            handle.write(length + struct.pack("<I", masked_crc32c(length)))
            handle.write(data + struct.pack("<I", masked_crc32c(data)))


def shard_name(source: str) -> str:
    """The file name of a shard path (used in default image ids)."""
    return os.path.basename(source.rstrip("/"))


def shard_size(source: str) -> int:
    """The size in bytes of a file (local or any Beam filesystem)."""
    return FileSystems.match([source])[0].metadata_list[0].size_in_bytes


def open_shard(source: str):
    """(seekable binary handle, size in bytes) of a shard.

    Uncompressed shards (the usual TFRecord files) are read as a stream.
    Compressed ones (.gz, .bz2, ... as Beam detects them from the name) are
    decompressed into memory first, since the scan for the next good record
    needs their decompressed size and cheap seeks.
    """
    from apache_beam.io.filesystem import CompressionTypes

    if CompressionTypes.detect_compression_type(source) == CompressionTypes.UNCOMPRESSED:
        return FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED), shard_size(source)
    with FileSystems.open(source) as compressed:
        data = compressed.read()
    return io.BytesIO(data), len(data)


def read_record_at(source: str, offset: int) -> bytes:
    """The data of the record whose header starts at byte `offset` of a shard (`ShardRecord.offset`),
    both CRCs checked: one seek and one read, for the few records a job fetches again (thumbnails).

    Raises:
      ValueError: no whole, intact record starts there (e.g. the shard changed since it was read).
    """
    handle, size = open_shard(source)
    with handle:
        handle.seek(offset)
        checked = _check_record(handle, offset, size)
    if not isinstance(checked, bytes):
        raise ValueError(f"{source}: no intact record at byte {offset}: {checked}")
    return checked


def read_records_at(source: str, offsets) -> dict:
    """{offset: the data of the record at that byte offset of one shard (both CRCs checked), or the
    ValueError saying why no intact record starts there}: `read_record_at` for several records of a
    shard with one open (a compressed shard is decompressed once, not once per record)."""
    handle, size = open_shard(source)
    out: dict = {}
    with handle:
        for offset in sorted(set(int(o) for o in offsets)):
            handle.seek(offset)
            checked = _check_record(handle, offset, size)
            out[offset] = checked if isinstance(checked, bytes) else ValueError(
                f"{source}: no intact record at byte {offset}: {checked}")
    return out


def span_error(source: str, index: int, span: DamagedSpan, size: int, raw: bytes) -> dict:
    """The error row of a damaged span (stage "read", error "CorruptRecord")."""
    end = span.offset + span.length
    after = f"the next good record starts at byte {end}" if end < size else "it runs to the end of the shard"
    return error_row(
        source=source,
        record_index=index,
        stage="read",
        error="CorruptRecord",
        message=(
            f"{span.reason} at byte {span.offset}: skipped a damaged span of {span.length} bytes "
            f"(bytes {span.offset}-{end - 1}); {after}; raw_record holds its first {len(raw)} bytes"
        ),
        raw_record=raw,
    )


class ReadShardRecords(beam.DoFn):
    """shard path -> ShardRecord per record; damaged spans and empty shards -> errors.

    `ShardRecord.index` counts records from 0; a damaged span takes the index
    of the record it starts with (its error row's `record_index`) and the
    next good record gets the one after, so one damaged record leaves the
    indices of the others as they were (a span that swallowed several whole
    records still counts as one).
    """

    def __init__(self, raw_record_cap: int = RAW_RECORD_CAP):
        self._cap = raw_record_cap
        self._read = beam.metrics.Metrics.counter("gradcam_audit", "records_read")
        self._bytes = beam.metrics.Metrics.counter("gradcam_audit", "shard_bytes_read")
        self._damaged = beam.metrics.Metrics.counter("gradcam_audit", "damaged_spans")

    def finish_bundle(self):
        flush_progress()

    def process(self, source: str):
        handle, size = open_shard(source)
        index = offset = 0
        with handle:
            for item in read_shard(handle, size):
                if isinstance(item, DamagedSpan):
                    self._damaged.inc()
                    handle.seek(item.offset)
                    raw = handle.read(min(item.length, self._cap))
                    yield beam.pvalue.TaggedOutput(ERRORS_TAG, span_error(source, index, item, size, raw))
                    self._bytes.inc(item.length)
                    tally(bytes_read=item.length)
                    offset = item.offset + item.length
                else:
                    yield ShardRecord(source, index, item, offset)
                    offset += _HEADER + len(item) + _FOOTER
                    self._read.inc()
                    self._bytes.inc(len(item) + _HEADER + _FOOTER)
                    tally(records_read=1, bytes_read=len(item) + _HEADER + _FOOTER)
                index += 1
        if size == 0:
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG,
                error_row(
                    source=source,
                    record_index=None,
                    stage="read",
                    error="EmptyShard",
                    message="the shard holds no records",
                    raw_record=b"",
                ),
            )



def _with_random_key(record):
    return random.getrandbits(32), record


def _values(keyed):
    return keyed[1]


class FanOutRecords(beam.PTransform):
    """Spreads records over all workers: a random key each, GroupByKey, keys dropped.

    Not `beam.Reshuffle()`: Flink's batch translation turns a Reshuffle into
    `rebalance()`, and Flink's optimiser treats a second rebalance after the
    one that spread the shards as already satisfied (the property survives
    the reading in between), so every record of a shard stayed on the
    subtask that read it. A GroupByKey is a hash-partitioned shuffle on every
    runner.
    """

    def expand(self, records):
        return (
            records
            | "AddRandomKeys" >> beam.Map(_with_random_key)
            | "GroupByRandomKey" >> beam.GroupByKey()
            | "DropKeys" >> beam.FlatMap(_values)
        )
