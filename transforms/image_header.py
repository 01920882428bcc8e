"""Image sizes read from the file header, before anything is decoded.

Checking width x height against `--max_image_pixels` here means a
decompression bomb is rejected without allocating its pixels.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from transforms.error_rows import RecordError

# JPEG start-of-frame markers (SOF0-SOF15 except DHT, JPG and DAC).
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class ImageHeader(NamedTuple):
    format: str
    width: int
    height: int
    channels: int


def _jpeg(data: bytes) -> ImageHeader:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise RecordError("UndecodableImage", f"JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 10 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageHeader("jpeg", width, height, data[pos + 9])
        pos += 2 + length
    raise RecordError("UndecodableImage", "JPEG: no frame header (file truncated?)")


def read_header(data: bytes) -> ImageHeader:
    """Format, width, height and channels from the first bytes of an image.

    Raises:
      RecordError: "UndecodableImage" for an unknown format or a bad header.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 26 or data[12:16] != b"IHDR":
            raise RecordError("UndecodableImage", "PNG: truncated header")
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader("png", width, height, _PNG_CHANNELS.get(data[25], 0))
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return ImageHeader("gif", width, height, 3)
    if data[:2] == b"BM" and len(data) >= 30:
        width, height = struct.unpack("<ii", data[18:26])
        (bits,) = struct.unpack("<H", data[28:30])
        return ImageHeader("bmp", width, abs(height), max(1, bits // 8))
    raise RecordError(
        "UndecodableImage",
        f"expected a JPEG, PNG, GIF or BMP image, found bytes starting {data[:8]!r}",
    )
