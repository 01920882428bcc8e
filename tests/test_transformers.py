"""Vision Transformers: token maps on the patch grid, the default layer, several outputs.

Tiny keras.io-style models (32x32 images, patch 4, dim 32, 2 blocks): a ViT
with global average pooling, a ViT with a class token, a DeiT-style ViT with
two prefix tokens (class + distillation), and a Swin-style model whose stages
output (B, H, W, C) maps. Every CAM method is checked against the eager,
per-image reference of `tests.references.reference` computed on the same
grid: the features are a keras.Model up to the target layer with the tokens
reshaped to the grid here, the head is the rest of the model applied to the
un-reshaped tokens (the prefix tokens put back in front), written from the
model's layers by hand. Tolerance |cam - ref| <= 1e-3 * max|ref| + 1e-6.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.demo import encode, make_example
from tests.references import reference
from tests.test_cam_methods import assert_close
from tests.test_models import audit
from transforms.cam.explainer import CamExplainer
from transforms.cam.layers import choose_target_layer
from transforms.cam.methods import METHODS
from transforms.cam.tokens import infer_token_layout
from transforms.errors import AuditError

SIZE, PATCH, DIM, CLASSES = 32, 4, 32, 4
GRID = SIZE // PATCH


@keras.saving.register_keras_serializable(package="test_transformers")
class PrefixTokens(keras.layers.Layer):
    """Prepends `count` learnt tokens (class, distillation) and adds a learnt position embedding."""

    def __init__(self, count: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def build(self, input_shape):
        length, dim = input_shape[1], input_shape[2]
        if self.count:
            self.tokens = self.add_weight(shape=(1, self.count, dim), initializer="random_normal", name="tokens")
        self.positions = self.add_weight(shape=(1, self.count + length, dim), initializer="random_normal",
                                         name="positions")

    def call(self, x):
        if self.count:
            batch = keras.ops.shape(x)[0]
            prefix = keras.ops.broadcast_to(self.tokens, (batch, self.count, keras.ops.shape(x)[2]))
            x = keras.ops.concatenate([prefix, x], axis=1)
        return x + self.positions

    def get_config(self):
        return {**super().get_config(), "count": self.count}


@keras.saving.register_keras_serializable(package="test_transformers")
class FirstToken(keras.layers.Layer):
    """(B, S, D) -> (B, D): the class token."""

    def call(self, x):
        return x[:, 0]


def transformer_block(x, name: str, dim: int, spatial: bool = False):
    """Pre-norm block: x + MHA(LN(x)), then x + MLP(LN(x)); `spatial`: x is (B, H, W, C) (Swin-style)."""
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    if spatial:
        height, width = x.shape[1], x.shape[2]
        y = keras.layers.Reshape((height * width, dim))(y)
    y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=dim // 2, name=f"{name}_attention")(y, y)
    if spatial:
        y = keras.layers.Reshape((height, width, dim))(y)
    x = keras.layers.Add(name=f"{name}_add")([x, y])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = keras.layers.Dense(2 * dim, activation="gelu", name=f"{name}_mlp1")(y)
    y = keras.layers.Dense(dim, name=f"{name}_mlp2")(y)
    return keras.layers.Add(name=f"{name}_out")([x, y])


def vit(prefix: int = 0, head: str = "gap", seed: int = 0, classes: int = CLASSES, extra_output: bool = False):
    """A keras.io-style ViT: Conv2D patch embedding, `prefix` class/distillation tokens, 2 blocks, final
    norm, pooling (gap) or the class token (cls), a softmax head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(DIM, PATCH, strides=PATCH, name="patch_embed")(x)
    x = keras.layers.Reshape((GRID * GRID, DIM), name="tokens")(x)
    x = PrefixTokens(prefix, name="prefix_tokens")(x)
    for i in range(2):
        x = transformer_block(x, f"block{i}", DIM)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(x) if head == "gap" else FirstToken(name="pool")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head")(pooled)
    if extra_output:
        box = keras.layers.Dense(4, name="box")(pooled)
        return keras.Model(inputs, [box, outputs], name="vit_two_heads")
    return keras.Model(inputs, outputs, name=f"vit_p{prefix}_{head}")


