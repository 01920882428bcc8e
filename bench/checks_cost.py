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
images (`--faithfulness_images`, `--sanity_images`: 32 each by default, the
same images), so their cost should stay the same from 1,000 to 10,000 images
and its share fall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from statistics import median

from bench.common import run_pipeline_process
from bench.photos import write_photo_shards

CONFIGS = {
    "defaults": [],
    "faithfulness_off": ["--faithfulness_sample", "0"],
    "sanity_off": ["--sanity_images", "0"],
    "both_off": ["--faithfulness_sample", "0", "--sanity_images", "0"],
}


def measure(model: str, size: int, workdir: str, repeats: int) -> dict:
    data = write_photo_shards(os.path.join(workdir, f"data-{size}"), size, seed=size)
    runs: dict = {name: [] for name in CONFIGS}
    for r in range(repeats):
        for name, args in CONFIGS.items():
            out = os.path.join(workdir, f"out-{size}-{name}-{r}")
            result = run_pipeline_process(data["pattern"], model, out, extra_args=args, timeout=7200)
            if result["images_explained"] != size:
                raise RuntimeError(f"{name}: expected {size} images explained, got {result['images_explained']}")
            runs[name].append({"wall": result["pipeline_seconds"], "cpu": result["cpu_seconds"]})
            print(f"  {size} {name} repeat {r + 1}: {result['pipeline_seconds']:.1f} s job, "
                  f"{result['cpu_seconds']:.1f} CPU-s, load {result['load_average_1min']:.1f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    entry: dict = {"images": size, "runs": runs}
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
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checks_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2", help="keras.applications name (random fixed weights)")
    parser.add_argument("--sizes", default="1000,10000", help="Comma-separated image counts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="Also write the results here")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="checks_cost_")
    try:
        results = [measure(args.model, int(size), workdir, args.repeats) for size in args.sizes.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.model}, {os.cpu_count()} CPUs, medians of {args.repeats} repeat(s)\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
