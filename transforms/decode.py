"""Decoding records in two steps: cheap checks per record, pixels per batch.

`DecodeImageExamples` (a DoFn, plain Python per record) parses the
tf.train.Example, reads the id, label and boxes, and checks the image's size
from its header (`transforms.image_header`) *before* anything is decoded, so
a decompression bomb is rejected without allocating its pixels. It emits a
`DecodedImage` that still holds the encoded bytes (`pixels` is None) or an
error row (tag "errors"): not an Example, a missing feature, not an image,
too large, a label outside the model's classes (for multi-label records,
`--label_format index|multi_hot`: an index out of range or a multi-hot
vector whose length is not the model's class count).

`BatchImageDecoder` turns the encoded images of a whole batch into the
model's input in one `tf.function` (fixed input signature: a string vector)
on the CPU: decode (JPEG, PNG, GIF, BMP), grey/RGBA conversion to the model's
channels, bilinear resize to float32. TensorFlow runs the images of a batch in
parallel on its own threads and releases the GIL, so decoding in one thread
overlaps with the model call of another. `decode_batch` runs it inside the
model handler: a batch that fails is bisected so each truncated or corrupt
image becomes one error (stage "decode") and the rest are decoded.

Channels follow the model: C=3 replicates grey and drops alpha; C=1 turns
RGB(A) into grey with the standard luma weights (`tf.image.rgb_to_grayscale`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np

from transforms.error_rows import ERRORS_TAG, RecordError, error_row
from transforms.image_header import read_header
from transforms.records import ShardRecord, shard_name


class DecodedImage(NamedTuple):
    """A checked record, and after the batch decode, the model's input.

    Attributes:
      image_height, image_width: the image's own size (from the header; checked
        against the decoded size).
      pixels: float32 [H, W, C] in 0-255 at the model's input size, or None
        until `decode_batch` has run (a view into the decoded batch).
      boxes: ((ymin, xmin, ymax, xmax), ...) as fractions of the image, or ().
      encoded: the encoded image bytes (JPEG, PNG, GIF, BMP).
      image_format: "jpeg", "png", "gif" or "bmp" (from the header).
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
    encoded: Optional[bytes] = None
    image_format: str = ""
    record_offset: int = -1  # byte offset of the record in its shard (`ShardRecord.offset`); -1: not known
    # Multi-label records (--label_format index|multi_hot): the sorted true classes, () for none; None when
    # the record has no label feature or the format is "single" (then `label` holds the one label).
    labels: Optional[tuple] = None


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
    """ShardRecord -> DecodedImage (encoded, checked), or an error row on the "errors" output."""

    def __init__(
        self,
        *,
        image_key: str,
        label_key: str,
        id_key: str,
        label_offset: int,
        num_classes: int,
        max_image_pixels: int,
        require_label: bool,
        label_format: str = "single",
    ):
        self._image_key = image_key
        self._label_key = label_key
        self._id_key = id_key
        self._label_offset = label_offset
        self._num_classes = num_classes
        self._max_pixels = max_image_pixels
        self._require_label = require_label
        self._label_format = label_format
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
            yield self._check(record, features, image_id)
        except RecordError as exc:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, decode_error_row(record, image_id, exc))

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

    def _labels(self, features) -> Optional[tuple]:
        """The true classes of a multi-label record (sorted, no repeats; () for none), or None when absent."""
        key = self._label_key
        if key not in features:
            if self._require_label:
                raise RecordError("MissingFeature", f"--target labels needs feature {key!r}; it is absent")
            return None
        feature = features[key]
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if kind not in (None, "int64_list"):
            raise RecordError("InvalidLabel", f"{key!r}: expected an int64 feature, found a {kind}")
        n = self._num_classes
        if self._label_format == "multi_hot":
            if len(values) != n:
                raise RecordError(
                    "InvalidLabel",
                    f"{key!r}: expected a multi-hot vector of {n} values (the model's classes), found {len(values)}",
                )
            other = sorted({v for v in values if v not in (0, 1)})
            if other:
                raise RecordError("InvalidLabel", f"{key!r}: expected a multi-hot vector of 0/1, found {other[:5]}")
            return tuple(i for i, v in enumerate(values) if v == 1)
        classes = sorted({v - self._label_offset for v in values})
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise RecordError(
                "LabelOutOfRange",
                f"{key!r} holds {bad[0] + self._label_offset} (offset {self._label_offset}) -> {bad[0]}: "
                f"expected class indices 0..{n - 1}; check --label_offset and --label_format",
            )
        return tuple(classes)

    def _check(self, record: ShardRecord, features, image_id: str) -> DecodedImage:
        encoded = _first(features, self._image_key)
        if not isinstance(encoded, bytes) or not encoded:
            raise RecordError("MissingFeature", f"no image bytes in feature {self._image_key!r}")
        multilabel = self._label_format != "single"
        label = None if multilabel else self._label(features)
        labels = self._labels(features) if multilabel else None
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
        return DecodedImage(
            source=record.source,
            record_index=record.index,
            record_offset=record.offset,
            image_id=image_id,
            label=label,
            boxes=boxes,
            image_height=header.height,
            image_width=header.width,
            pixels=None,
            raw_record=record.data,
            encoded=encoded,
            image_format=header.format,
            labels=labels,
        )


def decode_error_row(record: ShardRecord, image_id: Optional[str], exc: RecordError) -> dict:
    """The errors-table row (stage "decode") for a record that failed its checks."""
    return error_row(
        source=record.source,
        record_index=record.index,
        image_id=image_id,
        stage="decode",
        error=exc.error,
        message=exc.message,
        raw_record=record.data,
    )