def swin(seed: int = 0):
    """Swin-style: stages on (B, H, W, C) maps (attention over the stage's tokens), a patch-merging Conv2D."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, PATCH, strides=PATCH, name="patch_embed")(x)  # 8x8x16
    x = transformer_block(x, "stage1", 16, spatial=True)
    x = keras.layers.Conv2D(32, 2, strides=2, name="patch_merge")(x)  # 4x4x32
    x = transformer_block(x, "stage2", 32, spatial=True)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="head")(x), name="swin")


def token_split(model, target: str, prefix: int, pooling: str, grid=(GRID, GRID)):
    """(features, head) for `reference`: features -> the target tokens' patch part as (1, h, w, D); head -> the
    prefix tokens put back, then the model's final norm, pooling and Dense by hand (pre-softmax)."""
    extractor = keras.Model(model.inputs, model.get_layer(target).output)
    norm, dense = model.get_layer("final_norm"), model.get_layer("head")
    saved = {}

    def features(image):
        tokens = extractor(image)
        saved["prefix"] = tokens[:, :prefix]
        return tf.reshape(tokens[:, prefix:], (1, grid[0], grid[1], tokens.shape[-1]))

    def head(grid_tokens):
        tokens = tf.concat([saved["prefix"], tf.reshape(grid_tokens, (1, -1, grid_tokens.shape[-1]))], axis=1)
        tokens = norm(tokens)
        pooled = tf.reduce_mean(tokens, axis=1) if pooling == "gap" else tokens[:, 0]
        return tf.matmul(pooled, dense.kernel) + dense.bias

    return features, head


def rest_split(model, target: str, prefix: int):
    """(features, head) for a target inside the blocks: the head is the model from block1's input to the Dense
    (its softmax removed) applied to the un-reshaped tokens, the prefix tokens put back in front."""
    extractor = keras.Model(model.inputs, model.get_layer(target).output)
    rest = keras.Model(model.get_layer("block1_ln1").input, model.get_layer("head").output)  # block1 .. head
    rest.get_layer("head").activation = keras.activations.linear
    saved = {}

    def features(image):
        tokens = extractor(image)
        saved["prefix"] = tokens[:, :prefix]
        return tf.reshape(tokens[:, prefix:], (1, GRID, GRID, tokens.shape[-1]))

    def head(grid_tokens):
        return rest(tf.concat([saved["prefix"], tf.reshape(grid_tokens, (1, -1, grid_tokens.shape[-1]))], axis=1))

    return features, head


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


VITS = {  # name: (prefix tokens, pooling, default layer)
    "vit_gap": (0, "gap", "block1_out"),
    # A class-token head: the last block's patch tokens never reach the class token (zero gradient), so the
    # default is the last block's input.
    "vit_class_token": (1, "cls", "block0_out"),
    "deit_two_prefix": (2, "cls", "block0_out"),
}


# HiResCAM at the gap ViT's last block (it feeds the final LayerNorm) is refused:
# test_hirescam_is_refused_where_a_layernorm_follows_and_is_each_tokens_share_after_it.
@pytest.mark.parametrize(("name", "method"), [(name, method) for name in VITS for method in METHODS
                                              if (name, method) != ("vit_gap", "hirescam")])
def test_vit_token_maps_match_eager_reference(name, method):
    prefix, pooling, layer = VITS[name]
    explainer = CamExplainer(vit(prefix, pooling), method=method, target=None)
    assert explainer.target_layer == layer
    assert "last attention block" in explainer.target_layer_reason
    layout = explainer.token_layout
    assert (layout.prefix, layout.height, layout.width) == (prefix, GRID, GRID)
    assert "patch_embed" in layout.source
    batch = images()
    out = explainer(batch)
    assert out["cam"].shape == (len(batch), 1, GRID, GRID)
    if layer == "block1_out":
        features, head = token_split(vit(prefix, pooling), "block1_out", prefix, pooling)
    else:
        features, head = rest_split(vit(prefix, pooling), layer, prefix)
    ref = reference(features, head, batch, out["target_class"].tolist(), method)
    assert np.abs(ref).max() > 0
    assert_close(out["cam"], ref)


@pytest.fixture(scope="module")
def convnext():
    """keras.applications' ConvNeXtTiny (random weights, 96x96: a 3x3 last stage)."""
    keras.utils.set_random_seed(2)
    return keras.applications.ConvNeXtTiny(weights=None, input_shape=(96, 96, 3), classes=CLASSES)


