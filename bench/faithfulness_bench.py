"""What the faithfulness checks cost: the job with and without them, and the stage alone.

    python -m bench.faithfulness_bench [--quick] [--models mobilenet_v2,resnet50]
        [--repeats 3] [--images N] [--share 0.02] [--json PATH]

For each model (keras.applications, fixed random weights, 224x224, batch 32):

  F   forward-only inference (`CamExplainer.forward`), images/s
  S   the faithfulness scorer alone (`FaithfulnessScorer.score`: 12 perturbed
      copies + the original per image, one compiled call per batch), images
      scored/s; S/F is about 1/13 by construction
  P0  the whole job with --faithfulness_sample 0 --sanity_images 0
  P   the whole job at the default share (--faithfulness_sample SHARE,
      --sanity_images 32)

P and P0 are steady-state rates (the N vs 2N difference of
`bench.run_bench.measure_pipeline`, so start-up, model loading and the
sanity check's fixed cost cancel); the aim is P/F within 0.1 of P0/F.
Expected extra model work at share s: 13 s forward passes per image
(0.26 at s = 0.02) on top of the explain pass (about one forward).
Results: a table on stdout and JSON (default bench/results/faithfulness.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import numpy as np

from bench.common import BATCH_SIZE, load_model, median, natural_images, round_robin, set_quick, write_results
from bench.run_bench import measure_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO, "bench", "results", "faithfulness.json")
AIM = 0.1


def measure_stage(model_name: str, *, repeats: int, min_seconds: float, batch: int = BATCH_SIZE) -> dict:
    """F and S in round robin on the same in-memory batch."""
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.faithfulness import FaithfulnessScorer

    explainer = CamExplainer(load_model(model_name))
    images = natural_images(batch, seed=0).astype(np.float32)
    out = explainer(images)
    scorer = FaithfulnessScorer.from_explainer(explainer)
    cams, targets = out["cam"][:, 0], out["target_class"][:, 0]
    seeds = np.arange(batch, dtype=np.int32)
    steps = {
        "forward": lambda: explainer.forward(images).numpy(),
        "faithfulness": lambda: scorer(images, cams, targets, seeds),
    }
    runs = {key: [] for key in steps}
    for r in range(repeats):
        wall, _ = round_robin(steps, batch, min_seconds=min_seconds, warmup=r == 0)
        for key in steps:
            runs[key].append(wall[key])
        print(f"  {model_name} repeat {r + 1}/{repeats}: F {wall['forward']:.1f} img/s, "
              f"S {wall['faithfulness']:.2f} img/s", flush=True)
    return {key: {"runs": values, "median": median(values)} for key, values in runs.items()}


def table(results: dict) -> str:
    lines = [f"{'model':<14}{'F img/s':>9}{'S img/s':>9}{'S/F':>7}{'P0/F':>7}{'P/F':>7}{'diff':>7}  aim"]
    for name, m in results["models"].items():
        r = m["ratios"]
        lines.append(
            f"{name:<14}{m['stage']['forward']['median']:>9.1f}{m['stage']['faithfulness']['median']:>9.2f}"
            f"{r['S/F']:>7.3f}{r['P0/F']:>7.2f}{r['P/F']:>7.2f}{r['P0/F - P/F']:>7.3f}  "
            f"{'met' if r['P0/F - P/F'] <= AIM else 'missed'} (<= {AIM})"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faithfulness_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="N of the N vs 2N pipeline pair")
    parser.add_argument("--share", type=float, default=0.02)
    parser.add_argument("--min_seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="Smoke mode: one model, 1 repeat, 32 images")
    parser.add_argument("--json", default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.quick:
        set_quick()
        args.models, args.repeats, args.images, args.min_seconds = "mobilenet_v2", 1, 32, 0.5
    started = time.perf_counter()
    results = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "machine": platform.platform(), "cpus": os.cpu_count(), "quick": args.quick,
                        "share": args.share, "images": args.images, "repeats": args.repeats},
               "models": {}}
    off = ["--faithfulness_sample", "0", "--sanity_images", "0"]
    on = ["--faithfulness_sample", str(args.share), "--sanity_images", "32"]
    for name in args.models.split(","):
        print(f"{name}: F and S", flush=True)
        stage = measure_stage(name, repeats=args.repeats, min_seconds=args.min_seconds)
        with tempfile.TemporaryDirectory(prefix="faith-bench-") as work:
            print(f"{name}: P0 (checks off)", flush=True)
            p_off = measure_pipeline(name, args.images, os.path.join(work, "off"), repeats=args.repeats,
                                     formats=("jpeg",), pair_factor=2, rss_factor=2, extra_args=off)
            print(f"{name}: P (share {args.share})", flush=True)
            p_on = measure_pipeline(name, args.images, os.path.join(work, "on"), repeats=args.repeats,
                                    formats=("jpeg",), pair_factor=2, rss_factor=2, extra_args=on)
        f = stage["forward"]["median"]
        ratios = {
            "S/F": stage["faithfulness"]["median"] / f,
            "P0/F": p_off["jpeg"]["steady_median"] / f,
            "P/F": p_on["jpeg"]["steady_median"] / f,
        }
        ratios["P0/F - P/F"] = ratios["P0/F"] - ratios["P/F"]
        results["models"][name] = {"stage": stage, "pipeline_off": p_off["jpeg"], "pipeline_on": p_on["jpeg"],
                                   "ratios": ratios}
    results["meta"]["total_seconds"] = time.perf_counter() - started
    write_results(results, args.json, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
