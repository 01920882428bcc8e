"""Does every demo model show the same findings? Five seeds, oneDNN on and off.

    python -m bench.demo_seeds [--seeds 0 1 2 3 4] [--onednn on off] [--work DIR]

Trains the demo CNN (`pipeline.demo.train_model`, seeded, op determinism on) once per seed and oneDNN
setting, each in its own process (`TF_ENABLE_ONEDNN_OPTS` must be set before TensorFlow loads), audits the
demo's shards with it, and prints which classes each run's summary flags ("! class" lines) and each
class's strategy verdicts (suspicious clusters / clusters, with the suspicious clusters' peak cells). The
demo plants shortcuts in "triangle" (fixed marker) and "cross" (a marker in a random corner): every run
should flag those two and neither "circle" nor "square".

Not part of the test suite (about 40 s a run on 2 cores, 10 runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

EXPECTED = {"triangle", "cross"}


def one_run(work: str, seed: int, plain: bool = False) -> dict:
    """In the child: train with `seed` (`plain`: the markers on every class alike, as the tests'
    control model),
    audit the demo shards, return what the summary flags."""
    from pipeline.demo import CLASS_NAMES, Demo, ensure_demo, train_control_model, train_model
    from pipeline.graph import run
    from pipeline.runs.manifest import read_table
    from pipeline.runs.summary import summary_text

    demo: Demo = ensure_demo(os.path.join(work, "demo"))  # the demo's shards (made once, shared by the runs)
    tag = f"{'plain-' if plain else ''}seed{seed}-onednn{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}"
    model = os.path.join(work, "models", f"{tag}.keras")
    trained = train_control_model(model, seed=seed) if plain else train_model(model, seed=seed)
    _, manifest = run(["--input", demo.input_pattern, "--model", model, "--class_names", demo.class_names_path,
                       "--output", os.path.join(work, "out"), "--run_id", tag, "--quiet", "--no_report"])
    flagged = sorted({CLASS_NAMES[int(m)] for m in re.findall(r"^! class (\d+) ", summary_text(manifest), re.M)})
    strategies = {}
    for c in read_table(manifest["output"], "clusters").to_pylist():
        entry = strategies.setdefault(CLASS_NAMES[c["class_id"]], {"clusters": 0, "suspicious": 0, "cells": []})
        entry["clusters"] += 1
        if c["suspicious"]:
            entry["suspicious"] += 1
            entry["cells"].append(c["peak_cell"])
    return {"seed": seed, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"), "plain": plain,
            "accuracy": trained["accuracy"], "flagged": flagged, "strategies": strategies}


def _child(work: str, seed: int, onednn: str, plain: bool = False) -> dict:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1" if onednn == "on" else "0", TF_CPP_MIN_LOG_LEVEL="2")
    argv = ["--one", str(seed), "--work", work, "--models", "control" if plain else "shortcut"]
    proc = subprocess.run([sys.executable, "-m", "bench.demo_seeds", *argv], capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        return {"seed": seed, "onednn": onednn, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], expected: set = EXPECTED) -> str:
    from pipeline.demo import CLASS_NAMES

    lines = [f"{'seed':>4} {'oneDNN':>6} {'acc':>5}  " + "  ".join(f"{n:<22}" for n in CLASS_NAMES) + "  as expected"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['seed']:>4} {r['onednn']:>6}  failed: {r['error']}")
            continue
        cells = []
        for name in CLASS_NAMES:
            s = r["strategies"].get(name, {"clusters": 0, "suspicious": 0, "cells": []})
            mark = "FLAGGED" if name in r["flagged"] else "-"
            cells.append(f"{mark} {s['suspicious']}/{s['clusters']} {s['cells'] or ''}".strip())
        ok = set(r["flagged"]) == expected
        onednn = {"1": "on", "0": "off"}.get(r["onednn"], r["onednn"])
        lines.append(f"{r['seed']:>4} {onednn:>6} {r['accuracy']:>5.2f}  "
                     + "  ".join(f"{c:<22}" for c in cells) + f"  {'yes' if ok else 'NO'}")
    good = sum(1 for r in results if "error" not in r and set(r["flagged"]) == expected)
    what = (f"{' and '.join(sorted(expected))} flagged, the other classes not" if expected
            else "no class flagged")
    lines.append(f"{what}: {good} of {len(results)} runs (cells: strategy peaks, 0..8 row-major; suspicious/clusters)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--onednn", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--work", help="Folder for the demo shards, models and runs (default: a temporary one)")
    parser.add_argument("--models", nargs="+", choices=["shortcut", "control"], default=["shortcut"],
                        help="shortcut: the demo's model; control: a model trained with the same markers on "
                        "every class alike (as the tests' second run), which should flag no class")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's seed
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args.work, args.one, plain=args.models == ["control"])))
        return
    work = args.work or tempfile.mkdtemp(prefix="demo_seeds-")
    runs = {False: [], True: []}
    for plain in [kind == "control" for kind in args.models]:
        for seed in args.seeds:
            for onednn in args.onednn:
                runs[plain].append(_child(work, seed, onednn, plain))
                found = runs[plain][-1].get("flagged", runs[plain][-1].get("error"))
                print(f"{'control ' if plain else ''}seed {seed} oneDNN {onednn}: {found}", flush=True)
    if runs[False]:
        print(table(runs[False]))
    if runs[True]:
        print("Control models, trained with the markers on every class alike:")
        print(table(runs[True], expected=set()))
    with open(os.path.join(work, "demo_seeds.json"), "w") as handle:
        json.dump(runs[False] + runs[True], handle, indent=1)


if __name__ == "__main__":
    main()
