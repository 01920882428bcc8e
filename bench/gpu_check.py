"""The F/K table on a GPU machine, and whether the input path or the model bounds the job.

    python -m bench.gpu_check [--models resnet50,mobilenet_v2] [--batch 32]
        [--repeats 3] [--jit] [--quick] [--json PATH]

On a GPU: TF memory growth on (as the pipeline's workers do), then for every
model and for the Keras policies float32 and mixed_float16
(`keras.mixed_precision.set_global_policy`): F = `CamExplainer.forward`,
K = `CamExplainer.__call__` (-> `.explain`) for every method, images/s and
K/F. Whole run < 5 minutes on one T4-class GPU with the defaults.

Before the models: the feed rate per core (`bench.feed.feed_rate_per_core`:
the pipeline's per-record checks + batched decode of photo-like 500x375
JPEGs to 224x224, images per CPU-second) and the worker's capacity (x its
cores). For every model row: the model rate (K, Grad-CAM) and which one
bounds the job (feed when the cores cannot decode as fast as the model
explains).

Without a GPU it says so and runs a small CPU table (MobileNetV2, float32,
Grad-CAM and HiResCAM, 1 repeat) so the script is exercised everywhere.
Results go to stdout and to JSON (default bench/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO, "bench", "results", "gpu_check.json")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="Comma-separated keras.applications names")
    parser.add_argument("--methods", default=None, help="Comma-separated CAM methods (default: all on GPU)")
    parser.add_argument("--policies", default=None, help="Keras dtype policies (GPU default: float32,mixed_float16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--min_seconds", type=float, default=None)
    parser.add_argument("--jit", action="store_true", help="Also measure jit_compile=True (XLA)")
    parser.add_argument("--quick", action="store_true", help="Smallest run (the smoke test)")
    parser.add_argument("--json", default=DEFAULT_JSON)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transforms.model_loading import configure_devices

    gpus = configure_devices(memory_growth=True)  # before anything touches the GPU
    import keras
    import tensorflow as tf

    from bench.common import METHOD_NAMES, measure_forward_and_cams, set_quick, write_results
    from bench.feed import bound, feed_rate_per_core

    if gpus:
        print(f"GPU(s): {[g.name for g in gpus]}; memory growth on", flush=True)
        details = [tf.config.experimental.get_device_details(g) for g in gpus]
        models = (args.models or "resnet50,mobilenet_v2").split(",")
        methods = tuple((args.methods or ",".join(METHOD_NAMES)).split(","))
        policies = (args.policies or "float32,mixed_float16").split(",")
        repeats = args.repeats or 3
        min_seconds = args.min_seconds or 2.0
    else:
        print("No GPU found: running the small CPU table (MobileNetV2, float32).", flush=True)
        details = []
        models = (args.models or "mobilenet_v2").split(",")
        methods = tuple((args.methods or ("gradcam" if args.quick else "gradcam,hirescam")).split(","))
        policies = (args.policies or "float32").split(",")
        repeats = args.repeats or 1
        min_seconds = args.min_seconds or (0.3 if args.quick else 2.0)
    if args.quick:
        set_quick()
    jit_options = (False, True) if args.jit else (False,)
    started = time.time()
    feed = feed_rate_per_core(64 if args.quick else 128, repeats=1 if args.quick else 3)
    print(f"Feed (input path): {feed['per_core']:.0f} images/s per core, {feed['cores']} cores -> "
          f"{feed['capacity']:.0f} images/s ({feed['what']})", flush=True)
    rows = []
    for name in models:
        for policy in policies:
            for jit in jit_options:
                keras.mixed_precision.set_global_policy(policy)
                try:
                    m = measure_forward_and_cams(
                        name, methods, repeats=repeats, min_seconds=min_seconds, batch=args.batch,
                        jit_compile=jit,
                        log=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True),
                    )
                    error = None
                except Exception as exc:  # noqa: BLE001 - one failing config must not hide the others
                    m, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                finally:
                    keras.mixed_precision.set_global_policy("float32")
                    keras.backend.clear_session()
                row = {"model": name, "policy": policy, "jit_compile": jit, "batch": args.batch}
                if m is None:
                    row["error"] = error
                else:
                    f = m["forward"]["median"]
                    model_rate = m["cam"][methods[0]]["median"]
                    row.update(
                        model_ips=model_rate,
                        bound=bound(feed, model_rate),
                        forward_ips=f,
                        cam_ips={k: v["median"] for k, v in m["cam"].items()},
                        k_over_f={k: v["median"] / f for k, v in m["cam"].items()},
                        target_layer=m["target_layer"],
                        raw=m,
                    )
                rows.append(row)
    result = {
        "meta": {
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "GPU" if gpus else "CPU",
            "gpus": [g.name for g in gpus],
            "gpu_details": details,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "repeats": repeats,
            "total_seconds": time.time() - started,
        },
        "feed": feed,
        "rows": rows,
    }
    return write_results(result, args.json, table, default=str)


def table(result: dict) -> str:
    rows = result["rows"]
    methods = next((list(r["cam_ips"]) for r in rows if "cam_ips" in r), [])
    head = ["model", "policy", "jit", "F img/s", *[f"K:{m}" for m in methods], *[f"K/F {m}" for m in methods],
            "bound by"]
    grid = [head]
    for r in rows:
        if "error" in r:
            grid.append([r["model"], r["policy"], str(r["jit_compile"]), "error: " + r["error"]]
                        + [""] * (len(head) - 4))
            continue
        grid.append([r["model"], r["policy"], str(r["jit_compile"]), f"{r['forward_ips']:.1f}",
                     *[f"{r['cam_ips'][m]:.1f}" for m in methods], *[f"{r['k_over_f'][m]:.2f}" for m in methods],
                     r["bound"]])
    widths = [max(len(str(g[i])) for g in grid) for i in range(len(head))]
    title = f"F/K on {result['meta']['device']} ({', '.join(result['meta']['gpus']) or 'no GPU'}), images/s, medians"
    feed = result["feed"]
    feed_line = (f"Feed: {feed['per_core']:.0f} images/s per core x {feed['cores']} cores = {feed['capacity']:.0f} "
                 f"images/s ({feed['image_size']} JPEG -> 224x224); model rate = K:{methods[0] if methods else '-'}")
    return "\n".join([title, feed_line]
                     + ["  ".join(str(c).ljust(w) for c, w in zip(g, widths, strict=True)) for g in grid])


if __name__ == "__main__":
    main()