@pytest.mark.parametrize("method", list(METHODS))
def test_convnext_maps_match_eager_reference(convnext, method):
    """ConvNeXt's last block ends in a residual sum that is an operation, not a layer: the default target is
    the block's last layer (its branch); the reference's head adds the block's input back, then the model's
    pooling, LayerNormalization and Dense (pre-softmax)."""
    explainer = CamExplainer(convnext, method=method)
    layer = "convnext_tiny_stage_3_block_2_identity"
    assert explainer.target_layer == layer and explainer.cam_shape == (3, 3)
    branch = keras.Model(convnext.inputs, convnext.get_layer(layer).output)
    block_input = keras.Model(convnext.inputs, convnext.get_layer("convnext_tiny_stage_3_block_2_depthwise_conv").input)
    norm, dense = convnext.get_layer("convnext_tiny_head_layernorm"), convnext.get_layer("convnext_tiny_head_dense")
    saved = {}

    def features(image):
        saved["skip"] = block_input(image)
        return branch(image)

    def head(a):
        return tf.matmul(norm(tf.reduce_mean(a + saved["skip"], axis=(1, 2))), dense.kernel) + dense.bias

    batch = np.random.default_rng(4).uniform(0, 255, (3, 96, 96, 3)).astype(np.float32)
    out = explainer(batch)
    ref = reference(features, head, batch, out["target_class"].tolist(), method)
    assert np.abs(ref).max() > 0
    assert_close(out["cam"], ref)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "hirescam"])  # refused there: the test below
def test_swin_style_stage_output_is_a_map(method):
    explainer = CamExplainer(swin(), method=method)
    assert explainer.target_layer == "stage2_out" and explainer.token_layout is None
    batch = images()
    out = explainer(batch, np.arange(5) % CLASSES)
    assert out["cam"].shape == (5, 1, 4, 4)
    model = swin()
    extractor = keras.Model(model.inputs, model.get_layer("stage2_out").output)
    norm, dense = model.get_layer("final_norm"), model.get_layer("head")

    def head(a):
        return tf.matmul(tf.reduce_mean(norm(a), axis=(1, 2)), dense.kernel) + dense.bias

    ref = reference(extractor, head, batch, out["target_class"].tolist(), method)
    assert_close(out["cam"], ref)


def test_hirescam_is_refused_where_a_layernorm_follows_and_is_each_tokens_share_after_it():
    """Gradient x activation summed over channels is 0 at every token of a layer feeding a LayerNorm (scaling
    a token leaves the score unchanged): the gap ViT's last block, a Swin-style stage. Refused with one line;
    at the LayerNorm's output HiResCAM is each token's share of the score, w_c . z_i / N."""
    for model, unit, layer in ((vit(0, "gap"), "token", "block1_out"), (swin(), "position", "stage2_out")):
        with pytest.raises(AuditError) as caught:
            CamExplainer(model, method="hirescam")
        message = str(caught.value)
        assert message.startswith(f"--method hirescam at {layer!r}: each {unit}'s gradient is orthogonal")
        assert "--target_layer" in message and "\n" not in message
    # the same layers with every other method, and HiResCAM where the ViT's head reads the last block's input
    assert CamExplainer(vit(0, "gap"), method="gradcam").target_layer == "block1_out"
    assert CamExplainer(vit(1, "cls"), method="hirescam").target_layer == "block0_out"
    model = vit(0, "gap")
    explainer = CamExplainer(vit(0, "gap"), method="hirescam", target_layer="final_norm")
    batch = images()
    out = explainer(batch)
    normed = keras.Model(model.inputs, model.get_layer("final_norm").output)(batch).numpy()  # [B, N, D]
    kernel = model.get_layer("head").kernel.numpy()
    targets = np.asarray(out["target_class"]).reshape(len(batch), -1)[:, 0]  # one target per image
    share = np.einsum("bnd,bd->bn", normed, kernel[:, targets].T) / normed.shape[1]
    ref = np.maximum(share, 0).reshape(len(batch), 1, GRID, GRID)
    assert np.abs(ref).max() > 0
    assert_close(out["cam"], ref)


def test_topk_on_tokens():
    explainer = CamExplainer(vit(1, "cls"), method="gradcam", target=None, target_layer="block0_out")
    assert explainer.target_layer_reason == "given by --target_layer"
    from transforms.cam.targets import parse_target

    explainer = CamExplainer(vit(1, "cls"), target=parse_target("topk:2"), target_layer="block0_out")
    batch = images(3)
    out = explainer(batch)
    assert out["cam"].shape == (3, 2, GRID, GRID)
    features, head = rest_split(vit(1, "cls"), "block0_out", 1)
    ref = reference(features, head, batch, out["target_class"].tolist(), "gradcam")
    assert_close(out["cam"], ref)


