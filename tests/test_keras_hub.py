"""keras_hub image classifiers, whose transformer blocks all live inside one layer.

keras-hub 0.32 is part of the test setup (scripts/setup_venv.sh installs it, see setup.py's `hub`
extra), so nothing here skips without it. The models are built from a config with random weights
(nothing is downloaded): a `ViTImageClassifier` (32x32 images, patch 8: a 4x4 grid and a class
token; 2 blocks inside `vit_encoder`) and a `DeiTImageClassifier` (class and distillation tokens; its
encoder and blocks return tuples). With a head that pools every token ("gap") the default target is
the encoder's output; with the class-token head (keras_hub's default, "token") the encoder's patch
tokens never reach the score, so the default is the last block's input: the output of the block
before it, inside the encoder. Every map is checked against the eager, per-image GradientTape
reference of `tests.references.reference` on the same grid, the features and head written from the
model's layers by hand. Tolerance |cam - ref| <= 1e-3 * max|ref| + 1e-6.
"""

import functools
import os
import subprocess
import sys
import threading

import keras
import keras_hub  # installed by scripts/setup_venv.sh: no importorskip
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import read_parquet_dir, write_shard
from tests.references import reference
from tests.test_cam_methods import assert_close
from transforms.cam.explainer import CamExplainer
from transforms.cam.methods import METHODS
from transforms.errors import AuditError
from transforms.model_loading import load_keras_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, PATCH, DIM, CLASSES = 32, 8, 32, 3
GRID = SIZE // PATCH


def vit(pooling: str = "token", seed: int = 0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=PATCH, num_layers=2,
                                            num_heads=2, hidden_dim=DIM, mlp_dim=2 * DIM, name="vit_backbone")
    return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=CLASSES, preprocessor=None,
                                               pooling=pooling, name=f"vit_{pooling}")


def deit(pooling: str = "token", seed: int = 0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.DeiTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=PATCH, num_layers=2,
                                             num_heads=2, hidden_dim=DIM, intermediate_dim=2 * DIM,
                                             name="deit_backbone")
    return keras_hub.models.DeiTImageClassifier(backbone=backbone, num_classes=CLASSES, preprocessor=None,
                                                pooling=pooling, name=f"deit_{pooling}")


KINDS = {  # name: (builder, embedding layer, encoder layer, prefix tokens)
    "vit": (vit, "vit_patching_and_embedding", "vit_encoder", 1),
    "deit": (deit, "deit_patching_and_embedding", "deit_encoder", 2),
}


def first(out):
    """A keras_hub DeiT layer returns (tokens, ...): the tokens."""
    return out[0] if isinstance(out, (list, tuple)) else out


def split(kind: str, pooling: str):
    """(features, head) for `reference`, from a fresh copy of the model's layers called by hand.

    "gap": the target is the encoder's output, the head averages every token. "token": the target is
    block 1's output (block 2's input); the head runs block 2, the encoder's final norm, the class token.
    Both end with the Dense's kernel and bias (pre-activation).
    """
    build, embedding, encoder, prefix = KINDS[kind]
    model = build(pooling)
    backbone = model.backbone
    embed, enc = backbone.get_layer(embedding), backbone.get_layer(encoder)
    dense = model.get_layer("predictions")
    saved = {}

    def features(image):
        tokens = first(backbone(image)) if pooling == "gap" else first(enc.encoder_layers[0](embed(image)))
        saved["prefix"] = tokens[:, :prefix]
        return tf.reshape(tokens[:, prefix:], (1, GRID, GRID, DIM))

    def head(grid):
        tokens = tf.concat([saved["prefix"], tf.reshape(grid, (1, -1, DIM))], axis=1)
        if pooling == "gap":
            pooled = tf.reduce_mean(tokens, axis=1)
        else:
            pooled = enc.layer_norm(first(enc.encoder_layers[1](tokens)))[:, 0]
        return tf.matmul(pooled, dense.kernel) + dense.bias

    return features, head


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


