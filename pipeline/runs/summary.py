"""The short text summary printed after a run: counts, per-class accuracy, attention."""

from __future__ import annotations

import numpy as np

from pipeline.runs.manifest import read_table
from transforms.flags import CELL_NAMES

CONCENTRATED = 0.5  # share of a class's mean map in one ninth of the image


def locate(mean_cam: np.ndarray) -> tuple[str, float]:
    """Where the mass of a (mean) map sits: (place in words, share of the mass).

    The image is cut in a 3x3 grid; the ninth with the most mass names the
    place ("top-left corner", "left edge", "centre"), or "spread out" when no
    ninth holds more than a third of the mass.
    """
    h, w = mean_cam.shape
    total = float(mean_cam.sum())
    if total <= 0:
        return "no attention", 0.0
    rows = np.array_split(np.arange(h), 3)
    cols = np.array_split(np.arange(w), 3)
    mass = np.array([[mean_cam[np.ix_(r, c)].sum() for c in cols] for r in rows]) / total
    i, j = np.unravel_index(int(mass.argmax()), mass.shape)
    share = float(mass[i, j])
    if share < 1 / 3:
        return "spread out", share
    name = CELL_NAMES[i * 3 + j]
    if name == "centre":
        return name, share
    return f"{name} {'corner' if '-' in name else 'edge'}", share


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_text(manifest: dict) -> str:
    """The summary of a finished run."""
    counts = manifest["counts"]
    rejected = ", ".join(f"{stage} {n}" for stage, n in counts["records_rejected"].items() if n) or "none"
    lines = [
        (
            f"Explained {counts['images_explained']} of {counts['records_read']} records "
            f"(rejected: {rejected}; shard errors: {counts['shard_errors']})."
        ),
        (
            f"Model {manifest['model']['uri']}, target layer {manifest['model']['target_layer']}, "
            f"method {manifest['options']['method']}, target {manifest['options']['target']}."
        ),
        (
            f"Tables under {manifest['output']}/ (heatmaps, class_stats, clusters, errors, exemplars), run_manifest.json"
            + (" and report.html." if isinstance(manifest.get("report"), str) else ".")
        ),
    ]
    for kind, n in counts["errors_by_kind"].items():
        lines.append(f"  error {kind}: {n}")
    attention = manifest.get("attention") or {}
    if attention.get("pointing_accuracy") is not None:
        lines.append(
            f"Pointing game: the CAM peak falls inside the box on {attention['pointing_accuracy']:.1%} "
            f"of {attention['pointing_images']} boxed images."
        )
    stats = sorted(read_table(manifest["output"], "class_stats").to_pylist(), key=lambda r: r["class_id"])
    lines.append("")
    lines.append(
        f"{'class':<16}{'images':>7}{'acc':>7}{'score':>7}{'in-box':>8}{'border':>8}{'point':>7}{'flagged':>8}"
        "  attention"
    )
    flagged = []
    for row in stats:
        name = f"{row['class_id']} {row['class_name'] or ''}".strip()
        where, share = "-", 0.0
        if row["mean_cam"] is not None:
            where, share = locate(np.asarray(row["mean_cam"]).reshape(row["cam_height"], row["cam_width"]))
        lines.append(
            f"{name:<16}{row['num_labelled']:>7}{_fmt(row['accuracy']):>7}"
            f"{_fmt(row['mean_predicted_score']):>7}{_fmt(row['mean_box_mass']):>8}"
            f"{_fmt(row['mean_border_mass']):>8}{_fmt(row.get('pointing_accuracy')):>7}"
            f"{_fmt(row.get('share_flagged'), '.0%'):>8}  {where} ({share:.0%})"
        )
        reasons = []
        if share >= CONCENTRATED and where != "centre":
            reasons.append(f"{share:.0%} of its mean attention sits in the {where}")
        if row.get("shortcut"):
            box_share = row.get("box_cell_share")
            reasons.append(
                f"{row['peak_cell_share']:.0%} of its images peak in the {CELL_NAMES[row['peak_cell']]} ninth"
                + ("" if box_share is None else f", where {box_share:.0%} of its objects are")
            )
        if reasons:
            flagged.append(f"! class {name}: " + "; ".join(reasons) + ", whatever the object's position: "
                           "a possible shortcut.")
    from pipeline.report.strategies import read_clusters, summary_lines

    names = {row["class_id"]: row["class_name"] for row in stats}
    flagged += summary_lines(read_clusters(manifest["output"]), names)
    flagged += faithfulness_lines(manifest.get("faithfulness"))
    flagged += comparison_lines(manifest.get("comparison"))
    return "\n".join(lines + [""] + flagged)