def test_token_layout_inference_and_options():
    kwargs = {"layer": "enc", "shape": (None, 0, 8), "input_hw": (32, 32)}
    grid = infer_token_layout(65, **kwargs)
    assert (grid.prefix, grid.height, grid.width) == (1, 8, 8) and "sequence length" in grid.source
    assert (infer_token_layout(64, **kwargs).prefix, infer_token_layout(66, **kwargs).prefix) == (0, 2)
    assert (infer_token_layout(201, **{**kwargs, "input_hw": (224, 224)}).prefix) == 5  # cls + 4 registers
    wide = infer_token_layout(33, **{**kwargs, "input_hw": (32, 64)})
    assert (wide.prefix, wide.height, wide.width) == (1, 4, 8)
    assert infer_token_layout(50, patch_grids=[("embed", 7, 7)], **kwargs).source.startswith("patch embedding")
    assert (infer_token_layout(24, token_grid=(4, 6), **kwargs).prefix) == 0
    assert (infer_token_layout(26, token_grid=(4, 6), prefix_tokens=2, **kwargs).height) == 4
    with pytest.raises(AuditError, match="split several ways.*--token_grid"):
        infer_token_layout(17, **kwargs)  # 1 + 4x4 or 8 + 3x3
    assert infer_token_layout(17, prefix_tokens=1, **kwargs).height == 4
    with pytest.raises(AuditError, match="match no patch grid.*--token_grid HxW.*--prefix_tokens P"):
        infer_token_layout(40, prefix_tokens=0, **kwargs)
    with pytest.raises(AuditError, match="are not 1 prefix"):
        infer_token_layout(26, token_grid=(4, 6), prefix_tokens=1, **kwargs)


def test_token_grid_options_reach_the_explainer():
    explainer = CamExplainer(vit(2, "cls"), token_grid=(8, 8), prefix_tokens=2)
    assert explainer.token_layout.source.startswith("options")
    with pytest.raises(AuditError, match="--token_grid"):
        CamExplainer(vit(2, "cls"), token_grid=(4, 4))


def test_default_layer_is_never_before_attention():
    path, reason = choose_target_layer(vit(1, "cls"))
    assert path == "block1_out" and "block1_attention" in reason
    explainer = CamExplainer(vit(1, "cls"))  # a class-token head: the last block's input (the explainer's probe)
    assert explainer.target_layer == "block0_out" and "zero gradient" in explainer.target_layer_reason
    path, reason = choose_target_layer(keras.applications.MobileNetV2(weights=None, alpha=0.35))
    assert path == "out_relu" and "4-D" in reason


def test_a_layer_that_cannot_be_explained_is_one_actionable_line():
    with pytest.raises(AuditError, match=r"--target_layer 'pool'.*expected a 4-D .* or a 3-D"):
        CamExplainer(vit(0, "gap"), target_layer="pool")


def test_several_outputs_need_model_output():
    with pytest.raises(AuditError, match=r"2 outputs \(0='box'.*1='head'.*--model_output") as info:
        CamExplainer(vit(0, "gap", extra_output=True))
    assert "\n" not in str(info.value)
    batch = images(3)
    by_name = CamExplainer(vit(0, "gap", extra_output=True), output="head")
    by_index = CamExplainer(vit(0, "gap", extra_output=True), output=1)
    single = CamExplainer(vit(0, "gap"))
    assert (by_name.output_index, by_name.num_classes, by_name.head) == (1, CLASSES, "softmax")
    for explainer in (by_name, by_index):
        np.testing.assert_allclose(explainer(batch)["cam"], single(batch)["cam"], rtol=1e-5, atol=1e-6)
    with pytest.raises(AuditError, match="--model_output: expected an output name or index"):
        CamExplainer(vit(0, "gap", extra_output=True), output="boxes")


def shape_records(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [make_example(encode(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8), "png"),
                         label=int(rng.integers(CLASSES)), image_id=f"img-{i:03d}") for i in range(n)]


def test_job_on_a_vit_explains_the_last_block_on_the_grid(tmp_path):
    path = str(tmp_path / "vit.keras")
    vit(1, "cls").save(path)
    rows, manifest = audit(tmp_path, shape_records(7), path, "--method", "layercam")
    given, given_manifest = audit(tmp_path / "given", shape_records(7), path, "--method", "layercam",
                                  "--token_grid", f"{GRID}x{GRID}", "--prefix_tokens", "1")
    assert [r["cam"] for r in given] == [r["cam"] for r in rows]  # the same layout, given instead of inferred
    assert given_manifest["model"]["token_layout"]["source"].startswith("options")
    assert given_manifest["faithfulness"]["sanity"]["images"] == 7  # run with the given layout, not skipped
    model = manifest["model"]
    assert model["target_layer"] == "block0_out"  # class-token head: the last block's input
    assert "last attention block" in model["target_layer_reason"]
    assert model["token_layout"]["prefix"] == 1 and model["cam_shape"] in ([GRID, GRID], (GRID, GRID))
    assert {(r["cam_height"], r["cam_width"]) for r in rows} == {(GRID, GRID)}
    json.dumps(manifest, default=str)


