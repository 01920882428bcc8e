"""What the run's checks cost: the faithfulness sample and the sanity check, at two dataset sizes.

    python -m bench.checks_cost [--model mobilenet_v2] [--sizes 1000,10000] [--repeats 1]

For each size N (photo-like 500x375 JPEG shards, `bench.photos`), the job runs
(each in its own process, `bench.common.run_pipeline_process`, no report) with
the defaults, with `--faithfulness_sample 0`, with `--sanity_images 0` and with
both off, in that order, `--repeats` times. A check's cost is the difference it
makes with the other one off:

    faithfulness = t(--sanity_images 0) - t(both off)
    sanity       = t(--faithfulness_sample 0) - t(both off)

as a share of t(defaults), where t is the job's own wall time after the
launcher's start-up (the manifest's `pipeline_seconds`, which holds the
checks' traces and reads) and, less sensitive to a busy machine, the whole
process's CPU seconds. Medians over the repeats. The checks are bounded in
images (`--faithfulness_images`, `--sanity_images`: 16 and 32 by default,
the first 16 of the same 32 images), so their cost should stay the same
from 1,000 to 10,000 images and its share fall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from statistics import median

from bench.common import forward_probe, run_pipeline_process
from bench.photos import write_photo_shards

CONFIGS = {
    "defaults": [],
    "faithfulness_off": ["--faithfulness_sample", "0"],
    "sanity_off": ["--sanity_images", "0"],
    "both_off": ["--faithfulness_sample", "0", "--sanity_images", "0"],
}


def _print(message: str) -> None:
    print(message, flush=True)


def measure(model: str, size: int, workdir: str, repeats: int, forward=None, log=_print) -> dict:
    """Each configuration's job at `size` images, `repeats` times. `forward` (a
    `bench.common.forward_probe`): F is measured before and after each configuration's run, and the
    whole job's rate (images / job seconds) is divided by it: P/F for the defaults and each check off."""
    data = write_photo_shards(os.path.join(workdir, f"data-{size}"), size, seed=size)
    runs: dict = {name: [] for name in CONFIGS}
    for r in range(repeats):
        for name, args in CONFIGS.items():
            before = forward() if forward else None
            out = os.path.join(workdir, f"out-{size}-{name}-{r}")
            result = run_pipeline_process(data["pattern"], model, out, extra_args=args, timeout=7200)
            if result["images_explained"] != size:
                raise RuntimeError(f"{name}: expected {size} images explained, got {result['images_explained']}")
            run = {"wall": result["pipeline_seconds"], "cpu": result["cpu_seconds"]}
            if forward:
                after = forward()
                run["forward"] = (before[0] + after[0]) / 2
                run["pf"] = size / result["pipeline_seconds"] / run["forward"]
            runs[name].append(run)
            log(f"  {size} {name} repeat {r + 1}: {result['pipeline_seconds']:.1f} s job, "
                f"{result['cpu_seconds']:.1f} CPU-s, load {result['load_average_1min']:.1f}"
                + (f", F {run['forward']:.1f} img/s, P/F {run['pf']:.2f}" if forward else ""))
            shutil.rmtree(out, ignore_errors=True)
    entry: dict = {"images": size, "runs": runs}
    if forward:
        entry["pf"] = {name: median(run["pf"] for run in runs[name]) for name in CONFIGS}
    for unit in ("wall", "cpu"):
        t = {name: median(run[unit] for run in runs[name]) for name in CONFIGS}
        faithfulness = t["sanity_off"] - t["both_off"]
        sanity = t["faithfulness_off"] - t["both_off"]
        entry[unit] = {
            "seconds": t,
            "faithfulness_seconds": faithfulness,
            "sanity_seconds": sanity,
            "faithfulness_share": faithfulness / t["defaults"],
            "sanity_share": sanity / t["defaults"],
        }
    return entry


def table(results: list[dict]) -> str:
    lines = ["| images | unit | defaults | both off | faithfulness cost (share) | sanity cost (share) |",
             "|---|---|---|---|---|---|"]
    for entry in results:
        for unit, label in (("wall", "job s"), ("cpu", "CPU-s")):
            m = entry[unit]
            lines.append(
                f"| {entry['images']:,} | {label} | {m['seconds']['defaults']:.1f} | {m['seconds']['both_off']:.1f} | "
                f"{m['faithfulness_seconds']:+.1f} ({100 * m['faithfulness_share']:+.1f}%) | "
                f"{m['sanity_seconds']:+.1f} ({100 * m['sanity_share']:+.1f}%) |")
    if all("pf" in entry for entry in results):
        lines += ["", "Whole job (start-up after the launcher and the checks included) over F measured beside it:",
                  "| images | " + " | ".join(f"P/F {name}" for name in CONFIGS) + " |",
                  "|---|" + "---|" * len(CONFIGS)]
        for entry in results:
            lines.append(f"| {entry['images']:,} | " + " | ".join(f"{entry['pf'][name]:.2f}" for name in CONFIGS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checks_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2", help="keras.applications name (random fixed weights)")
    parser.add_argument("--sizes", default="1000,10000", help="Comma-separated image counts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="Also write the results here")
    parser.add_argument("--no_forward", action="store_true", help="Do not measure F beside the runs (no P/F)")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="checks_cost_")
    probe = None if args.no_forward else forward_probe(args.model, min_seconds=3.0)
    try:
        results = [measure(args.model, int(size), workdir, args.repeats, forward=probe) for size in args.sizes.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.model}, {os.cpu_count()} CPUs, medians of {args.repeats} repeat(s)\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
