"""Compare two runs class by class and flag what moved.

    python -m pipeline.compare --baseline RUN_DIR --current RUN_DIR [thresholds]

RUN_DIR is a run folder (`<output>/run=<id>`, local or gs://). The
comparison is written to `<current>/comparison.json` and
`<current>/comparison.parquet` (schema `transforms.schemas.COMPARISON_SCHEMA`).

Exit status: 0 nothing flagged, 1 something flagged (--flagged_exit_code N:
N), 2 the comparison could not run (a missing run folder or table, a bad
option), with one line on stderr. Boolean options take the bare flag,
`=true` or `=false` (pipeline/argtypes.py).

Per class (class_stats of both runs), with the default thresholds:

  images        |current - baseline| / baseline >= --max_images_change (0.2);
                a class present in one run only is always flagged.
  accuracy      a drop of at least --max_accuracy_drop (0.05).
  mean score    |change| of mean_predicted_score >= --max_score_change (0.1).
  attention     (only for classes with >= --min_images (10) images in both)
    border      |change| of mean_border_mass >= --max_border_mass_change (0.15).
    box         |change| of mean_box_mass >= --max_box_mass_change (0.15):
                attention moving off (or onto) the objects.
    correlation Pearson correlation of the two mean normalised CAMs
                < --min_cam_correlation (0.7); maps of different sizes are
                resampled to the larger one first.
    peak shift  distance between the mean peak positions (fractions of the
                image side) >= --max_peak_shift (0.15).
                These two flag only classes without boxes (or with
                --check_moves_inside_boxes): with boxes, the box and border
                masses already say whether attention left the object, while
                the mean map also moves when attention only moves within the
                objects (a retrained demo model looks at the top of its
                circles instead of the bottom: correlation 0.18, shift 0.21,
                in-box mass 0.99 -> 0.98). Both are always reported.
  shortcut      the class became a possible shortcut (transforms/flags.py).
  strategies    (the `clusters` tables of both runs; `compare_strategies`)
                a suspicious strategy that the baseline did not have, or a
                strategy whose share of the class moved by at least
                --max_strategy_share_change (0.1). A current cluster is the
                same strategy as the baseline cluster of its class whose mean
                map correlates best with its own, if that correlation is at
                least STRATEGY_MATCH (0.5); otherwise it is new (share 0 before),
                unless the baseline had one strategy only (then every current
                cluster descends from it: one strategy whose mean map moved
                is what the correlation and mass checks above are for).
  faithfulness  mean_faithfulness_gap fell by at least --max_gap_drop (0.1):
                removing the map's hottest region no longer hurts the score
                more than removing a random one as much as it did (only with
                at least MIN_FAITHFULNESS_ROWS (5) scored rows in both runs;
                see transforms/cam/faithfulness.py).

Run-wide: the share of rejected records rising by at least
--max_rejected_increase (0.02).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.argtypes import OneLineParser, add_boolean, add_settings_arguments, exit_status
from pipeline.runs.manifest import MANIFEST_NAME, load_manifest, read_table
from transforms.attention import correlation, upsample
from transforms.errors import AuditError
from transforms.schemas import COMPARISON_SCHEMA, versioned
from transforms.settings import option, settings_from

COMPARISON_JSON = "comparison.json"
COMPARISON_PARQUET = "comparison.parquet"
EXIT_OK, EXIT_FLAGGED, EXIT_FAILED = 0, 1, 2
MIN_FAITHFULNESS_ROWS = 5


@dataclasses.dataclass(frozen=True)
class CompareThresholds:
    """When a change between two runs is flagged (see the module docstring)."""

    max_images_change: float = option(0.2,
        "Flag a class whose number of images changed by this share of the baseline's", kind="number")
    max_accuracy_drop: float = option(0.05, "Flag a class whose accuracy dropped by at least this much", kind="number")
    max_score_change: float = option(0.1,
        "Flag a class whose mean predicted score moved by at least this much", kind="number")
    min_cam_correlation: float = option(0.7, "Flag a class whose mean CAMs correlate less than this", kind="number")
    max_peak_shift: float = option(0.15,
        "Flag a class whose mean peak moved at least this far (fraction of the image side)", kind="number")
    max_border_mass_change: float = option(0.15,
        "Flag a class whose mean border mass moved by at least this much", kind="number")
    max_box_mass_change: float = option(0.15,
        "Flag a class whose mean in-box mass moved by at least this much", kind="number")
    max_rejected_increase: float = option(0.02,
        "Flag the run when the share of rejected records rose by at least this much", kind="number")
    min_images: int = option(10,
        "Compare attention only for classes with at least this many images in both runs", kind="int")
    check_moves_inside_boxes: bool = option(False,
        "Also apply --min_cam_correlation and --max_peak_shift to classes with boxes (by default their box "
        "and border masses decide whether attention moved)")
    max_strategy_share_change: float = option(0.1,
        "Flag a class one of whose strategies (SpRAy clusters) changed its share of the class by at least "
        "this much", kind="number")
    max_gap_drop: float = option(0.1,
        "Flag a class whose mean faithfulness gap (MoRF - random deletion drop) fell by at least this much "
        "(only classes with at least 5 scored rows in both runs)", kind="number")


class CompareError(Exception):
    """The comparison cannot run (exit status 2)."""


def add_threshold_arguments(parser) -> None:
    """Adds one --<threshold> option per CompareThresholds field."""
    add_settings_arguments(parser, CompareThresholds)


FLAGGED_EXIT_CODE_HELP = ("Exit status when the comparison flags something (0-255; e.g. 0 for a scheduler that "
                          "retries every non-zero status: what was flagged is written all the same)")


def add_flagged_exit_code_argument(parser) -> None:
    """--flagged_exit_code: the exit status when something is flagged (for schedulers that retry on any
    non-zero status, e.g. 0, or a status of their own)."""
    parser.add_argument("--flagged_exit_code", type=exit_status, default=EXIT_FLAGGED, metavar="N",
                        help=FLAGGED_EXIT_CODE_HELP)


def thresholds_from(options) -> CompareThresholds:
    """CompareThresholds from parsed options (argparse namespace, AuditConfig or a manifest's "options")."""
    return settings_from(CompareThresholds, options)


@dataclasses.dataclass
class RunData:
    """What the comparison reads of one run."""

    run_dir: str
    manifest: dict
    classes: dict  # class_id -> class_stats row
    clusters: dict = dataclasses.field(default_factory=dict)  # class_id -> [clusters row]


def load_run(run_dir: str, role: str) -> RunData:
    """Reads a run folder's manifest and class_stats; CompareError if it is not a run."""
    run_dir = run_dir.rstrip("/")
    try:
        manifest = load_manifest(run_dir)
    except FileNotFoundError:
        raise CompareError(
            f"--{role}: expected a finished run folder with {MANIFEST_NAME}, found none at {run_dir!r}"
        ) from None
    except AuditError as exc:  # a run of a schema version this release does not know
        raise CompareError(f"--{role}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"--{role}: could not read {run_dir}/{MANIFEST_NAME}: {exc}") from None
    try:
        stats = read_table(run_dir, "class_stats").to_pylist()
    except AuditError as exc:
        raise CompareError(f"--{role}: {exc}") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CompareError(f"--{role}: could not read {run_dir}/class_stats: {exc}") from None
    clusters: dict = {}
    try:  # runs made before strategies existed have no clusters table
        for r in read_table(run_dir, "clusters").to_pylist():  # a few rows per class
            clusters.setdefault(int(r["class_id"]), []).append(r)
    except (OSError, ValueError, pa.ArrowException):
        clusters = {}
    return RunData(run_dir, manifest, {int(r["class_id"]): r for r in stats}, clusters)


STRATEGY_MATCH = 0.5


def _cluster_map(row: dict) -> np.ndarray:
    return np.asarray(row["mean_cam"], np.float64).reshape(row["cam_height"], row["cam_width"])


def compare_strategies(base: list[dict], cur: list[dict], t: CompareThresholds) -> list[str]:
    """Reasons to flag a class whose strategies changed (see the module docstring).

    Each current cluster is matched to the baseline cluster of the class whose
    mean map correlates best with its own (at least STRATEGY_MATCH), else it is
    new. Shares are compared per baseline strategy: the current clusters
    matched to it together (a strategy split in two is not a change), and a
    baseline strategy nothing matches counts as share 0 now.
    """
    if not cur or not base:  # nothing to compare with (e.g. a baseline made before strategies existed)
        return []
    reasons = []
    matched: dict = {}  # baseline cluster_id or ("new", cluster_id) -> [current rows]
    for row in sorted(cur, key=lambda r: r["cluster_id"]):
        scored = [(cam_correlation(_cluster_map(row), _cluster_map(b)), b) for b in base]
        scored = [(c, b) for c, b in scored if c is not None and c >= STRATEGY_MATCH]
        match = max(scored, key=lambda cb: cb[0])[1] if scored else None
        if match is None and len(base) == 1:  # the class had one strategy: whatever it does now descends from it
            match = base[0]
        if row["suspicious"] and (match is None or not match["suspicious"]):
            reasons.append(f"new suspicious strategy {row['cluster_id']} ({row['share']:.0%} of the class): "
                           f"{row['reason']}")
        matched.setdefault(("new", row["cluster_id"]) if match is None else match["cluster_id"], []).append(row)
    by_id = {b["cluster_id"]: b for b in base}
    for key in sorted(set(matched) | set(by_id), key=lambda k: (isinstance(k, tuple), str(k))):
        now = sum(r["share"] for r in matched.get(key, []))
        before = by_id[key]["share"] if key in by_id else 0.0
        if abs(now - before) >= t.max_strategy_share_change:
            ids = ", ".join(str(r["cluster_id"]) for r in matched.get(key, [])) or "none"
            what = f"baseline strategy {key}" if key in by_id else f"new strategy {key[1]}"
            reasons.append(f"{what} share {before:.0%} -> {now:.0%} (now strategies {ids}; "
                           f"limit {t.max_strategy_share_change:.0%})")
    return reasons


def mean_cam(row: Optional[dict]) -> Optional[np.ndarray]:
    if not row or row.get("mean_cam") is None:
        return None
    return np.asarray(row["mean_cam"], np.float64).reshape(row["cam_height"], row["cam_width"])


def cam_correlation(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[float]:
    """Pearson correlation of two maps, bilinearly resampled (`transforms.attention.upsample`) to the
    larger shape; None if undefined."""
    if a is None or b is None:
        return None
    shape = max(a.shape, b.shape, key=lambda s: s[0] * s[1])
    return correlation(*(m if m.shape == shape else upsample(m, *shape) for m in (a, b)))


def _delta(base: Optional[dict], cur: Optional[dict], key: str) -> Optional[float]:
    if not base or not cur or base.get(key) is None or cur.get(key) is None:
        return None
    return float(cur[key]) - float(base[key])


def _get(row: Optional[dict], key: str):
    return None if not row else row.get(key)


def faithfulness_gap_change(base: Optional[dict], cur: Optional[dict]) -> Optional[float]:
    """Change of the class's mean faithfulness gap, when both runs scored enough of its rows."""
    if (_get(base, "num_faithfulness") or 0) < MIN_FAITHFULNESS_ROWS:
        return None
    if (_get(cur, "num_faithfulness") or 0) < MIN_FAITHFULNESS_ROWS:
        return None
    return _delta(base, cur, "mean_faithfulness_gap")


def compare_class(class_id: int, base: Optional[dict], cur: Optional[dict], t: CompareThresholds) -> dict:
    """One row of COMPARISON_SCHEMA: the changes of one class and why it is flagged."""
    reasons = []
    n_base, n_cur = _get(base, "num_labelled"), _get(cur, "num_labelled")
    if base is None:
        reasons.append("new class: absent from the baseline")
    elif cur is None:
        reasons.append("class missing: present in the baseline only")
    images_change = None
    if n_base is not None and n_cur is not None:
        if n_base:
            images_change = (n_cur - n_base) / n_base
            if abs(images_change) >= t.max_images_change:
                reasons.append(f"images {n_base} -> {n_cur} ({images_change:+.0%}; limit {t.max_images_change:.0%})")
        elif n_cur:
            reasons.append(f"images 0 -> {n_cur}")
    accuracy_change = _delta(base, cur, "accuracy")
    if accuracy_change is not None and -accuracy_change >= t.max_accuracy_drop:
        reasons.append(
            f"accuracy {base['accuracy']:.2f} -> {cur['accuracy']:.2f} (drop limit {t.max_accuracy_drop:.2f})"
        )
    score_change = _delta(base, cur, "mean_predicted_score")
    if score_change is not None and abs(score_change) >= t.max_score_change:
        reasons.append(
            f"mean score {base['mean_predicted_score']:.2f} -> {cur['mean_predicted_score']:.2f} "
            f"(limit {t.max_score_change:.2f})"
        )
    enough = (n_base or 0) >= t.min_images and (n_cur or 0) >= t.min_images
    correlation = cam_correlation(mean_cam(base), mean_cam(cur))
    peak_shift = None
    if all(_get(r, k) is not None for r in (base, cur) for k in ("mean_peak_y", "mean_peak_x")):
        peak_shift = math.hypot(cur["mean_peak_y"] - base["mean_peak_y"], cur["mean_peak_x"] - base["mean_peak_x"])
    border_change = _delta(base, cur, "mean_border_mass")
    box_change = _delta(base, cur, "mean_box_mass")
    # With boxes in both runs the box and border masses say whether attention left the
    # object; a move that stays on it (e.g. from a circle's bottom to its top) is not
    # flagged unless --check_moves_inside_boxes.
    boxed = _get(base, "mean_box_mass") is not None and _get(cur, "mean_box_mass") is not None
    shape_checks = enough and (t.check_moves_inside_boxes or not boxed)
    if shape_checks:
        if correlation is not None and correlation < t.min_cam_correlation:
            reasons.append(f"mean CAM correlation {correlation:.2f} (min {t.min_cam_correlation:.2f})")
        if peak_shift is not None and peak_shift >= t.max_peak_shift:
            reasons.append(f"mean peak moved {peak_shift:.2f} of the image (limit {t.max_peak_shift:.2f})")
    if enough:
        if border_change is not None and abs(border_change) >= t.max_border_mass_change:
            reasons.append(
                f"border mass {base['mean_border_mass']:.2f} -> {cur['mean_border_mass']:.2f} "
                f"(limit {t.max_border_mass_change:.2f})"
            )
        if box_change is not None and abs(box_change) >= t.max_box_mass_change:
            reasons.append(
                f"in-box mass {base['mean_box_mass']:.2f} -> {cur['mean_box_mass']:.2f} "
                f"(limit {t.max_box_mass_change:.2f})"
            )
    gap_change = faithfulness_gap_change(base, cur)
    if gap_change is not None and -gap_change >= t.max_gap_drop:
        reasons.append(
            f"faithfulness gap {base['mean_faithfulness_gap']:.3f} -> {cur['mean_faithfulness_gap']:.3f} "
            f"(drop limit {t.max_gap_drop:.2f}): its maps point less at what the model uses"
        )
    if _get(cur, "shortcut") and not _get(base, "shortcut"):
        reasons.append("became a possible shortcut (attention in one place whatever the object's position)")
    name = _get(cur, "class_name") or _get(base, "class_name")
    return {
        "class_id": class_id,
        "class_name": name,
        "baseline_images": n_base,
        "current_images": n_cur,
        "images_change": images_change,
        "baseline_accuracy": _get(base, "accuracy"),
        "current_accuracy": _get(cur, "accuracy"),
        "accuracy_change": accuracy_change,
        "baseline_mean_score": _get(base, "mean_predicted_score"),
        "current_mean_score": _get(cur, "mean_predicted_score"),
        "mean_score_change": score_change,
        "cam_correlation": correlation,
        "peak_shift": peak_shift,
        "border_mass_change": border_change,
        "box_mass_change": box_change,
        "pointing_accuracy_change": _delta(base, cur, "pointing_accuracy"),
        "share_flagged_change": _delta(base, cur, "share_flagged"),
        "faithfulness_gap_change": gap_change,
        "baseline_shortcut": _get(base, "shortcut"),
        "current_shortcut": _get(cur, "shortcut"),
        "flagged": bool(reasons),
        "reasons": reasons,
    }


def _rejected_share(manifest: dict) -> Optional[float]:
    counts = manifest.get("counts", {})
    read = counts.get("records_read") or 0
    return sum((counts.get("records_rejected") or {}).values()) / read if read else None


def compare_runs(baseline: RunData, current: RunData, thresholds: Optional[CompareThresholds] = None) -> dict:
    """The comparison of two loaded runs (a JSON-able dict)."""
    t = thresholds or CompareThresholds()
    classes = [
        compare_class(c, baseline.classes.get(c), current.classes.get(c), t)
        for c in sorted(set(baseline.classes) | set(current.classes))
    ]
    for row in classes:
        strategy_reasons = compare_strategies(baseline.clusters.get(row["class_id"], []),
                                              current.clusters.get(row["class_id"], []), t)
        row["reasons"] = row["reasons"] + strategy_reasons
        row["flagged"] = bool(row["reasons"])
    run_reasons = []
    before, after = _rejected_share(baseline.manifest), _rejected_share(current.manifest)
    if before is not None and after is not None and after - before >= t.max_rejected_increase:
        run_reasons.append(f"rejected records {before:.1%} -> {after:.1%} (limit +{t.max_rejected_increase:.0%})")
    flagged_classes = [c["class_id"] for c in classes if c["flagged"]]
    b_model, c_model = baseline.manifest.get("model", {}), current.manifest.get("model", {})
    return {
        "baseline": {"run_id": baseline.manifest.get("run_id"), "run_dir": baseline.run_dir,
                     "model_fingerprint": b_model.get("fingerprint"),
                     "images_explained": baseline.manifest.get("counts", {}).get("images_explained")},
        "current": {"run_id": current.manifest.get("run_id"), "run_dir": current.run_dir,
                    "model_fingerprint": c_model.get("fingerprint"),
                    "images_explained": current.manifest.get("counts", {}).get("images_explained")},
        "model_changed": b_model.get("fingerprint") != c_model.get("fingerprint"),
        "thresholds": dataclasses.asdict(t),
        "run_reasons": run_reasons,
        "flagged_classes": flagged_classes,
        "flagged": bool(flagged_classes or run_reasons),
        "classes": classes,
    }


def write_comparison(comparison: dict, folder: str) -> dict:
    """Writes comparison.json and comparison.parquet into `folder`; returns their paths."""
    folder = folder.rstrip("/")
    paths = {"json": f"{folder}/{COMPARISON_JSON}", "parquet": f"{folder}/{COMPARISON_PARQUET}"}
    with FileSystems.create(paths["json"]) as handle:
        handle.write(json.dumps(comparison, indent=2, default=_json_default).encode("utf-8"))
    run_id = (comparison.get("current") or {}).get("run_id") or ""
    rows = [{**row, "run_id": run_id} for row in comparison["classes"]]
    table = pa.Table.from_pylist(rows, schema=versioned(COMPARISON_SCHEMA))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with FileSystems.create(paths["parquet"]) as handle:
        handle.write(sink.getvalue().to_pybytes())
    return paths


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def brief(comparison: dict) -> dict:
    """What a manifest or the runs index keeps of a comparison."""
    return {
        "baseline_run_id": comparison["baseline"]["run_id"],
        "baseline_run_dir": comparison["baseline"]["run_dir"],
        "flagged": comparison["flagged"],
        "flagged_classes": comparison["flagged_classes"],
        "run_reasons": comparison["run_reasons"],
    }


def comparison_text(comparison: dict) -> str:
    """A short table of the changes, then one line per flagged class."""
    b, c = comparison["baseline"], comparison["current"]
    lines = [
        f"Compared run {c['run_id']} with baseline {b['run_id']}"
        + (" (model changed)." if comparison["model_changed"] else " (same model)."),
        f"{'class':<16}{'images':>9}{'acc':>8}{'score':>8}{'corr':>7}{'shift':>7}{'border':>8}{'in-box':>8}",
    ]

    def f(v, spec="+.2f"):
        return "-" if v is None else format(v, spec)

    for row in comparison["classes"]:
        name = f"{row['class_id']} {row['class_name'] or ''}".strip()
        before = "-" if row["baseline_images"] is None else row["baseline_images"]
        after = "-" if row["current_images"] is None else row["current_images"]
        images = f"{before}>{after}"
        lines.append(
            f"{name:<16}{images:>9}{f(row['accuracy_change']):>8}{f(row['mean_score_change']):>8}"
            f"{f(row['cam_correlation'], '.2f'):>7}{f(row['peak_shift'], '.2f'):>7}"
            f"{f(row['border_mass_change']):>8}{f(row['box_mass_change']):>8}"
        )
    lines.append("")
    for reason in comparison["run_reasons"]:
        lines.append(f"! run: {reason}")
    for row in comparison["classes"]:
        if row["flagged"]:
            name = f"{row['class_id']} {row['class_name'] or ''}".strip()
            lines.append(f"! class {name}: " + "; ".join(row["reasons"]))
    if not comparison["flagged"]:
        lines.append("Nothing flagged.")
    return "\n".join(lines)


def exit_code(comparison: dict, flagged_exit_code: int = EXIT_FLAGGED) -> int:
    """The exit status of a comparison: `flagged_exit_code` (--flagged_exit_code, default 1) when it flagged
    something, else 0."""
    return flagged_exit_code if comparison["flagged"] else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pipeline.compare",
        description="Compare two audit runs class by class. Exit status: 0 nothing flagged, "
        "1 something flagged (--flagged_exit_code N: N), 2 bad option or the comparison could not run. "
        "Boolean options take the bare flag, =true or =false.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--baseline", required=True, help="The earlier run folder (<output>/run=<id>, local or gs://)")
    parser.add_argument("--current", required=True, help="The run folder to check (local or gs://)")
    parser.add_argument("--write_to", default=None,
                        help="Folder for comparison.json/.parquet (default: the --current folder)")
    add_boolean(parser, "--no_write", help="Only print, write nothing")
    add_boolean(parser, "--quiet", help="Print nothing but errors")
    add_flagged_exit_code_argument(parser)
    add_threshold_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        baseline = load_run(args.baseline, "baseline")
        current = load_run(args.current, "current")
        comparison = compare_runs(baseline, current, thresholds_from(args))
        if not args.no_write:
            write_comparison(comparison, args.write_to or current.run_dir)
    except CompareError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: the comparison could not run: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
    if not args.quiet:
        print(comparison_text(comparison))
    return exit_code(comparison, args.flagged_exit_code)


if __name__ == "__main__":
    sys.exit(main())
