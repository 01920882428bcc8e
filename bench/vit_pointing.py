"""Do a small ViT's token maps peak on the object, as a CNN's do? All trained here, audited by the job.

    python -m bench.vit_pointing [--seeds 0,1,2] [--seconds 60] [--images 8000] [--json PATH]

Shape images, 40x40: one of the demo's four shapes (`pipeline.demo`: circle, square, triangle, cross;
radius 6-8 px) at a random place on the demo's smooth, noisy backgrounds (40-200 per channel), in a
random dark colour (0-128 per channel), so the shape alone names the class. (In any colour, 0-255, half
the shapes barely stand out and the ViT learns nothing in a minute: test accuracy 0.26-0.30.) For each seed, the same training set and the same training time
(`--seconds`, Adam 1e-3, batch 64, whole epochs until the time is up) for:

  vit  keras.io-style: 5x5 patches -> 8x8 tokens (Conv2D), learnt position embedding (keras_hub's
       `PositionEmbedding`, initialised as ViT's: truncated normal, std 0.02; with its default
       Glorot initialiser, ~10x larger, the maps of one seed peaked on the object in 40% of the
       images instead of 53%), 2 pre-norm attention blocks (width 48, 4 heads, MLP 96), final norm,
       average pooling of the tokens, softmax head. Default target layer: the last block's output
       (`block1_out`, (None, 64, 48)), explained on its 8x8 grid.
  vit_conv_stem  the same ViT with two 3x3 convolutions (16 and 32 channels, ReLU) before the patch embedding:
       a hybrid ViT (the original ViT paper's hybrids; Xiao et al. 2021, "Early convolutions help
       transformers see better"), as small ViTs trained from scratch on little data often are.
       Default target layer: its last block's output (`block1_out`).
  cnn  three 3x3 convolutions (16, 32, 48; pooling after the first two), global average pooling,
       softmax head. Default target layer: the last convolution (10x10).

Each model is saved as .keras and audited by `python -m pipeline` (its default target layer) on the
same `--test_images` held-out images with their boxes, once per CAM method, with
`--pointing_tolerance 3`: the share of images whose map peaks within 3 px of the object's box (the
heatmaps table's `peak_in_box`, the pointing game) is the figure. Chance: the mean share of the image
that the box plus tolerance covers (a map peaking at a uniformly random place hits that often).
The same ViT is also audited at two earlier layers (`--target_layer block0_out`, the last block's input,
and `patch_embed`), to show where its maps lose the object. Medians over the seeds. Needs the `hub` extra (keras_hub), as `scripts/setup_venv.sh` installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from bench.common import run_pipeline_process

SIZE, PATCH, DIM, NUM_CLASSES = 40, 5, 48, 4
STEM_CHANNELS = (16, 32)  # the hybrid ViT's convolutions before its patch embedding
GRID = SIZE // PATCH
TOLERANCE_PX = 3
METHODS = ("gradcam", "gradcampp", "hirescam", "layercam", "xgradcam")
# For comparison, the same ViT explained before its last block (`--target_layer`): the first block's
# output (the last block's input) and the patch embedding.
EARLIER_LAYERS = ("block0_out", "patch_embed")


def shape_image(rng: np.random.Generator) -> tuple[np.ndarray, int, tuple]:
    """(image uint8 [SIZE, SIZE, 3], class, box as fractions): one shape in a random colour."""
    from pipeline.demo import _background, _shape_mask

    kind = int(rng.integers(NUM_CLASSES))
    image = _background(rng, SIZE)
    r = rng.uniform(0.15, 0.2) * SIZE
    cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
    image[_shape_mask(kind, SIZE, cy, cx, r)] = rng.uniform(0, 128, 3)  # darker than most backgrounds
    box = tuple(min(max(v / SIZE, 0.0), 1.0) for v in (cy - r, cx - r, cy + r, cx + r))
    return np.clip(image, 0, 255).astype(np.uint8), kind, box


def shape_set(n: int, seed: int):
    rng = np.random.default_rng(seed)
    items = [shape_image(rng) for _ in range(n)]
    return (np.stack([i for i, _, _ in items]), np.array([k for _, k, _ in items]), [b for _, _, b in items])


def chance(boxes) -> float:
    """Mean share of the image within TOLERANCE_PX of the box."""
    tol = TOLERANCE_PX / SIZE
    return float(np.mean([(min(b[2] + tol, 1) - max(b[0] - tol, 0)) * (min(b[3] + tol, 1) - max(b[1] - tol, 0))
                          for b in boxes]))


def build_vit(seed: int, conv_stem: bool = False):
    """The ViT; `conv_stem`: a hybrid ViT, two 3x3 convolutions (STEM_CHANNELS, ReLU) before the patch
    embedding."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    if conv_stem:
        for i, channels in enumerate(STEM_CHANNELS):
            x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"stem{i}")(x)
    x = keras.layers.Conv2D(DIM, PATCH, strides=PATCH, name="patch_embed")(x)
    x = keras.layers.Reshape((GRID * GRID, DIM), name="tokens")(x)
    x = keras.layers.Add(name="with_positions")([x, keras_hub.layers.PositionEmbedding(
        GRID * GRID, initializer=keras.initializers.TruncatedNormal(stddev=0.02), name="positions")(x)])
    for b in range(2):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln1")(x)
        y = keras.layers.MultiHeadAttention(num_heads=4, key_dim=DIM // 4, name=f"block{b}_attention")(y, y)
        x = keras.layers.Add(name=f"block{b}_add")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln2")(x)
        y = keras.layers.Dense(2 * DIM, activation="gelu", name=f"block{b}_mlp1")(y)
        y = keras.layers.Dense(DIM, name=f"block{b}_mlp2")(y)
        x = keras.layers.Add(name=f"block{b}_out")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, activation="softmax", name="head")(x),
                       name="vit_conv_stem" if conv_stem else "vit")