def test_a_staging_error_becomes_the_error_it_wraps():
    from transforms.errors import one_line

    class StagingError(Exception):
        pass

    text = "in user code:\n\n    File \"model.py\", line 3, in call\n        x = y\n\n    AttributeError: 'NoneType' object has no attribute 'shape'\n"
    assert one_line(StagingError(text)) == "AttributeError: 'NoneType' object has no attribute 'shape'"


def test_job_on_a_two_output_model_needs_model_output(tmp_path, capsys):
    from pipeline import cli
    from tests.helpers import write_shard

    path = str(tmp_path / "two_heads.keras")
    vit(0, "gap", extra_output=True).save(path)
    records = shape_records(4, seed=1)
    rows, manifest = audit(tmp_path, records, path, "--model_output", "head")
    assert manifest["model"]["output"] == {"index": 1, "name": "head", "count": 2}
    assert manifest["model"]["target_layer"] == "block1_out" and len(rows) == 4
    # The sanity check explains the same output (it was skipped before it could be given one).
    sanity = manifest["faithfulness"]["sanity"]
    assert sanity["images"] == 4 and sanity["layers"][0] == "head" and sanity["correlation"] is not None
    shard = write_shard(str(tmp_path), "again-00000.tfrecord", records)
    with pytest.raises(SystemExit) as info:
        cli.main(["--input", shard, "--model", path, "--output", str(tmp_path / "o2"), "--no_report"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("model has 2 outputs (0='box' (None, 4), 1='head' (None, 4)): pass --model_output" in line
               for line in err)


def test_token_options_parse_and_bad_values_exit_2(capsys):
    from pipeline.options import parse_args

    config, _ = parse_args(["--input", "x", "--model", "y", "--token_grid", "14X14", "--prefix_tokens", "1",
                            "--model_output", "logits"])
    assert (config.token_grid, config.prefix_tokens, config.model_output) == ((14, 14), 1, "logits")
    assert config.as_json()["token_grid"] == "14x14"
    for bad in (["--token_grid", "14"], ["--prefix_tokens", "-1"]):
        with pytest.raises(SystemExit) as info:
            parse_args(["--input", "x", "--model", "y", *bad])
        assert info.value.code == 2
    assert "--token_grid: expected ROWSxCOLUMNS" in capsys.readouterr().err


def test_report_strategies_and_statistics_run_on_token_maps(tmp_path):
    """A job on a ViT with the report on: strategies clustered on the 8x8 patch grid, every cluster's mean map
    and the class's mean map on that grid, the report drawing a panel per strategy."""
    from pipeline.graph import run
    from tests.helpers import read_parquet_dir, write_shard

    path = str(tmp_path / "vit.keras")
    vit(0, "gap").save(path)
    shard = write_shard(str(tmp_path), "data-00000.tfrecord", shape_records(40, seed=3))
    output = tmp_path / "out"
    _, manifest = run(["--input", shard, "--model", path, "--output", str(output), "--run_id", "t",
                       "--batch_size", "8", "--target", "class:0"])  # one class: 40 maps to cluster
    run_dir = output / "run=t"
    clusters = read_parquet_dir(str(run_dir / "clusters")).to_pylist()
    assert clusters and {c["class_id"] for c in clusters} == {0}
    assert sum(c["size"] for c in clusters) == 40
    assert all((c["cam_height"], c["cam_width"]) == (GRID, GRID) and len(c["mean_cam"]) == GRID * GRID
               for c in clusters)
    stats = {r["class_id"]: r for r in read_parquet_dir(str(run_dir / "class_stats")).to_pylist()}
    assert stats[0]["num_targeted"] == 40 and (stats[0]["cam_height"], stats[0]["cam_width"]) == (GRID, GRID)
    assert len(stats[0]["mean_cam"]) == GRID * GRID
    html = (run_dir / "report.html").read_text()
    assert "<h2 id=strategies>" in html
    assert html.count("class='strategy") == len(clusters)
    assert manifest["report"].endswith("report.html")
