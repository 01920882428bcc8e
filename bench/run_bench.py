"""The pipeline against its speed limit and against its peers, in one run.

    python -m bench.run_bench [--quick] [--models resnet50,mobilenet_v2]
        [--repeats 3] [--images N] [--json PATH]

For each model (keras.applications, random fixed weights, 224x224, batch 32):

  F  forward-only inference: `CamExplainer.forward` (one tf.function), images/s
  K  the project's compute step on in-memory batches: `CamExplainer.__call__`
     (-> `.explain`, one tf.function), for every CAM method
  P  the whole job, `pipeline.graph.run([...])` on the default in-process
     FnApiRunner, over TFRecord shards of JPEG and of PNG images -> Parquet,
     each run in its own subprocess (so its peak RSS is its own)
  N  the keras.io Grad-CAM example: eager, one image at a time, GradientTape
     over a model with [last conv output, predictions] outputs
  V  tf-keras-vis `Gradcam` (eager, batched), same model, layer and batch
  X  Xplique's `GradCAM` (batched; its maps upsampled to the input, as it
     returns them), same model, layer and batch. Xplique 2.0.2 pins
     tensorflow<=2.20, scipy<=1.15.3 and scikit-learn<=1.7.2 and wants
     opencv-python: install it with `pip install --no-deps xplique==2.0.2`
     beside the bench extra (which lists what it imports: deprecated, einops,
     tensorflow-probability 0.25, dm-tree); it then runs on TensorFlow 2.21

and once per run the feed measurement (`bench.feed`): the pipeline with a
near-free model against tf.data feeding the same model from the same
photo-like 500x375 JPEG shards, one process at 1 and 2 threads and on 1 core, and the
per-image decode A/B (eager per record vs batched), and where the job's CPU goes per image by
stage (the same 1-thread job with bench.levers' null_model, null_decode and both: model step, batched
decode, Beam and the job's Python). Then the checks' cost (`bench.checks_cost`, MobileNetV2 at
--checks_sizes, default 1,000 and 10,000 images): the job with the defaults, each check off and both
off, each whole job's rate over F measured beside it, and each check's cost as a share of the job
with the defaults. The JPEG shards for P
are those photo-like 500x375 JPEGs too (resized to 224 by the pipeline).

How start-up is counted for P: every repeat runs the pipeline on N and on 2N
images (fresh processes, same shards layout); the steady-state rate is
N / (pipeline_seconds(2N) - pipeline_seconds(N)), so imports, model loading (launcher
and worker), the first trace, Beam graph construction and the manifest read
back cancel out. The whole-run wall time of N images (with and without the
process's imports) is reported too. Peak RSS comes from the N-image runs and
one extra 4N-image run (JPEG): growth = maxrss(4N) / median maxrss(N) - 1.

All numbers are medians over the repeats. Results: a table on stdout and the
same in JSON (default bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from bench import checks_cost
from bench.common import (
    BATCH_SIZE,
    METHOD_NAMES,
    REPO,
    fmt,
    forward_probe,
    grid,
    images_per_second,
    load_model,
    measure_forward_and_cams,
    median,
    natural_images,
    pipeline_flags,
    run_pipeline_process,
    set_quick,
    write_results,
    write_shards,
)
from bench.feed import feed_table, measure_feed
from bench.photos import write_photo_shards
from bench.scale import measure_scale, verdicts

DEFAULT_JSON = os.path.join(REPO, "bench", "results", "latest.json")
FORMATS = ("jpeg", "png")
TARGETS = {
    # (model, key) -> minimum; key "K/F gradcam", "P/F jpeg", "P/N jpeg", "RSS growth" (maximum)
    ("resnet50", "K/F gradcam"): 0.95,
    ("mobilenet_v2", "K/F gradcam"): 0.95,
    ("resnet50", "P/F jpeg"): 0.95,
    ("mobilenet_v2", "P/F jpeg"): 0.95,
    ("resnet50", "P/N jpeg"): 12.0,
}
RSS_GROWTH_LIMIT = 0.10


CHECKS_MODEL = "mobilenet_v2"
CHECKS_SIZES = "1000,10000"  # the acceptance's sizes: a bounded check costs the same at both
CHECK_SHARE_LIMIT = 0.05  # each check's cost as a share of the job, at the largest size


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- peers ----


def measure_keras_io(model_name: str, target_layer: str, *, repeats: int, min_seconds: float) -> dict:
    """The keras.io example's `make_gradcam_heatmap`, one image at a time, eager."""
    import keras
    import tensorflow as tf

    model = load_model(model_name)
    model.layers[-1].activation = None  # as the example does
    grad_model = keras.models.Model(
        model.inputs, [model.get_layer(target_layer).output, model.output]
    )

    def make_gradcam_heatmap(img_array, pred_index=None):
        with tf.GradientTape() as tape:
            last_conv_layer_output, preds = grad_model(img_array)
            if pred_index is None:
                pred_index = tf.argmax(preds[0])
            class_channel = preds[:, pred_index]
        grads = tape.gradient(class_channel, last_conv_layer_output)
        pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
        last_conv_layer_output = last_conv_layer_output[0]
        heatmap = last_conv_layer_output @ pooled_grads[..., tf.newaxis]
        heatmap = tf.squeeze(heatmap)
        heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
        return heatmap.numpy()

    images = natural_images(8, seed=3).astype(np.float32)
    state = {"i": 0}

    def step():
        make_gradcam_heatmap(images[state["i"] % len(images)][None])
        state["i"] += 1

    cpu: list = []
    runs = [images_per_second(step, 1, min_seconds=min_seconds, cpu=cpu) for _ in range(repeats)]
    return {"runs": runs, "median": median(runs), "cpu_runs": cpu, "cpu_median": median(cpu),
            "batch": 1, "mode": "eager, one image per call"}


