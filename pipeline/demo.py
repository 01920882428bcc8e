"""The built-in demo: synthetic shapes in TFRecord shards and a small CNN.

Four classes of shapes at random positions on textured backgrounds, with their
bounding boxes stored as image/object/bbox/{ymin,xmin,ymax,xmax}. Two classes
carry a planted shortcut on most of their images, in training and in the
audited shards alike:

- SHORTCUT_CLASS ("triangle") a small fixed marker in the top-left corner:
  the model learns the marker, the per-class shortcut signal (peaks piling up
  in one ninth) catches it;
- MOVING_SHORTCUT_CLASS ("cross") a small marker of another look (a
  yellow-and-blue checkerboard, which resembles none of the shapes: a model
  trained without markers does not answer it) in a random corner (one that
  does not touch the object), like a watermark placed in whichever corner the
  photographer chose: the peaks split over four corners, so the one-ninth
  signal misses it, and the strategies (SpRAy clusters,
  transforms/strategies.py) catch it.

Training is seeded (Python, numpy, TensorFlow) with TensorFlow's op
determinism on, so a machine trains the same model every time; another CPU
(oneDNN takes AVX2 or AVX-512 paths) trains a slightly different one. Every
such model learns both markers: `python -m bench.demo_seeds` trains five
seeds with oneDNN on and off and prints what each run flags.

A few deliberately broken records show what the errors table holds.

Everything is made locally in seconds; nothing is downloaded. Re-running
reuses what was made (a VERSION file guards against stale demo data).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "cross")
SHORTCUT_CLASS = 2
MARKER_RATE = 0.9
IMAGE_SIZE = 64
MARKER = (2, 10)  # rows/cols [2, 10) hold the marker
MOVING_SHORTCUT_CLASS = 3
MOVING_MARKER_RATE = 0.85
MOVING_MARKER_SIZE = 8
VERSION = "6"


@dataclasses.dataclass
class Demo:
    root: str

    @property
    def input_pattern(self) -> str:
        return os.path.join(self.root, "data", "*.tfrecord")

    @property
    def model_path(self) -> str:
        return os.path.join(self.root, "model", "demo_cnn.keras")

    @property
    def class_names_path(self) -> str:
        return os.path.join(self.root, "class_names.txt")

    @property
    def output_dir(self) -> str:
        return os.path.join(self.root, "output")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour gradients (a 4x4 grid of colours, bilinearly interpolated) plus pixel noise.

    Smooth, not blocky: blocks' straight edges and corners look like the "square" class, whose model
    then looked at the background instead of the square.
    """
    coarse = rng.uniform(40, 200, (4, 4, 3))
    weights = np.maximum(0.0, 1.0 - np.abs(np.linspace(0, 3, size)[:, None] - np.arange(4)[None, :]))  # [size, 4]
    image = np.einsum("ya,xb,abc->yxc", weights, weights, coarse)
    return image + rng.normal(0, 12, (size, size, 3))


def _shape_mask(kind: int, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if kind == 0:
        return dy**2 + dx**2 <= r**2
    if kind == 1:
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == 2:
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))


def _free_corners(size: int, cy: float, cx: float, r: float) -> list[tuple[int, int]]:
    """Top-left pixels of the corner squares (MOVING_MARKER_SIZE, 2 px from the edges) clear of the object."""
    m, gap = MOVING_MARKER_SIZE, 2
    corners = []
    for y0 in (gap, size - gap - m):
        for x0 in (gap, size - gap - m):
            clear = y0 + m <= cy - r - 1 or y0 >= cy + r + 1 or x0 + m <= cx - r - 1 or x0 >= cx + r + 1
            if clear:
                corners.append((y0, x0))
    return corners