def faithfulness_lines(summary: dict | None) -> list[str]:
    """The run's faithfulness (mean gap and interval) and sanity check, as summary lines.

    A failed sanity check is a "!" line; it does not change the exit status
    (only --compare_with_previous findings do).
    """
    if not summary:
        return []
    lines = []
    if summary.get("mean_gap") is not None:
        low, high = summary["gap_ci95"]
        resting = summary.get("bootstrap_sample", summary["rows"])
        lines.append(
            f"Faithfulness on {summary['rows']} sampled images{sample_bounds(summary)}: removing the map's top "
            f"region lowers the score {summary['mean_gap']:+.3f} more than a random region (95% CI "
            f"{low:+.3f} to {high:+.3f}, resting on {resting} image{'s' if resting != 1 else ''}; "
            f"positive on {summary['share_positive_gap']:.0%})."
        )
        if high <= 0:
            lines.append("! faithfulness: the maps' hottest regions matter no more to the model than random ones.")
    sanity = summary.get("sanity")
    if sanity and sanity.get("images"):
        correlation = sanity.get("correlation")
        text = "-" if correlation is None else f"{correlation:.2f}"
        layers = ", ".join(sanity.get("layers") or []) or "none"
        if sanity.get("flagged"):
            lines.append(
                f"! sanity check: with the head's weights randomised ({layers}) the maps of {sanity['images']} "
                f"images still rank-correlate {text} with the real ones (limit {sanity['max_correlation']:.2f}): "
                "they barely depend on what the model learnt."
            )
        else:
            lines.append(
                f"Sanity check: with the head's weights randomised ({layers}) the maps change "
                f"(rank correlation {text} over {sanity['images']} images)."
            )
    return lines


def sample_bounds(summary: dict) -> str:
    """What bounded the faithfulness sample, for the summary line: " (the smallest id hashes, at most
    --faithfulness_images N and --faithfulness_sample S)" (empty when the summary does not say)."""
    bounds = []
    if summary.get("max_images"):
        bounds.append(f"--faithfulness_images {summary['max_images']}")
    if summary.get("sample_share") is not None and summary["sample_share"] < 1:
        bounds.append(f"--faithfulness_sample {summary['sample_share']:g}")
    return f" (the smallest id hashes, at most {' and '.join(bounds)})" if bounds else ""


def comparison_lines(comparison: dict | None) -> list[str]:
    """What --compare_with_previous found, as summary lines."""
    if not comparison:
        return []
    if comparison.get("baseline_run_id") is None:
        return [f"Comparison: {comparison.get('message', 'no earlier run')}."]
    if comparison.get("flagged") is None:
        return [f"! compare: could not compare with run {comparison['baseline_run_id']}: {comparison['message']}"]
    if not comparison["flagged"]:
        return [f"Compared with run {comparison['baseline_run_id']}: nothing flagged."]
    out = [f"! compare with run {comparison['baseline_run_id']}: flagged classes "
           f"{', '.join(str(c) for c in comparison['flagged_classes']) or 'none'}"
           + (f"; {'; '.join(comparison['run_reasons'])}" if comparison["run_reasons"] else "")
           + "; details in comparison.json in the run folder."]
    return out