def build_vit_conv_stem(seed: int):
    return build_vit(seed, conv_stem=True)


def build_cnn(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(48, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, activation="softmax", name="head")(x), name="cnn")


def train(model, images, labels, seconds: float, test_images, test_labels) -> dict:
    import keras

    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    started, epochs = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        model.fit(images.astype(np.float32), labels, batch_size=64, epochs=1, verbose=0)
        epochs += 1
    accuracy = model.evaluate(test_images.astype(np.float32), test_labels, verbose=0)[1]
    return {"epochs": epochs, "train_seconds": time.perf_counter() - started, "test_accuracy": float(accuracy)}


def write_test_shard(folder: str, images, labels, boxes) -> str:
    from pipeline.demo import encode, make_example
    from transforms.records import write_records

    os.makedirs(folder, exist_ok=True)
    write_records(os.path.join(folder, "shapes-00000-of-00001.tfrecord"),
                  [make_example(encode(image), label=int(label), image_id=f"shape-{i:05d}", boxes=[box])
                   for i, (image, label, box) in enumerate(zip(images, labels, boxes, strict=True))])
    return os.path.join(folder, "shapes-*.tfrecord")


def pointing(model_path: str, pattern: str, method: str, output: str, layer: str | None = None) -> dict:
    import pyarrow.parquet as pq

    try:
        result = run_pipeline_process(pattern, model_path, output, extra_args=(
            "--method", method, "--pointing_tolerance", str(TOLERANCE_PX), "--no_report",
            "--faithfulness_sample", "0", "--sanity_images", "0", *(("--target_layer", layer) if layer else ())))
    except RuntimeError as exc:  # HiResCAM where a LayerNorm follows the layer: refused (AuditError), no maps
        if "gradient is orthogonal" in str(exc):
            return {"hits": None, "images": 0, "target_layer": layer, "refused": True}
        raise
    table = pq.read_table(os.path.join(result["run_dir"], "heatmaps"), columns=["peak_in_box", "target_layer"])
    hits = table.column("peak_in_box").to_numpy(zero_copy_only=False)
    layer = table.column("target_layer")[0].as_py()
    return {"hits": int(np.sum(hits == True)), "images": len(hits), "target_layer": layer}  # noqa: E712


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.vit_pointing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seconds", type=float, default=60.0, help="Training time per model")
    parser.add_argument("--images", type=int, default=8000, help="Training images")
    parser.add_argument("--test_images", type=int, default=400)
    parser.add_argument("--methods", default=",".join(METHODS), help="CAM methods, comma-separated")
    parser.add_argument("--layers", default=",".join(EARLIER_LAYERS),
                        help="The ViT's other layers to audit it at, comma-separated (besides its default layer)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    layers = tuple(name for name in args.layers.split(",") if name)
    workdir = tempfile.mkdtemp(prefix="vit_pointing_")
    runs: list = []
    try:
        test_images, test_labels, test_boxes = shape_set(args.test_images, seed=10_000)
        pattern = write_test_shard(os.path.join(workdir, "test"), test_images, test_labels, test_boxes)
        for seed in (int(s) for s in args.seeds.split(",")):
            images, labels, _ = shape_set(args.images, seed=seed)
            for kind, build in (("vit", build_vit), ("vit_conv_stem", build_vit_conv_stem), ("cnn", build_cnn)):
                model = build(seed)
                fit = train(model, images, labels, args.seconds, test_images, test_labels)
                path = os.path.join(workdir, f"{kind}-{seed}.keras")
                model.save(path)
                for layer in (None, *(layers if kind == "vit" else ())):  # None: the default layer
                    name = kind if layer is None else f"{kind} at {layer}"
                    run = {"seed": seed, "model": name, **fit, "methods": {
                        method: pointing(path, pattern, method,
                                         os.path.join(workdir, f"out-{name.replace(' ', '-')}-{seed}-{method}"), layer)
                        for method in methods}}
                    runs.append(run)
                    print(f"seed {seed} {name}: {fit['epochs']} epochs in {fit['train_seconds']:.0f} s, test accuracy "
                          f"{fit['test_accuracy']:.2f}; peak on the object: "
                          + ", ".join(f"{m} refused" if r["hits"] is None else f"{m} {r['hits']}/{r['images']}"
                                      for m, r in run["methods"].items())
                          + f" (layer {run['methods'][methods[0]]['target_layer']})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = chance(test_boxes)
    print(f"\nShare of images whose map peaks on the object (pointing game, {TOLERANCE_PX} px), medians over seeds "
          f"{args.seeds}; chance {100 * base:.0f}%; {os.cpu_count()} CPUs, {args.seconds:.0f} s of training each\n")
    print("| model | test accuracy | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    summary: dict = {"chance": base, "models": {}}
    for kind in dict.fromkeys(r["model"] for r in runs):  # vit, vit at each other layer, vit_conv_stem, cnn
        mine = [r for r in runs if r["model"] == kind]
        shares = {m: None if any(r["methods"][m]["hits"] is None for r in mine) else
                  statistics.median(r["methods"][m]["hits"] / r["methods"][m]["images"] for r in mine) for m in methods}
        accuracy = statistics.median(r["test_accuracy"] for r in mine)
        summary["models"][kind] = {"accuracy": accuracy, "pointing": shares}
        print(f"| {kind} | {accuracy:.2f} | " + " | ".join(
            "refused" if shares[m] is None else f"{100 * shares[m]:.0f}%" for m in methods) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": runs, "summary": summary, "args": vars(args)}, handle, indent=1)
    return summary


if __name__ == "__main__":
    main()