def measure_tf_keras_vis(model_name: str, target_layer: str, *, repeats: int, min_seconds: float,
                         batch: int = BATCH_SIZE) -> dict:
    """tf-keras-vis Gradcam on the same model, layer and batch (or why it could not run)."""
    try:
        import tf_keras_vis
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
        from tf_keras_vis.utils.scores import CategoricalScore
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return {"error": f"import failed: {type(exc).__name__}: {exc} (pip install tf-keras-vis)"}
    try:
        model = load_model(model_name)
        images = natural_images(batch, seed=5).astype(np.float32)
        classes = [int(c) for c in np.argmax(model(images[:batch], training=False), axis=-1)]
        gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
        score = CategoricalScore(classes)

        def step():
            cam = gradcam(
                score,
                images,
                penultimate_layer=target_layer,
                seek_penultimate_conv_layer=False,
                expand_cam=False,
            )
            np.asarray(cam)

        cpu: list = []
        runs = [images_per_second(step, batch, min_seconds=min_seconds, cpu=cpu) for _ in range(repeats)]
        return {
            "runs": runs,
            "median": median(runs),
            "cpu_runs": cpu,
            "cpu_median": median(cpu),
            "batch": batch,
            "version": getattr(tf_keras_vis, "__version__", "?"),
            "settings": "ReplaceToLinear, CategoricalScore(predicted), penultimate_layer=target layer, "
            "seek_penultimate_conv_layer=False, expand_cam=False (layer-resolution maps like the project)",
        }
    except Exception as exc:  # noqa: BLE001 - report why the peer does not run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def measure_xplique(model_name: str, target_layer: str, *, repeats: int, min_seconds: float,
                    batch: int = BATCH_SIZE) -> dict:
    """Xplique's GradCAM on the same model, layer and batch (or why it could not run)."""
    try:
        import tensorflow as tf
        import xplique
        from xplique.attributions import GradCAM
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return {"error": f"import failed: {type(exc).__name__}: {exc} (pip install --no-deps xplique==2.0.2, "
                "beside the bench extra)"}
    try:
        model = load_model(model_name)
        images = natural_images(batch, seed=5).astype(np.float32)
        probabilities = model(images, training=False)
        targets = tf.one_hot(np.argmax(probabilities, axis=-1), probabilities.shape[-1])
        explainer = GradCAM(model, conv_layer=target_layer, batch_size=batch)

        def step():
            np.asarray(explainer.explain(images, targets))

        cpu: list = []
        runs = [images_per_second(step, batch, min_seconds=min_seconds, cpu=cpu) for _ in range(repeats)]
        return {"runs": runs, "median": median(runs), "cpu_runs": cpu, "cpu_median": median(cpu), "batch": batch,
                "version": getattr(xplique, "__version__", "?"),
                "settings": "GradCAM(model, conv_layer=target layer, batch_size=batch).explain(images, one-hot "
                            "predicted classes); Xplique upsamples every map to the input size"}
    except Exception as exc:  # noqa: BLE001 - report why the peer does not run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