DEFAULT_LAYERS = {  # (kind, pooling): (default target layer, words of its reason)
    ("vit", "gap"): ("vit_backbone/vit_encoder", "(ViTEncoder) holds the model's last attention layers: its output"),
    ("vit", "token"): ("vit_backbone/vit_encoder/transformer_block_1",
                       "input of the last attention block ('vit_backbone/vit_encoder/transformer_block_2'"),
    ("deit", "gap"): ("deit_backbone/deit_encoder", "(DeiTEncoder) holds the model's last attention layers"),
    ("deit", "token"): ("deit_backbone/deit_encoder/transformer_block_1",
                        "input of the last attention block ('deit_backbone/deit_encoder/transformer_block_2'"),
}


# ---------------------------------------------------------------- the CLI run, in the background

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`python -m pipeline` on a saved keras_hub ViT (class-token head) and 5 PNG records, in a fresh process
    (keras_hub not imported beforehand: the .keras file names its modules), started at once in a thread;
    the test of this run waits for it."""
    from pipeline.demo import encode, make_example

    folder = tmp_path_factory.mktemp("hub_cli")
    model_path = str(folder / "vit.keras")
    vit("token").save(model_path)
    rng = np.random.default_rng(3)
    records = [make_example(encode(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8), "png"),
                            label=i % CLASSES, image_id=f"hub-{i}") for i in range(5)]
    shard = write_shard(str(folder), "data-00000.tfrecord", records)
    output = folder / "out"
    command = [sys.executable, "-m", "pipeline", "--input", shard, "--model", model_path, "--output", str(output),
               "--run_id", "test", "--batch_size", "2", "--method", "layercam", "--no_report"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    box = {}

    def target():
        box["done"] = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=str(folder))

    thread = threading.Thread(target=target, name="hub-cli-run", daemon=True)
    thread.start()

    def result():
        thread.join(timeout=330)
        assert not thread.is_alive() and "done" in box, "the CLI run did not finish (or raised)"
        return box["done"], output / "run=test", model_path

    return result


@functools.lru_cache(maxsize=None)
def explained(kind: str, pooling: str, method: str):
    """(explainer with the default target layer, images, its output); one per case for the whole module."""
    explainer = CamExplainer(KINDS[kind][0](pooling), method=method)
    batch = images(seed=len(kind))
    return explainer, batch, explainer(batch)


def test_default_layer_of_the_vit_is_the_encoder_output(cli_run):  # cli_run: starts the CLI run at once
    explainer = explained("vit", "gap", "gradcam")[0]
    layer, words = DEFAULT_LAYERS["vit", "gap"]
    assert explainer.target_layer == layer and words in explainer.target_layer_reason
    assert "last attention block" in explainer.target_layer_reason
    layout = explainer.token_layout
    assert (layout.prefix, layout.height, layout.width) == (1, GRID, GRID)
    # 17 tokens alone split two ways (1 + 4x4, 8 + 3x3): the grid comes from the Conv2D inside the embedding
    assert layout.source == "patch embedding 'vit_backbone/vit_patching_and_embedding/patch_embedding' 4x4"
    # A class-token head: the encoder's patch tokens get zero gradient, so the last block's input inside it
    explainer = explained("vit", "token", "gradcam")[0]
    layer, words = DEFAULT_LAYERS["vit", "token"]
    assert explainer.target_layer == layer and words in explainer.target_layer_reason
    assert "zero gradient" in explainer.target_layer_reason
    assert (explainer.token_layout.prefix, explainer.cam_shape) == (1, (GRID, GRID))


@pytest.mark.parametrize("pooling", ["token", "gap"])
@pytest.mark.parametrize("method", list(METHODS))
def test_vit_maps_match_eager_reference(method, pooling):
    explainer, batch, out = explained("vit", pooling, method)
    assert explainer.target_layer == DEFAULT_LAYERS["vit", pooling][0]
    assert out["cam"].shape == (len(batch), 1, GRID, GRID)
    features, head = split("vit", pooling)
    ref = reference(features, head, batch, out["target_class"].tolist(), method)
    assert np.abs(ref).max() > 0
    assert_close(out["cam"], ref)


@pytest.mark.parametrize(("pooling", "method"), [("token", "hirescam"), ("gap", "gradcampp")])
def test_deit_default_layer_and_maps_match_eager_reference(pooling, method):
    explainer, batch, out = explained("deit", pooling, method)
    layer, words = DEFAULT_LAYERS["deit", pooling]
    assert explainer.target_layer == layer and words in explainer.target_layer_reason
    layout = explainer.token_layout
    assert (layout.prefix, layout.height, layout.width) == (2, GRID, GRID)  # class + distillation tokens
    features, head = split("deit", pooling)
    ref = reference(features, head, batch, out["target_class"].tolist(), method)
    assert np.abs(ref).max() > 0
    assert_close(out["cam"], ref)


def test_blocks_inside_the_encoder_can_be_named():
    explainer = CamExplainer(vit("token"), target_layer="vit_encoder/transformer_block_1", method="hirescam")
    assert explainer.target_layer == "vit_backbone/vit_encoder/transformer_block_1"
    assert explainer.target_layer_reason == "given by --target_layer"
    # A name that is not there: the error lists the blocks inside the encoder too (keras_hub counts from 1).
    with pytest.raises(AuditError, match=r"layers inside \[.*'vit_backbone/vit_encoder'.*\]: .*"
                                         r"'vit_backbone/vit_encoder/transformer_block_1'"):
        CamExplainer(vit("token"), target_layer="transformer_block_0")
    with pytest.raises(AuditError, match=r"--target_layer 'mha'.*ambiguous"):
        CamExplainer(vit("token"), target_layer="mha")
    with pytest.raises(AuditError, match=r"--target_layer 'dense_2'.*ambiguous"):
        CamExplainer(vit("token"), target_layer="dense_2")


def test_saved_model_loads_back_in_safe_mode(tmp_path, monkeypatch):
    path = str(tmp_path / "vit.keras")
    model = vit("gap")
    model.save(path)
    loaded = load_keras_model(path)  # safe mode on
    assert type(loaded).__name__ == "ViTImageClassifier"
    batch = images(2)
    np.testing.assert_allclose(loaded(batch), model(batch), rtol=1e-5, atol=1e-5)
    # Without keras_hub (the classes registered by its import are in this process, so Keras's error, as a
    # process without keras_hub raises it, is replayed): one line saying what to install.
    monkeypatch.setitem(sys.modules, "keras_hub", None)

    def load_model(*args, **kwargs):
        raise TypeError("Could not deserialize class 'ViTImageClassifier' because its parent module "
                        "keras_hub.src.models.vit.vit_image_classifier cannot be imported.")

    monkeypatch.setattr(keras.models, "load_model", load_model)
    with pytest.raises(AuditError, match=r"made of keras_hub classes, and keras_hub cannot be imported.*\[hub\]"):
        load_keras_model(path)


def test_cli_run_on_a_saved_vit_explains_every_image(cli_run):
    import json

    done, run_dir, model_path = cli_run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Explained 5 of 5 records" in done.stdout
    rows = read_parquet_dir(str(run_dir / "heatmaps")).to_pylist()
    assert sorted(r["image_id"] for r in rows) == [f"hub-{i}" for i in range(5)]
    assert {(r["cam_height"], r["cam_width"]) for r in rows} == {(GRID, GRID)}
    assert all(np.isfinite(r["cam"]).all() for r in rows) and any(np.max(r["cam"]) > 0 for r in rows)
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    model = manifest["model"]
    assert model["target_layer"] == DEFAULT_LAYERS["vit", "token"][0]
    assert model["token_layout"]["prefix"] == 1
    assert manifest["counts"]["records_rejected"] == {"decode": 0, "compute": 0}