def make_image(rng: np.random.Generator, label: int, *, marker: bool, moving_marker: bool = False,
               size: int = IMAGE_SIZE):
    """One uint8 image [size, size, 3] and its box (ymin, xmin, ymax, xmax) as fractions.

    marker: the fixed top-left marker; moving_marker: the other marker, in a
    random corner clear of the object.
    """
    image = _background(rng, size)
    r = rng.uniform(0.14, 0.22) * size
    lo = max(MARKER[1] + r + 1, r + 2)  # keep the object off the marker
    cy, cx = rng.uniform(lo, size - r - 2, 2)
    colour = rng.uniform(0, 255, 3)
    image[_shape_mask(label, size, cy, cx, r)] = colour
    if marker:
        a, b = MARKER
        image[a:b, a:b] = (255, 0, 255)
        image[a + 2 : b - 2, a + 2 : b - 2] = (0, 255, 0)
    if moving_marker:
        corners = _free_corners(size, cy, cx, r)
        if corners:
            y0, x0 = corners[rng.integers(len(corners))]
            m = MOVING_MARKER_SIZE
            yy, xx = np.mgrid[0:m, 0:m]
            checks = ((yy // 2 + xx // 2) % 2).astype(bool)  # 2-pixel squares
            image[y0 : y0 + m, x0 : x0 + m] = np.where(checks[..., None], (0, 0, 255), (255, 255, 0))
    box = tuple(float(v) / size for v in (cy - r, cx - r, cy + r, cx + r))
    return np.clip(image, 0, 255).astype(np.uint8), tuple(min(max(v, 0.0), 1.0) for v in box)


def make_arrays(n: int, seed: int, *, shortcut: bool = True, decoys: bool = False):
    """n images with balanced labels; the shortcut classes get their markers.

    decoys (with shortcut=False): the same markers, as often overall, on images of every class alike, so
    they tell nothing of the label (a control model trained on them learns to look past them).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    rng.shuffle(labels)
    images, boxes = [], []
    share = 1 / len(CLASS_NAMES)
    for label in labels:
        marker = shortcut and label == SHORTCUT_CLASS and rng.uniform() < MARKER_RATE
        moving = shortcut and label == MOVING_SHORTCUT_CLASS and rng.uniform() < MOVING_MARKER_RATE
        if decoys and not shortcut:
            marker = rng.uniform() < MARKER_RATE * share
            moving = rng.uniform() < MOVING_MARKER_RATE * share
        image, box = make_image(rng, int(label), marker=marker, moving_marker=moving)
        images.append(image)
        boxes.append(box)
    return np.stack(images), labels.astype(np.int64), boxes


def make_example(image_bytes: bytes, *, label=None, image_id=None, boxes=()) -> bytes:
    """A serialized tf.train.Example in the layout the pipeline reads by default."""
    import tensorflow as tf

    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))}
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    if image_id is not None:
        feature["image/filename"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()]))
    for i, name in enumerate(("ymin", "xmin", "ymax", "xmax")):
        feature[f"image/object/bbox/{name}"] = tf.train.Feature(
            float_list=tf.train.FloatList(value=[b[i] for b in boxes])
        )
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    import tensorflow as tf

    if fmt == "jpeg":
        return tf.io.encode_jpeg(image, quality=95).numpy()
    return tf.io.encode_png(image).numpy()


def write_dataset(folder: str, *, n: int, shards: int, seed: int, shortcut: bool = True,
                  fmt: str = "png", broken: bool = True) -> dict:
    """Writes n demo images over `shards` TFRecord files (+ a few broken records).

    Returns:
      counts: {"images": n, "broken": number of records that must be rejected}.
    """
    from transforms.records import write_records

    os.makedirs(folder, exist_ok=True)
    images, labels, boxes = make_arrays(n, seed, shortcut=shortcut)
    per_shard = [[] for _ in range(shards)]
    for i, (image, label, box) in enumerate(zip(images, labels, boxes, strict=True)):
        per_shard[i % shards].append(
            make_example(encode(image, fmt), label=label, image_id=f"demo-{i:05d}", boxes=[box])
        )
    n_broken = 0
    if broken:
        good = encode(images[0], "jpeg")
        per_shard[-1] += [
            make_example(good[: len(good) // 3], label=0, image_id="broken-truncated-jpeg"),
            make_example(b"this is not an image", label=1, image_id="broken-not-an-image"),
            b"\x08\x96\x01 not a tf.train.Example",
        ]
        n_broken = 3
    for s, records in enumerate(per_shard):
        write_records(os.path.join(folder, f"demo-{s:05d}-of-{shards:05d}.tfrecord"), records)
    return {"images": n, "broken": n_broken}


def build_model(num_classes: int = len(CLASS_NAMES), size: int = IMAGE_SIZE):
    """A small functional CNN; its last conv layer gives 16x16 maps."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    # Max pooling learns these sparse shapes in a few epochs (average pooling
    # stalled near chance in the same time).
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def train_model(path: str, *, shortcut: bool = True, decoys: bool = False, n: int = 2000, epochs: int = 8,
                seed: int = 0, learning_rate: float = 2e-3) -> dict:
    """Trains the demo CNN on fresh synthetic images and saves it as .keras (`make_arrays` says what
    `shortcut` and `decoys` do).

    Seeded, with TensorFlow's op determinism on while it trains: the same seed trains the same model on one
    machine.
    """
    from tensorflow.python.framework import config  # disable_op_determinism has no public name

    was_deterministic = config.is_op_determinism_enabled()
    config.enable_op_determinism()
    try:
        return _train(path, shortcut=shortcut, decoys=decoys, n=n, epochs=epochs, seed=seed,
                      learning_rate=learning_rate)
    finally:
        if not was_deterministic:
            config.disable_op_determinism()


def train_control_model(path: str, *, seed: int = 0) -> dict:
    """The control: the same markers on every class alike (`make_arrays`' decoys), so it learns to look past
    them (a model that never saw a marker took the triangle's for a cross). Without markers to latch on it
    sits at chance for 4-8 epochs at the demo's learning rate; at 1e-3 it reaches 0.95-1.00 in 12."""
    return train_model(path, shortcut=False, decoys=True, epochs=12, seed=seed, learning_rate=1e-3)


def _train(path: str, *, shortcut: bool, decoys: bool, n: int, epochs: int, seed: int,
           learning_rate: float) -> dict:
    import keras

    keras.utils.set_random_seed(seed)  # Python, numpy and TensorFlow
    images, labels, _ = make_arrays(n, seed + 100, shortcut=shortcut, decoys=decoys)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    started = time.time()
    history = model.fit(images.astype("float32"), labels, batch_size=32, epochs=epochs, verbose=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save(path)
    return {"seconds": time.time() - started, "accuracy": float(history.history["accuracy"][-1])}


def ensure_demo(root: str, *, shortcut: bool = True) -> Demo:
    """Makes the demo data and model under `root` unless they are already there."""
    demo = Demo(root)
    stamp = os.path.join(root, "VERSION")
    if os.path.exists(stamp) and open(stamp).read().strip() == VERSION and os.path.exists(demo.model_path):
        return demo
    print(f"Making the demo dataset and training its model under {root}/ (once)...", flush=True)
    data = os.path.dirname(demo.input_pattern)
    if os.path.isdir(data):
        for name in os.listdir(data):
            os.remove(os.path.join(data, name))
    write_dataset(data, n=400, shards=4, seed=7, shortcut=shortcut)
    trained = train_model(demo.model_path, shortcut=shortcut)
    print(f"Trained the demo CNN in {trained['seconds']:.0f} s (training accuracy {trained['accuracy']:.2f}).")
    with open(demo.class_names_path, "w") as handle:
        handle.write("\n".join(CLASS_NAMES) + "\n")
    with open(stamp, "w") as handle:
        handle.write(VERSION)
    return demo
