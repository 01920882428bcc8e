"""The report's figures: matplotlib plots as PNG data: URIs (nothing else draws)."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from pipeline.formatting import class_name as _class_name
from pipeline.formatting import data_uri as _data_uri
from transforms.flags import IMAGE_FLAGS
from transforms.thumbnails import COLORMAP


def figure_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")


def class_plots(stats: list[dict], names: dict) -> str:
    """Bars per class: accuracy and pointing game; share of each flag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_class_name(names, s["class_id"]) for s in stats]
    x = np.arange(len(stats))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))

    def values(key):
        return [np.nan if s.get(key) is None else s[key] for s in stats]

    width = 0.38
    axes[0].bar(x - width / 2, values("accuracy"), width, label="accuracy")
    axes[0].bar(x + width / 2, values("pointing_accuracy"), width, label="pointing game")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("Accuracy and pointing game per class")
    flags = list(IMAGE_FLAGS)
    width = 0.8 / len(flags)
    for i, flag in enumerate(flags):
        axes[1].bar(x - 0.4 + width * (i + 0.5), values(f"share_{flag}"), width, label=flag.replace("_", " "))
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("Share of flagged images per class")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30 if len(stats) > 4 else 0, ha="right" if len(stats) > 4 else "center",
                      fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_uri(fig)


def mean_cam_figure(stats: list[dict], names: dict, title: str = "") -> Optional[str]:
    """One panel per class: its mean normalised CAM over the image (3x3 grid drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in stats if s.get("mean_cam") is not None]
    if not rows:
        return None
    cols = min(len(rows), 6)
    lines = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(1.9 * cols, 2.1 * lines), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel()[: len(rows)], rows, strict=True):
        cam = np.asarray(s["mean_cam"], np.float32).reshape(s["cam_height"], s["cam_width"])
        ax.imshow(cam, cmap=COLORMAP, vmin=0, extent=(0, 1, 1, 0), interpolation="bilinear")
        for t in (1 / 3, 2 / 3):
            ax.axhline(t, color="white", lw=0.5, alpha=0.6)
            ax.axvline(t, color="white", lw=0.5, alpha=0.6)
        mark = " (shortcut?)" if s.get("shortcut") else ""
        ax.set_title(f"{_class_name(names, s['class_id'])}{mark}", fontsize=8,
                     color="crimson" if s.get("shortcut") else "black")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_uri(fig)


def deletion_curves_figure(stats: list[dict], names: dict, fractions, max_classes: int) -> Optional[str]:
    """Mean deletion curves (score drop vs share removed: MoRF, LeRF, random) of the most flagged classes.

    Only classes with scored rows (--faithfulness_sample); one panel each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [s for s in stats if s.get("num_faithfulness") and s.get("mean_deletion_morf") is not None]
    if not scored:
        return None
    shown = sorted(scored, key=lambda s: (not s.get("shortcut"), -(s.get("share_flagged") or 0), s["class_id"]))
    shown = sorted(shown[:max_classes], key=lambda s: s["class_id"])
    q = [0.0, *fractions]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 0.6, 2.6), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], shown, strict=True):
        for key, label, style in (("morf", "most relevant first", "-o"), ("random", "random", "--s"),
                                  ("lerf", "least relevant first", ":^")):
            ax.plot(q, [0.0, *s[f"mean_deletion_{key}"]], style, ms=3, label=label)
        ax.set_title(f"{_class_name(names, s['class_id'])} (n={s['num_faithfulness']}, "
                     f"gap {s['mean_faithfulness_gap']:+.2f})", fontsize=8)
        ax.set_xlabel("share of the image removed", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("drop of the target's score", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return figure_uri(fig)
