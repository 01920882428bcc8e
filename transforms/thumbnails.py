"""Image tiles with the CAM overlaid: what the report shows for each exemplar.

Made in the job (`transforms.exemplars.DrawThumbnails`) for the few images
chosen as exemplars, with Pillow (decode, antialiased resize, JPEG: ~1 ms a
tile; a JPEG is decoded at a reduced DCT scale when the tile is much smaller)
and numpy; the colour map is matplotlib's "jet", tabulated here so the
workers need no matplotlib.

    tile = overlay_tile(encoded_png_or_jpeg, cam[h, w], boxes) -> JPEG bytes
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

TILE = 144  # px, longest side of a tile
ALPHA = 0.6  # opacity of the CAM's hottest point; it falls with sqrt(CAM / max), so cold areas show the image
COLORMAP = "jet"
JPEG_QUALITY = 85
BOX_COLOUR = (255, 255, 255)

# matplotlib's _jet_data: per channel, (x, value) break points of a piecewise-linear map.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _jet_table(n: int = 256) -> np.ndarray:
    x = np.arange(n) / (n - 1)
    return np.stack([np.interp(x, *zip(*_JET[c], strict=True)) for c in ("red", "green", "blue")], axis=-1)


_JET_TABLE = _jet_table()


def jet(values: np.ndarray) -> np.ndarray:
    """[...] values in [0, 1] -> [..., 3] RGB in [0, 1] (matplotlib's "jet" colour map).

    Looked up the way matplotlib does: 256 entries tabulated at i / 255, entry int(x * 256).
    """
    x = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    return _JET_TABLE[np.minimum((x * len(_JET_TABLE)).astype(np.int64), len(_JET_TABLE) - 1)]


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, c] float -> [height, width, c] float32, bilinear with antialiasing (Pillow, per channel)."""
    from PIL import Image

    array = np.asarray(array, np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(array[..., c]), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR) for c in range(array.shape[-1])]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def _resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [height, width, 3] float32 in [0, 1], bilinear with antialiasing (Pillow)."""
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(image, np.uint8), mode="RGB").resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(small, np.float32) / 255.0


def _decode(encoded: Optional[bytes], size: int = TILE) -> Optional[np.ndarray]:
    """[H, W, 3] uint8 (H, W >= size when the image is larger), or None when not decodable.

    JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides at least the tile's (libjpeg averages each 2x2, 4x4 or 8x8
    block: a box filter, as good as the antialiased resize that follows), at
    a fraction of a full decode's cost.
    """
    if encoded is None:
        return None
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.draft("RGB", (size, size))
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def tile_size(height: int, width: int, size: int = TILE) -> tuple[int, int]:
    """(height, width) of a tile whose longest side is `size`."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def draw_boxes(rgb: np.ndarray, boxes: Sequence, colour: tuple = BOX_COLOUR, width: int = 2) -> np.ndarray:
    """Draws rectangle outlines (ymin, xmin, ymax, xmax as fractions) on [H, W, 3] uint8, in place."""
    height, width_px = rgb.shape[:2]
    for ymin, xmin, ymax, xmax in boxes:
        top, bottom = int(round(ymin * height)), max(int(round(ymax * height)) - 1, 0)
        left, right = int(round(xmin * width_px)), max(int(round(xmax * width_px)) - 1, 0)
        top, left = min(top, height - 1), min(left, width_px - 1)
        bottom, right = max(min(bottom, height - 1), top), max(min(right, width_px - 1), left)
        rgb[top:min(top + width, bottom + 1), left:right + 1] = colour
        rgb[max(bottom - width + 1, top):bottom + 1, left:right + 1] = colour
        rgb[top:bottom + 1, left:min(left + width, right + 1)] = colour
        rgb[top:bottom + 1, max(right - width + 1, left):right + 1] = colour
    return rgb


def overlay(image: Optional[np.ndarray], cam: np.ndarray, boxes: Sequence = (), size: int = TILE) -> np.ndarray:
    """[h, w, 3] uint8 tile: the image (grey without one) with the CAM / its max overlaid, boxes drawn.

    Args:
      image: [H, W, 3] uint8, or None.
      cam: [h, w] the raw CAM at the target layer's resolution.
    """
    if image is None:
        image = np.full((size, size, 3), 128, np.uint8)
    height, width = tile_size(image.shape[0], image.shape[1], size)
    base = _resize_rgb(image, height, width)
    cam = np.asarray(cam, np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    norm = cam / peak if peak > 0 else np.zeros_like(cam)
    heat = np.clip(_resize(norm[..., None], height, width)[..., 0], 0.0, 1.0)
    alpha = ALPHA * np.sqrt(heat)[..., None]
    blended = (1 - alpha) * np.clip(base, 0.0, 1.0) + alpha * jet(heat)
    rgb = (np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)
    return draw_boxes(rgb, boxes)


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """[H, W, 3] uint8 -> JPEG bytes."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8), mode="RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def overlay_tile(encoded: Optional[bytes], cam: np.ndarray, boxes: Sequence = (), size: int = TILE) -> bytes:
    """A JPEG tile of the encoded image (PNG/JPEG/GIF/BMP) with the CAM overlaid; CAM alone if undecodable."""
    image = _decode(encoded, size)
    return encode_jpeg(overlay(image, cam, boxes if image is not None else (), size))


def example_image(serialized: bytes, image_key: str) -> Optional[bytes]:
    """The encoded image bytes of a serialized tf.train.Example (None when absent or not an Example)."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        feature = tf.train.Example.FromString(serialized).features.feature
    except DecodeError:
        return None
    if image_key in feature and feature[image_key].bytes_list.value:
        return feature[image_key].bytes_list.value[0]
    return None
