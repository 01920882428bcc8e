"""`DecodeImageExamples`: serialized tf.train.Example -> checked, resized image.

Each record either becomes a `DecodedImage` or an error row (tag "errors")
saying what was wrong: not an Example, a missing feature, an image that is
not an image, too large, truncated, or a label outside the model's classes.
Images are converted to the model's channels: RGB (grey replicated, alpha
dropped) or grey (RGB and RGBA converted with the standard luma weights of
`tf.image.rgb_to_grayscale`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from transforms.dead_letters import ERRORS_TAG, RecordError, error_row
from transforms.image_header import read_header
from transforms.records import ShardRecord, shard_name


class DecodedImage(NamedTuple):
    """A record ready for the model.

    Attributes:
      pixels: float32 [H, W, C] in 0-255, resized to the model's input size, C = 1 or 3.
      boxes: ((ymin, xmin, ymax, xmax), ...) as fractions of the image, or ().
    """

    source: str
    record_index: int
    image_id: str
    label: Optional[int]
    boxes: tuple
    image_height: int
    image_width: int
    pixels: object
    raw_record: bytes


def _first(feature_map, key: str):
    """The first value of feature `key` (bytes, int or float), or None."""
    if key not in feature_map:
        return None
    feature = feature_map[key]
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind else []
    return values[0] if len(values) else None


def _floats(feature_map, key: str) -> list:
    return list(feature_map[key].float_list.value) if key in feature_map else []


def _boxes(feature_map) -> tuple:
    prefix = "image/object/bbox/"
    columns = [_floats(feature_map, prefix + name) for name in ("ymin", "xmin", "ymax", "xmax")]
    if len({len(c) for c in columns}) != 1:
        raise RecordError("InvalidBoxes", f"{prefix}{{ymin,xmin,ymax,xmax}} differ in length")
    boxes = []
    for ymin, xmin, ymax, xmax in zip(*columns, strict=True):
        box = tuple(min(max(v, 0.0), 1.0) for v in (ymin, xmin, ymax, xmax))
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
    return tuple(boxes)


class DecodeImageExamples(beam.DoFn):
    """ShardRecord -> DecodedImage, or an error row on the "errors" output."""

    def __init__(
        self,
        *,
        image_key: str,
        label_key: str,
        id_key: str,
        label_offset: int,
        num_classes: int,
        input_size: tuple[int, int],
        max_image_pixels: int,
        require_label: bool,
        channels: int = 3,
    ):
        self._image_key = image_key
        self._label_key = label_key
        self._id_key = id_key
        self._label_offset = label_offset
        self._num_classes = num_classes
        self._input_size = tuple(input_size)
        self._channels = channels
        self._max_pixels = max_image_pixels
        self._require_label = require_label
        self._rejected = beam.metrics.Metrics.counter("gradcam_audit", "decode_errors")

    def process(self, record: ShardRecord):
        image_id = None
        try:
            example = self._parse(record.data)
            features = example.features.feature
            raw_id = _first(features, self._id_key)
            if isinstance(raw_id, bytes):
                raw_id = raw_id.decode("utf-8", "replace")
            image_id = str(raw_id) if raw_id not in (None, "") else (
                f"{shard_name(record.source)}:{record.index}"
            )
            yield self._decode(record, features, image_id)
        except RecordError as exc:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG,
                error_row(
                    source=record.source,
                    record_index=record.index,
                    image_id=image_id,
                    stage="decode",
                    error=exc.error,
                    message=exc.message,
                    raw_record=record.data,
                ),
            )

    @staticmethod
    def _parse(data: bytes):
        import tensorflow as tf
        from google.protobuf.message import DecodeError

        try:
            return tf.train.Example.FromString(data)
        except DecodeError as exc:
            raise RecordError("InvalidExample", f"not a serialized tf.train.Example: {exc}") from None

    def _label(self, features) -> Optional[int]:
        value = _first(features, self._label_key)
        if value is None:
            if self._require_label:
                raise RecordError(
                    "MissingFeature", f"--target label needs feature {self._label_key!r}; it is absent"
                )
            return None
        if not isinstance(value, int):
            raise RecordError("InvalidLabel", f"{self._label_key!r}: expected an int64 feature, found {value!r}")
        label = value - self._label_offset
        if not 0 <= label < self._num_classes:
            raise RecordError(
                "LabelOutOfRange",
                f"{self._label_key!r} = {value} (offset {self._label_offset}) -> {label}: "
                f"expected 0..{self._num_classes - 1}; check --label_offset",
            )
        return label

    def _decode(self, record: ShardRecord, features, image_id: str) -> DecodedImage:
        import tensorflow as tf

        encoded = _first(features, self._image_key)
        if not isinstance(encoded, bytes) or not encoded:
            raise RecordError("MissingFeature", f"no image bytes in feature {self._image_key!r}")
        label = self._label(features)
        boxes = _boxes(features)
        header = read_header(encoded)
        if header.width <= 0 or header.height <= 0:
            raise RecordError("UndecodableImage", f"{header.format}: size {header.width}x{header.height}")
        if header.width * header.height > self._max_pixels:
            raise RecordError(
                "ImageTooLarge",
                f"{header.format} {header.width}x{header.height} = {header.width * header.height} "
                f"pixels; expected at most --max_image_pixels={self._max_pixels}",
            )
        # Decoding stays on the CPU: on GPU workers every SDK process would
        # otherwise open a CUDA context just to resize images.
        with tf.device("/CPU:0"):
            try:
                image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
                reason = str(exc).strip().splitlines()[0][:300]
                raise RecordError("UndecodableImage", f"{header.format}: {reason}") from None
            height, width = int(image.shape[0]), int(image.shape[1])
            if (height, width) != (header.height, header.width):
                raise RecordError(
                    "UndecodableImage",
                    f"{header.format}: header says {header.width}x{header.height}, decoded {width}x{height}",
                )
            pixels = tf.cast(image, tf.float32)
            if self._channels == 1:
                pixels = tf.image.rgb_to_grayscale(pixels)
            if (height, width) != self._input_size:
                pixels = tf.image.resize(pixels, self._input_size, method="bilinear")
        return DecodedImage(
            source=record.source,
            record_index=record.index,
            image_id=image_id,
            label=label,
            boxes=boxes,
            image_height=height,
            image_width=width,
            pixels=pixels.numpy(),
            raw_record=record.data,
        )
