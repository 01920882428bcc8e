"""Reading TFRecord shards while keeping every record's source and position.

Beam's ReadFromTFRecord drops where a record came from and fails the whole
job on a corrupt shard. `ReadShardRecords` reads one shard per call through
Beam's FileSystems (local, gs://, ...), checks both CRCs of every record and,
on the first corrupt or truncated record, keeps the records before it and
sends the rest of the shard's bytes to the errors table.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.dead_letters import ERRORS_TAG, error_row

_HEADER = 12  # uint64 length + masked crc32c of the length
_FOOTER = 4  # masked crc32c of the data
_MAX_RECORD_BYTES = 1 << 31


class ShardRecord(NamedTuple):
    """One serialized record and where it came from."""

    source: str
    index: int
    data: bytes


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class CorruptRecord(Exception):
    """A record whose framing or checksum is wrong."""


def iter_records(handle) -> Iterator[bytes]:
    """Yields the records of an open TFRecord file, checking both CRCs.

    Raises:
      CorruptRecord: at the first record that is truncated or fails a CRC.
    """
    while True:
        header = handle.read(_HEADER)
        if not header:
            return
        if len(header) < _HEADER:
            raise CorruptRecord(f"truncated record header ({len(header)} of {_HEADER} bytes)")
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:])
        if masked_crc32c(header[:8]) != length_crc:
            raise CorruptRecord("CRC mismatch in the record length")
        if length > _MAX_RECORD_BYTES:
            raise CorruptRecord(f"record length {length} exceeds {_MAX_RECORD_BYTES}")
        data = handle.read(length)
        footer = handle.read(_FOOTER)
        if len(data) < length or len(footer) < _FOOTER:
            raise CorruptRecord(f"truncated record ({len(data)} of {length} data bytes)")
        if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise CorruptRecord("CRC mismatch in the record data")
        yield data


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


class ReadShardRecords(beam.DoFn):
    """shard path -> ShardRecord per record; corrupt tails and empty shards -> errors."""

    def __init__(self):
        self._read = beam.metrics.Metrics.counter("gradcam_audit", "records_read")
        self._corrupt = beam.metrics.Metrics.counter("gradcam_audit", "corrupt_shards")

    def process(self, source: str):
        index = 0
        with FileSystems.open(source) as handle:
            offset = 0
            try:
                for data in iter_records(handle):
                    yield ShardRecord(source, index, data)
                    self._read.inc()
                    index += 1
                    offset += _HEADER + len(data) + _FOOTER
            except CorruptRecord as exc:
                self._corrupt.inc()
                with FileSystems.open(source) as again:
                    again.seek(offset)
                    tail = again.read()
                yield beam.pvalue.TaggedOutput(
                    ERRORS_TAG,
                    error_row(
                        source=source,
                        record_index=index,
                        stage="read",
                        error="CorruptShard",
                        message=(
                            f"{exc} at record {index} (byte {offset}); kept the {index} "
                            f"records before it; the remaining {len(tail)} bytes are in raw_record"
                        ),
                        raw_record=tail,
                    ),
                )
                return
        if index == 0:
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
