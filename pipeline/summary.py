"""The short text summary printed after a run: counts, per-class accuracy, attention."""

from __future__ import annotations

import numpy as np

from pipeline.manifest import read_table

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
    vertical, horizontal = ("top", "middle", "bottom")[i], ("left", "centre", "right")[j]
    if (i, j) == (1, 1):
        return "centre", share
    if i != 1 and j != 1:
        return f"{vertical}-{horizontal} corner", share
    return f"{vertical if i != 1 else horizontal} edge", share


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
        f"Tables under {manifest['output']}/ (heatmaps, class_stats, errors) and run_manifest.json.",
    ]
    for kind, n in counts["errors_by_kind"].items():
        lines.append(f"  error {kind}: {n}")
    stats = sorted(read_table(manifest["output"], "class_stats").to_pylist(), key=lambda r: r["class_id"])
    lines.append("")
    lines.append(f"{'class':<16}{'images':>7}{'acc':>7}{'score':>7}{'in-box':>8}{'border':>8}  attention")
    flagged = []
    for row in stats:
        name = f"{row['class_id']} {row['class_name'] or ''}".strip()
        where, share = "-", 0.0
        if row["mean_cam"] is not None:
            where, share = locate(np.asarray(row["mean_cam"]).reshape(row["cam_height"], row["cam_width"]))
        lines.append(
            f"{name:<16}{row['num_labelled']:>7}{_fmt(row['accuracy']):>7}"
            f"{_fmt(row['mean_predicted_score']):>7}{_fmt(row['mean_box_mass']):>8}"
            f"{_fmt(row['mean_border_mass']):>8}  {where} ({share:.0%})"
        )
        if share >= CONCENTRATED and where != "centre":
            flagged.append(
                f"! class {name}: {share:.0%} of its mean attention sits in the {where}, "
                "whatever the object's position: a possible shortcut."
            )
    return "\n".join(lines + [""] + flagged)