class BatchImageDecoder:
    """Encoded images [B] -> float32 [B, H, W, C] (0-255) in one compiled function.

    Built once per worker process (in the model handler's `load_model`) and
    shared by its threads. Everything runs on the CPU: on GPU workers the
    decoded batch then reaches the device once, as the model's input.

    Args:
      input_shape: the model's (H, W, C), C in {1, 3}.
    """

    def __init__(self, input_shape: Sequence[int]):
        import tensorflow as tf

        height, width, channels = (int(d) for d in input_shape)
        if channels not in (1, 3):
            raise ValueError(f"model input: expected 1 or 3 channels, found {channels}")
        self.input_shape = (height, width, channels)

        def one(encoded):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            size = tf.shape(image)[:2]
            # Resizing the uint8 image gives float32 directly (the same values as
            # cast-then-resize, without a full-size float32 copy: ~20% less CPU).
            pixels = tf.image.resize(image, (height, width), method="bilinear")
            if channels == 1:  # luma is linear, so it commutes with the bilinear resize
                pixels = tf.image.rgb_to_grayscale(pixels)
            return pixels, size

        def decode(encoded):
            with tf.device("/CPU:0"):
                return tf.map_fn(
                    one,
                    encoded,
                    fn_output_signature=(
                        tf.TensorSpec([height, width, channels], tf.float32),
                        tf.TensorSpec([2], tf.int32),
                    ),
                    parallel_iterations=64,
                )

        self._decode = tf.function(decode, input_signature=[tf.TensorSpec([None], tf.string, name="encoded")])

    def __call__(self, encoded: Sequence[bytes]):
        """Returns (pixels float32 [B, H, W, C], decoded (height, width) int32 [B, 2] numpy).

        `pixels` is the function's CPU tensor: handed as it is to the
        explainer (no copy); `np.asarray(pixels)` is a view of it.

        Raises:
          tf.errors.OpError: when any image of the batch cannot be decoded.
        """
        import tensorflow as tf

        pixels, sizes = self._decode(tf.constant(list(encoded), dtype=tf.string))
        return pixels, sizes.numpy()

    @property
    def tracing_count(self) -> int:
        return self._decode.experimental_get_tracing_count()


def _decode_failure(item: DecodedImage, exc: Exception) -> RecordError:
    """The error for one image that failed in the batch function, with the decoder's own reason.

    The graph error's first line says only "Graph execution error", so the
    one image is decoded once more eagerly (failure path only) for the message.
    """
    import tensorflow as tf

    try:
        with tf.device("/CPU:0"):
            tf.io.decode_image(item.encoded, channels=3, expand_animations=False)
        lines = [line for line in str(exc).splitlines() if line.strip() and "Graph execution" not in line]
    except (tf.errors.OpError, ValueError) as eager:
        lines = str(getattr(eager, "message", eager)).strip().splitlines()
    return RecordError("UndecodableImage", f"{item.image_format}: {lines[0][:300] if lines else type(exc).__name__}")


Decoder = Callable[[Sequence[bytes]], tuple[np.ndarray, np.ndarray]]  # a BatchImageDecoder or a method calling one


def _decode_bisecting(decoder: Decoder, items: Sequence[DecodedImage], failures: list):
    """(pixels, sizes, items) of what decodes; what does not goes to `failures`."""
    import tensorflow as tf

    try:
        pixels, sizes = decoder([item.encoded for item in items])
        return [(pixels, sizes, list(items))]
    except (tf.errors.OpError, ValueError) as exc:
        if len(items) == 1:
            failures.append((items[0], _decode_failure(items[0], exc)))
            return []
    half = len(items) // 2
    return _decode_bisecting(decoder, items[:half], failures) + _decode_bisecting(decoder, items[half:], failures)


def decode_batch(
    decoder: Decoder, items: Sequence[DecodedImage]
) -> tuple[np.ndarray, list[DecodedImage], list[tuple[DecodedImage, RecordError]]]:
    """Decodes a batch of checked records in one call (bisecting around bad images).

    Args:
      decoder: a `BatchImageDecoder` (or a callable with its signature).
      items: records checked by `DecodeImageExamples` (`encoded` set).

    Returns:
      (pixels float32 [G, H, W, C] of the G images that decoded (the decoder's
      tensor when the whole batch decoded, else a numpy array), those images
      with `pixels` set to their row of that array, [(image, RecordError)] for
      every image that failed: undecodable or truncated, or decoded to another
      size than its header says).
    """
    failures: list = []
    parts = _decode_bisecting(decoder, items, failures) if items else []
    good, arrays = [], []
    for tensor, sizes, part in parts:
        pixels = np.asarray(tensor)
        expected = np.array([(item.image_height, item.image_width) for item in part], np.int32).reshape(-1, 2)
        same = (sizes == expected).all(axis=1)
        if same.all():
            arrays.append(pixels)
            good.extend(part)
            continue
        for i in np.flatnonzero(~same):
            item, (h, w) = part[i], sizes[i]
            failures.append((item, RecordError(
                "UndecodableImage",
                f"{item.image_format}: header says {item.image_width}x{item.image_height}, decoded {w}x{h}",
            )))
        arrays.append(pixels[same])
        good.extend(item for item, ok in zip(part, same, strict=True) if ok)
    if not arrays:
        return np.zeros([0, *getattr(decoder, "input_shape", ())], np.float32), [], failures
    batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    # The usual case, the whole batch decoded: the decoder's tensor goes to the explainer as it is.
    out = parts[0][0] if len(parts) == 1 and not failures else batch
    return out, [item._replace(pixels=batch[i]) for i, item in enumerate(good)], failures
