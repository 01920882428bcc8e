"""`--custom_objects`: a model made of the user's own layers (keras.io's Vision Transformer example:
`Patches`, `PatchEncoder`, neither registered with Keras).

The layers live in a .py file outside any package, so neither the launcher nor a worker can import
them: without the option the launch stops with one line naming it; with it the job explains the
model on its token grid, and a handler unpickled in a fresh interpreter, after the file is deleted,
loads the model from the source the job carries.
"""

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import good_examples, write_shard
from tests.references import reference
from tests.test_cam_methods import assert_close
from tests.test_models import audit, row_cams, row_targets
from tests.test_transformers import token_split
from transforms.custom_code import custom_objects, read_custom_code
from transforms.errors import AuditError

SIZE, PATCH, DIM, CLASSES = 32, 4, 16, 3

LAYERS = textwrap.dedent('''
    """keras.io's ViT example's layers (Image classification with Vision Transformer), not registered."""
    import keras
    from keras import layers, ops


    class Patches(layers.Layer):
        def __init__(self, patch_size, **kwargs):
            super().__init__(**kwargs)
            self.patch_size = patch_size

        def call(self, images):
            patches = ops.image.extract_patches(images, size=self.patch_size)
            return ops.reshape(patches, (ops.shape(images)[0], -1, patches.shape[-1]))

        def get_config(self):
            return {**super().get_config(), "patch_size": self.patch_size}


    class PatchEncoder(layers.Layer):
        def __init__(self, num_patches, projection_dim, **kwargs):
            super().__init__(**kwargs)
            self.num_patches = num_patches
            self.projection_dim = projection_dim
            self.projection = layers.Dense(projection_dim)
            self.position_embedding = layers.Embedding(num_patches, projection_dim)

        def call(self, patch):
            positions = ops.expand_dims(ops.arange(0, self.num_patches), axis=0)
            return self.projection(patch) + self.position_embedding(positions)

        def get_config(self):
            return {**super().get_config(), "num_patches": self.num_patches,
                    "projection_dim": self.projection_dim}
''')


def keras_io_vit(classes_module) -> "keras.Model":  # noqa: F821
    import keras

    keras.utils.set_random_seed(0)
    grid = SIZE // PATCH
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = classes_module["PatchEncoder"](grid * grid, DIM)(classes_module["Patches"](PATCH)(x))
    for b in range(2):
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=DIM // 2)(y, y)
        x = keras.layers.Add(name=f"block{b}_add")([y, x])
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.Dense(DIM, activation="gelu")(y)
        x = keras.layers.Add(name=f"block{b}_out")([y, x])
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x))
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="head")(x))


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    """(model path, layers .py path, the model as built) of a saved keras.io-style ViT made of the file's
    unregistered layers."""
    folder = tmp_path_factory.mktemp("custom")
    layers_path = str(folder / "vit_layers.py")
    with open(layers_path, "w") as handle:
        handle.write(LAYERS)
    model = keras_io_vit(custom_objects(read_custom_code(layers_path)))
    model_path = str(folder / "vit.keras")
    model.save(model_path)
    return model_path, layers_path, model


def test_without_the_file_the_launch_stops_with_one_line_naming_the_option(tmp_path, vit_files):
    """In a fresh interpreter (here the layers' module is loaded already, and Keras would find it)."""
    model_path, _, _ = vit_files
    shard = write_shard(str(tmp_path), "data-00000.tfrecord", good_examples(2, "img", size=SIZE))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--input", shard, "--model", model_path,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--custom_objects" in err[0] and "Patches" in err[0], err


def test_with_the_file_the_job_explains_the_model_on_its_token_grid(tmp_path, vit_files):
    import keras

    model_path, layers_path, built = vit_files
    records = good_examples(5, "img", size=SIZE)
    rows, manifest = audit(tmp_path, records, model_path, "--custom_objects", layers_path,
                           "--preprocess", "none")
    assert manifest["model"]["target_layer"] == "block1_out"
    with open(layers_path, "rb") as handle:  # the manifest names the file and its source's hash, not the source
        assert manifest["model"]["custom_objects"] == [
            {"file": layers_path, "sha256": hashlib.sha256(handle.read()).hexdigest()}]
    assert manifest["model"]["token_layout"]["height"] == manifest["model"]["token_layout"]["width"] == SIZE // PATCH
    assert all((r["cam_height"], r["cam_width"]) == (SIZE // PATCH, SIZE // PATCH) for r in rows)
    # The maps are the model's: the eager per-image reference (tests.references) on the loaded model's
    # block1_out tokens on their grid, the head (final LayerNorm, pooling, Dense) by hand.
    model = keras.models.load_model(model_path, custom_objects=custom_objects(read_custom_code(layers_path)))
    by_id = {example.features.feature["image/filename"].bytes_list.value[0].decode():
             tf.io.decode_image(example.features.feature["image/encoded"].bytes_list.value[0]).numpy()
             for example in map(tf.train.Example.FromString, records)}
    images = np.stack([by_id[r["image_id"]] for r in rows]).astype(np.float32)  # in the rows' order
    # Loaded with its weights (the layers' Dense and Embedding inside the custom layers too).
    np.testing.assert_allclose(model(images).numpy(), built(images).numpy(), atol=1e-6)
    features, head = token_split(model, "block1_out", 0, "gap", grid=(SIZE // PATCH, SIZE // PATCH))
    ref = reference(features, head, images, row_targets(rows), "gradcam")
    assert np.abs(ref).max() > 0
    assert_close(row_cams(rows), ref)


def test_a_worker_loads_the_model_from_the_carried_source_after_the_file_is_gone(tmp_path, vit_files):
    from transforms.model_handler import KerasCamModelHandler

    model_path, layers_path, _ = vit_files
    copy = str(tmp_path / "my_layers.py")
    with open(layers_path) as source, open(copy, "w") as target:
        target.write(source.read())
    handler = KerasCamModelHandler(model_path, custom_code=read_custom_code(copy), preprocess="none")
    os.remove(copy)
    pickled = str(tmp_path / "handler.pickle")
    with open(pickled, "wb") as handle:
        pickle.dump(handler, handle)
    script = (f"import pickle; h = pickle.load(open({pickled!r}, 'rb')); w = h.load_model(); "
              "print(w.explainer.target_layer, w.explainer.cam_shape)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"block1_out ({SIZE // PATCH}, {SIZE // PATCH})"


@pytest.mark.parametrize("content, name, expected", [
    (None, "missing.py", "cannot be read"),
    ("raise RuntimeError('no GPU here')\n", "raises.py", "running it failed (RuntimeError: no GPU here)"),
    ("def broken(:\n", "syntax.py", "running it failed (SyntaxError"),
    ("x = 1\n", "layers.txt", "expected a Python file"),
])
def test_a_file_that_cannot_run_is_one_line_at_launch(tmp_path, content, name, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuditError, match=None) as caught:
        read_custom_code(str(path))
    message = str(caught.value)
    assert message.startswith(f"--custom_objects {path}") and expected in message and "\n" not in message
