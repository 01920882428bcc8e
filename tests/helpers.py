"""Small models, images and TFRecord shards that the tests build themselves."""

from __future__ import annotations

import os

import numpy as np

from pipeline.demo import encode, make_example
from transforms.records import write_records

SIZE = 32
NUM_CLASSES = 3


def small_functional(num_classes: int = NUM_CLASSES, size: int = SIZE, seed: int = 0):
    """Conv-conv-conv, GAP, Dense(softmax); target layer "last_conv" (8x8x16)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def small_base(size: int = SIZE, seed: int = 1):
    """A feature extractor (as keras.applications bases are): 8x8x16 out."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs / 255.0)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="base_out")(x)
    return keras.Model(inputs, x, name="base")


def nested_sequential(num_classes: int = NUM_CLASSES, size: int = SIZE):
    """The transfer-learning shape: a functional base inside a Sequential model."""
    import keras

    base = small_base(size)
    return keras.Sequential(
        [keras.Input((size, size, 3)), base, keras.layers.GlobalAveragePooling2D(),
         keras.layers.Dense(num_classes, activation="softmax", name="head")]
    ), base


def random_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def png_bytes(height: int, width: int, channels: int = 3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), "png")


def jpeg_bytes(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "jpeg")


def good_examples(n: int, prefix: str, *, size: int = SIZE, seed: int = 0) -> list[bytes]:
    """n valid records with ids prefix-i, labels i % NUM_CLASSES and a box each."""
    return [
        make_example(png_bytes(size, size, seed=seed + i), label=i % NUM_CLASSES, image_id=f"{prefix}-{i}",
                     boxes=[(0.1, 0.1, 0.6, 0.7)])
        for i in range(n)
    ]


def write_shard(folder: str, name: str, records: list[bytes]) -> str:
    path = os.path.join(folder, name)
    write_records(path, records)
    return path


def read_parquet_dir(folder: str):
    """All Parquet files of a folder as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def parquet_schema(folder: str):
    import pyarrow.parquet as pq

    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    return pq.read_schema(os.path.join(folder, files[0]))