# ------------------------------------------------------------- pipeline ----


# N for the feed pair (N and 2N images). Below ~1600 the difference of the two runs still holds the
# strategies' clustering of a sample that grows with N (up to --strategy_sample_size maps per class),
# a cost a dataset pays once: the same code measured 303-312 img/s at N=800 and 323-336 at N=1600.
FEED_IMAGES = 1600


def measure_pipeline(model_name: str, n: int, workdir: str, *, repeats: int, formats=FORMATS,
                     pair_factor: int = 2, rss_factor: int = 4, levers=(), extra_args=(), forward=None) -> dict:
    """P for each format and the RSS check at rss_factor * N (JPEG).

    Steady state per repeat: (f - 1) * N / (pipeline_seconds(f * N) - pipeline_seconds(N)),
    pipeline_seconds being the job's own wall time after the launcher's
    start-up (manifest timings; a first idle-machine run that differenced the
    whole process time, N=96, scattered 10-25 img/s for the same ResNet50)
    with f = pair_factor (the same from CPU seconds of the whole process for
    the CPU-based figure). When pair_factor == rss_factor the JPEG pair's large
    runs double as the RSS runs.

    forward: a `bench.common.forward_probe`; F is then measured in this process
    right before and after each pair, and each repeat's P is divided by the
    mean of the two (`pf_runs`, `pf_median`, `pf_cpu_median`): P and F side by
    side, whatever the machine does between repeats.
    """
    out: dict = {}
    for image_format in formats:
        big_n = pair_factor * n
        sizes = [n, big_n] + ([rss_factor * n] if image_format == "jpeg" and rss_factor != pair_factor else [])
        datasets = {size: make_shards(os.path.join(workdir, f"data-{image_format}-{size}"), size, image_format, seed=size)
                    for size in sizes}
        runs = {n: [], big_n: []}
        beside: list = []  # (F wall, F per CPU-s) around each pair
        for r in range(repeats):
            before = forward() if forward else None
            for size in (n, big_n):
                result = run_pipeline_process(
                    datasets[size]["pattern"], model_name,
                    os.path.join(workdir, f"out-{model_name}-{image_format}-{size}-{r}"),
                    levers=levers, extra_args=extra_args,
                )
                if result["images_explained"] != size:
                    raise RuntimeError(f"expected {size} images explained, got {result['images_explained']}")
                runs[size].append(result)
            small, large = runs[n][-1], runs[big_n][-1]
            delta = large["pipeline_seconds"] - small["pipeline_seconds"]
            if forward:
                after = forward()
                beside.append(((before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
                log(f"  {model_name} F beside repeat {r + 1}: {before[0]:.1f} before, {after[0]:.1f} after")
            log(
                f"  {model_name} {image_format} repeat {r + 1}/{repeats}: run({n}) {small['run_seconds']:.1f} s, "
                f"run({big_n}) {large['run_seconds']:.1f} s -> steady "
                f"{((big_n - n) / delta if delta > 0 else float('nan')):.1f} img/s; "
                f"peak RSS {small['maxrss_mb']:.0f}/{large['maxrss_mb']:.0f} MB; load {os.getloadavg()[0]:.1f}"
            )
        steady, steady_cpu = [], []
        for small, large in zip(runs[n], runs[big_n], strict=True):
            delta = large["pipeline_seconds"] - small["pipeline_seconds"]
            steady.append((big_n - n) / delta if delta > 0 else None)
            cpu_delta = large["cpu_seconds"] - small["cpu_seconds"]
            steady_cpu.append((big_n - n) / cpu_delta if cpu_delta > 0 else None)
        whole = median(r["run_seconds"] for r in runs[n])
        entry = {
            "images_n": n,
            "images_pair": big_n,
            "bytes_per_image": datasets[n]["bytes_per_image"],
            "runs_n": runs[n],
            "runs_pair": runs[big_n],
            "steady_runs": steady,
            "steady_median": median(steady),
            "steady_cpu_runs": steady_cpu,
            "steady_cpu_median": median(steady_cpu),
            "whole_run_seconds_n": whole,
            "whole_process_seconds_n": median(r["process_seconds"] for r in runs[n]),
            "startup_seconds_n": median(r["startup_seconds"] for r in runs[n]),
            "end_to_end_images_per_second_n": n / whole,
            "maxrss_mb_n": median(r["maxrss_mb"] for r in runs[n]),
        }
        if beside:
            entry["forward_beside"] = [f for f, _ in beside]
            entry["pf_runs"] = [p / f if p else None for p, (f, _) in zip(steady, beside, strict=True)]
            entry["pf_cpu_runs"] = [p / f if p else None for p, (_, f) in zip(steady_cpu, beside, strict=True)]
            kept = [v for v in entry["pf_runs"] if v is not None]
            kept_cpu = [v for v in entry["pf_cpu_runs"] if v is not None]
            entry["pf_median"] = median(kept) if kept else None
            entry["pf_cpu_median"] = median(kept_cpu) if kept_cpu else None
        if image_format == "jpeg":
            if rss_factor == pair_factor:
                big = {"maxrss_mb": median(r["maxrss_mb"] for r in runs[big_n]),
                       "run_seconds": median(r["run_seconds"] for r in runs[big_n])}
            else:
                big = run_pipeline_process(
                    datasets[rss_factor * n]["pattern"], model_name,
                    os.path.join(workdir, f"out-{model_name}-{image_format}-{rss_factor * n}"),
                    levers=levers, extra_args=extra_args,
                )
            entry["rss"] = {
                "images_n": n,
                "maxrss_mb_n": entry["maxrss_mb_n"],
                "images_big": rss_factor * n,
                "maxrss_mb_big": big["maxrss_mb"],
                "growth": big["maxrss_mb"] / entry["maxrss_mb_n"] - 1.0,
                "big_run_seconds": big["run_seconds"],
                "limit": RSS_GROWTH_LIMIT,
                "source": "VmHWM of each pipeline process (/proc/self/status at the end of the run)",
            }
            span = big["run_seconds"] - whole
            entry["steady_from_big"] = (rss_factor - 1) * n / span if span > 0 else None
            log(
                f"  {model_name} RSS: {n} images {entry['maxrss_mb_n']:.0f} MB, {rss_factor * n} images "
                f"{big['maxrss_mb']:.0f} MB ({100 * entry['rss']['growth']:+.1f}%)"
            )
        out[image_format] = entry
    return out


def make_shards(folder: str, n: int, fmt: str, *, seed: int) -> dict:
    """P's shards: photo-like 500x375 JPEGs (`bench.photos`), or 224x224 synthetic PNGs."""
    if fmt == "jpeg":
        return write_photo_shards(folder, n, seed=seed)
    return write_shards(folder, n, fmt, seed=seed)


# ---------------------------------------------------------------- report ---


def ratios_and_targets(name: str, m: dict) -> None:
    f = m["forward"]["median"]
    ratios = {f"K/F {method}": m["cam"][method]["median"] / f for method in m["cam"]}
    n_ips = m["keras_io"].get("median")
    v_ips = m["tf_keras_vis"].get("median")
    x_ips = m.get("xplique", {}).get("median")
    for image_format, p in m["pipeline"].items():
        # P/F: each repeat's P over the F measured beside it, when the bench did (medians of those);
        # else the medians' ratio (F from the F/K round robin, minutes before P).
        ratios[f"P/F {image_format}"] = p["pf_median"] if p.get("pf_median") else p["steady_median"] / f
        ratios[f"P/N {image_format}"] = p["steady_median"] / n_ips if n_ips else None
        ratios[f"P/V {image_format}"] = p["steady_median"] / v_ips if v_ips else None
        ratios[f"P/X {image_format}"] = p["steady_median"] / x_ips if x_ips else None
    for method in m["cam"]:
        ratios[f"K/N {method}"] = m["cam"][method]["median"] / n_ips if n_ips else None
    m["ratios"] = ratios
    # The same ratios from images per CPU-second (less disturbed by other load
    # on a shared machine; blind to lost parallelism, so an upper bound for P).
    fc = m["forward"]["cpu_median"]
    cpu = {f"K/F {method}": m["cam"][method]["cpu_median"] / fc for method in m["cam"]}
    for key, p in m["pipeline"].items():
        cpu[f"P/F {key}"] = p["pf_cpu_median"] if p.get("pf_cpu_median") else p["steady_cpu_median"] / fc
        n_cpu = m["keras_io"].get("cpu_median")
        cpu[f"P/N {key}"] = p["steady_cpu_median"] / n_cpu if n_cpu else None
    m["cpu_ratios"] = cpu
    targets = {}
    for (model, key), minimum in TARGETS.items():
        if model == name and ratios.get(key) is not None:
            targets[key] = {"value": ratios[key], "target": f">= {minimum}", "met": ratios[key] >= minimum}
    rss = m["pipeline"].get("jpeg", {}).get("rss")
    if rss:
        targets["RSS growth"] = {"value": rss["growth"], "target": f"< {RSS_GROWTH_LIMIT}",
                                 "met": rss["growth"] < RSS_GROWTH_LIMIT}
    m["targets"] = targets


def table(results: dict) -> str:
    models = results["models"]
    lines = []
    methods = list(next(iter(models.values()))["cam"]) if models else []
    head = ["model", "F", *[f"K:{m}" for m in methods], "P:jpeg", "P:png", "N:keras.io", "V:tf-keras-vis", "X:Xplique"]
    lines.append("Throughput, images/s (median of %d repeats, batch %d, 224x224, %d cores; "
                 "load average at start %.1f, end %.1f)"
                 % (results["meta"]["repeats"], BATCH_SIZE, os.cpu_count(),
                    results["meta"]["load_average_start"], results["meta"].get("load_average_end", float("nan"))))
    rows = [head]
    for name, m in models.items():
        p = m["pipeline"]
        rows.append([
            name, fmt(m["forward"]["median"]), *[fmt(m["cam"][x]["median"]) for x in methods],
            fmt(p.get("jpeg", {}).get("steady_median")), fmt(p.get("png", {}).get("steady_median")),
            fmt(m["keras_io"]["median"], ".2f"), fmt(m["tf_keras_vis"].get("median")),
            fmt(m.get("xplique", {}).get("median")),
        ])
    lines += grid(rows)
    lines.append("")
    lines.append("Ratios")
    rkeys = [f"K/F {x}" for x in methods] + ["P/F jpeg", "P/F png", "P/N jpeg", "P/N png", "P/V jpeg", "P/V png", "P/X jpeg", "P/X png"]
    rows = [["model", *rkeys]]
    for name, m in models.items():
        rows.append([name, *[fmt(m.get("ratios", {}).get(k), ".2f") for k in rkeys]])
    lines += grid(rows)
    rows = [["model (CPU-s)", *rkeys[: len(methods) + 4]]]
    for name, m in models.items():
        rows.append([name, *[fmt(m.get("cpu_ratios", {}).get(k), ".2f") for k in rkeys[: len(methods) + 4]]])
    lines.append("Same ratios from images per CPU-second (robust to other load; blind to idle cores)")
    lines += grid(rows)
    for name, m in models.items():
        for key, p in m["pipeline"].items():
            if p.get("forward_beside"):
                lines.append(f"P/F {key} {name}: each repeat's P over the F measured beside it (mean of before "
                             f"and after): P {', '.join(fmt(v) for v in p['steady_runs'])}, F "
                             f"{', '.join(fmt(v) for v in p['forward_beside'])} -> "
                             f"{', '.join(fmt(v, '.2f') for v in p['pf_runs'])}")
    lines.append("")
    lines.append("Whole runs and memory (pipeline, JPEG)")
    rows = [["model", "N", "run(N) s", "process(N) s", "startup s", "N/run(N) img/s",
             "RSS(N) MB", "4N", "RSS(4N) MB", "growth"]]
    for name, m in models.items():
        j = m["pipeline"].get("jpeg")
        if not j:
            continue
        rss = j["rss"]
        rows.append([name, str(j["images_n"]), fmt(j["whole_run_seconds_n"]), fmt(j["whole_process_seconds_n"]),
                     fmt(j["startup_seconds_n"]), fmt(j["end_to_end_images_per_second_n"]),
                     fmt(rss["maxrss_mb_n"], ".0f"), str(rss["images_big"]), fmt(rss["maxrss_mb_big"], ".0f"),
                     f"{100 * rss['growth']:+.1f}%"])
    lines += grid(rows)
    if results.get("feed"):
        lines.append("")
        lines += feed_table(results["feed"])
    if results.get("checks"):
        checks = results["checks"]
        lines.append("")
        lines.append(f"The checks' cost ({checks['model']}, bench.checks_cost: each check with the other off, "
                     "as a share of the job with the defaults)")
        lines += checks_cost.table(checks["results"]).splitlines()
    lines.append("")
    lines.append("Targets")
    for key, t in (results.get("feed") or {}).get("targets", {}).items():
        # None: a steady rate that could not be measured (the 2N run no slower than the N run: noise)
        value = "       -" if t["value"] is None else f"{t['value']:8.3f}"
        lines.append(f"  {'feed':13s} {key:16s} {value}  target {t['target']:7s}  "
                     f"{'met' if t['met'] else 'MISSED'}")
    if results.get("checks"):
        largest = max(results["checks"]["results"], key=lambda entry: entry["images"])
        for check in ("faithfulness", "sanity"):
            for unit in ("wall", "cpu"):
                share = largest[unit][f"{check}_share"]
                lines.append(f"  {'checks':13s} {check + ' ' + unit:16s} {share:8.3f}  target <= {CHECK_SHARE_LIMIT} "
                             f"at {largest['images']:,} images  {'met' if share <= CHECK_SHARE_LIMIT else 'MISSED'}")
    for name, m in models.items():
        for key, t in m["targets"].items():
            lines.append(f"  {name:13s} {key:12s} {t['value']:8.3f}  target {t['target']:7s}  "
                         f"{'met' if t['met'] else 'MISSED'}")
        if "error" in m["tf_keras_vis"]:
            lines.append(f"  {name:13s} tf-keras-vis did not run: {m['tf_keras_vis']['error']}")
        if "error" in m.get("xplique", {}):
            lines.append(f"  {name:13s} Xplique did not run: {m['xplique']['error']}")
    return "\n".join(lines)


def versions() -> dict:
    import apache_beam
    import keras
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "apache_beam": apache_beam.__version__, "numpy": np.__version__}
    try:
        import tf_keras_vis

        out["tf_keras_vis"] = getattr(tf_keras_vis, "__version__", "?")
    except Exception:  # noqa: BLE001
        out["tf_keras_vis"] = None
    try:
        import xplique

        out["xplique"] = getattr(xplique, "__version__", "?")
    except Exception:  # noqa: BLE001
        out["xplique"] = None
    return out


# ------------------------------------------------------------------ main ---


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny counts, 1 repeat, MobileNetV2 only (< 2 min)")
    parser.add_argument("--models", default=None, help="Comma-separated keras.applications names "
                        "(default resnet50,mobilenet_v2; --quick: mobilenet_v2)")
    parser.add_argument("--repeats", type=int, default=None, help="Repeats per measurement (default 3; --quick 1)")
    parser.add_argument("--images", type=int, default=None,
                        help="N, images per short pipeline run (2N and 4N runs too; default 192 for "
                        "resnet50, 384 for others; --quick 32)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="CAM methods for K")
    parser.add_argument("--formats", default=",".join(FORMATS), help="Image formats for P")
    parser.add_argument("--min_seconds", type=float, default=None,
                        help="Seconds per in-memory measurement and step (default 3; --quick 0.3)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="Where to write the results")
    parser.add_argument("--workdir", default=None, help="Shards and outputs (default: a temp dir, removed)")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: peers,pipeline,feed,models,checks "
                        "(models: F/K/P/N/V/X altogether; checks: the checks' cost at --checks_sizes)")
    parser.add_argument("--feed_images", type=int, default=None,
                        help="N for the feed measurement (N and 2N images; default 1600; --quick 64)")
    parser.add_argument("--pipeline_args", default="", help="Extra pipeline/Beam flags for P, e.g. "
                        "'--direct_num_workers=2 --direct_running_mode=multi_threading'")
    parser.add_argument("--checks_sizes", default=None,
                        help=f"Image counts for the checks' cost (bench.checks_cost; default {CHECKS_SIZES}, --quick 64)")
    parser.add_argument("--checks_repeats", type=int, default=1, help="Repeats of each checks configuration")
    parser.add_argument("--scale", default="", help="Also run the launcher scale rehearsal (bench.scale) at these "
                        "heatmap row counts, e.g. 1000000,10000000 (off by default; ~2 GB of disk per 10M rows)")
    parser.add_argument("--levers", default="", help="Comma-separated bench.levers monkeypatches for P runs")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quick = args.quick
    if quick:
        set_quick()
    model_names = (args.models or ("mobilenet_v2" if quick else "resnet50,mobilenet_v2")).split(",")
    repeats = args.repeats or (1 if quick else 3)
    min_seconds = args.min_seconds or (0.3 if quick else 3.0)
    methods = tuple(args.methods.split(","))
    formats = tuple(args.formats.split(","))
    skip = set(filter(None, args.skip.split(",")))
    workdir = args.workdir or tempfile.mkdtemp(prefix="gradcam-bench-")
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    results = {
        "meta": {
            "command": " ".join(["python -m bench.run_bench", *(sys.argv[1:] if argv is None else argv)]),
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "repeats": repeats, "batch_size": BATCH_SIZE, "image_size": 224,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
            "load_average_start": os.getloadavg()[0],
            "versions": versions(), "pipeline_flags": pipeline_flags(),
            "pipeline_args": args.pipeline_args, "levers": args.levers, "runner": "FnApiRunner (pipeline default, in-process)",
            "startup_accounting": "P = (f-1)N / (pipeline_seconds(fN) - pipeline_seconds(N)), f = 2 (--quick: 4), "
            "a fresh process per run; pipeline_seconds = the job's wall time after the launcher's start-up "
            "(manifest timings: excludes imports and the launcher's model check); what remains of start-up "
            "(worker model load, first trace) cancels in the difference. run(N) in the whole-run table is the "
            "wall time of pipeline.graph.run including the launcher",
        },
        "models": {},
    }
    try:
        if "feed" not in skip:
            feed_n = args.feed_images or (64 if quick else FEED_IMAGES)
            log(f"feed: near-free model, tf.data vs the pipeline at 1 and 2 threads and on 1 core, N={feed_n}, 2N")

            results["feed"] = measure_feed(workdir, feed_n, repeats=repeats, log=log)
        for name in ([] if "models" in skip else model_names):
            n = args.images or (96 if quick else (192 if name == "resnet50" else 384))
            log(f"{name}: F and K ({', '.join(methods)})")
            m = measure_forward_and_cams(name, methods, repeats=repeats, min_seconds=min_seconds, log=log)
            gc.collect()
            if "peers" not in skip:
                log(f"{name}: N (keras.io example, eager, one image at a time)")
                m["keras_io"] = measure_keras_io(name, m["target_layer"], repeats=repeats,
                                                 min_seconds=min_seconds / (2 if quick else 1))
                log(f"  N median {m['keras_io']['median']:.2f} img/s")
                log(f"{name}: V (tf-keras-vis Gradcam)")
                m["tf_keras_vis"] = measure_tf_keras_vis(name, m["target_layer"], repeats=repeats,
                                                         min_seconds=min_seconds)
                log(f"  V {m['tf_keras_vis'].get('median', m['tf_keras_vis'].get('error'))}")
                log(f"{name}: X (Xplique GradCAM)")
                m["xplique"] = measure_xplique(name, m["target_layer"], repeats=repeats, min_seconds=min_seconds)
                log(f"  X {m['xplique'].get('median', m['xplique'].get('error'))}")
            else:
                m["keras_io"] = {"median": None}
                m["tf_keras_vis"] = {"error": "skipped"}
                m["xplique"] = {"error": "skipped"}
            import keras

            keras.backend.clear_session()
            gc.collect()
            if "pipeline" not in skip:
                log(f"{name}: P (pipeline.graph.run, FnApiRunner) N={n}, 2N, 4N")
                probe = forward_probe(name, min_seconds=min_seconds)
                m["pipeline"] = measure_pipeline(name, n, workdir, repeats=repeats, formats=formats,
                                                 pair_factor=4 if quick else 2, forward=probe,
                                                 extra_args=args.pipeline_args.split(),
                                                 levers=[x for x in args.levers.split(",") if x])
            else:
                m["pipeline"] = {}
            ratios_and_targets(name, m)
            results["models"][name] = m
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if "checks" not in skip:
        sizes = [int(x) for x in (args.checks_sizes or ("64" if quick else CHECKS_SIZES)).split(",")]
        model = CHECKS_MODEL if CHECKS_MODEL in model_names else model_names[-1]
        log(f"checks: {model}, the job with the defaults, each check off and both off, at {sizes} images")
        probe = forward_probe(model, min_seconds=min_seconds)
        with tempfile.TemporaryDirectory(prefix="gradcam-checks-", dir=args.workdir) as checks_dir:
            results["checks"] = {"model": model, "results": [
                checks_cost.measure(model, size, checks_dir, args.checks_repeats, forward=probe, log=log)
                for size in sizes]}
    if args.scale:
        log(f"launcher scale rehearsal (bench.scale) at {args.scale} rows")
        with tempfile.TemporaryDirectory(prefix="gradcam-scale-", dir=args.workdir) as scale_dir:
            runs = measure_scale([int(r) for r in args.scale.split(",")], scale_dir)
        results["scale"] = {"runs": runs, "verdicts": verdicts(runs)}
    results["meta"]["total_seconds"] = time.time() - started
    results["meta"]["load_average_end"] = os.getloadavg()[0]
    return write_results(results, args.json, table, default=float)


if __name__ == "__main__":
    main()
