"""The report's strategy strips: per class, one panel per strategy (SpRAy cluster).

Each strip shows, for one class, its strategies left to right (largest
first): the cluster's mean max-normalised map over the image (3x3 grid
drawn), its share of the class, why it is suspicious, and the exemplar
images closest to its mean with their CAM overlaid.

What it reads: the `clusters` table (a few rows per class) and the
exemplars table's "strategy:<class>:<cluster>" thumbnails (a few per
strategy, chosen in the job): never the heatmaps or the shards.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from pipeline.formatting import class_name as _class_name
from pipeline.formatting import data_uri as _data_uri
from pipeline.formatting import esc as _esc
from pipeline.formatting import fmt as _fmt
from pipeline.runs.manifest import read_table
from transforms.exemplars import STRATEGY_EXEMPLARS, strategy_kind
from transforms.flags import CELL_NAMES
from transforms.thumbnails import COLORMAP

_LOG = logging.getLogger(__name__)

MAX_STRATEGY_CLASSES = 12  # strips shown: suspicious classes first, then the classes with most strategies
TILES_PER_STRATEGY = STRATEGY_EXEMPLARS  # the exemplars table keeps this many per strategy
MAP_TILE = 112  # px

CSS = """
.strip{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0 18px} .strategy{border:1px solid #ddd;padding:6px;
width:auto;font-size:11px} .strategy.suspicious{border:2px solid #b00020;background:#fff5f5}
.strategy .tiles{display:flex;gap:4px} .strategy .why{max-width:360px}
"""


def read_clusters(run_dir: str) -> list[dict]:
    """The clusters table (a few rows per class); empty for runs made before strategies existed."""
    try:
        return read_table(run_dir, "clusters").to_pylist()
    except (OSError, ValueError, KeyError) as exc:
        _LOG.warning("Report: no clusters table in %s: %s", run_dir, exc)
        return []


def map_tile(mean_cam: np.ndarray, size: int = MAP_TILE) -> bytes:
    """A PNG of a mean map, upsampled bilinearly to size x size, with the 3x3 grid."""
    import io

    import matplotlib
    from PIL import Image, ImageDraw

    peak = float(mean_cam.max())
    norm = mean_cam / peak if peak > 0 else np.zeros_like(mean_cam)
    heat = Image.fromarray(norm.astype(np.float32)).resize((size, size), Image.BILINEAR)
    rgb = (matplotlib.colormaps[COLORMAP](np.clip(np.asarray(heat), 0, 1))[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for t in (size // 3, 2 * size // 3):
        draw.line([(t, 0), (t, size)], fill=(255, 255, 255))
        draw.line([(0, t), (size, t)], fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def exemplar_tiles(exemplars: Optional[dict[str, list[dict]]], clusters: list[dict]
                   ) -> dict[tuple[int, int], list[tuple[str, bytes]]]:
    """(class, cluster) -> [(image id, JPEG of the image with its CAM)], closest to the cluster mean first.

    Args:
      exemplars: `pipeline.report.page.exemplars_by_kind` of the run (None: a run without the table).
        The tiles are the thumbnails the job drew for kind "strategy:<class>:<cluster>";
        neither the heatmaps nor the shards are read.
    """
    tiles: dict[tuple[int, int], list[tuple[str, bytes]]] = {}
    for c in clusters if exemplars else ():
        rows = exemplars.get(strategy_kind(c["class_id"], c["cluster_id"]), [])[:TILES_PER_STRATEGY]
        if rows:
            tiles[(c["class_id"], c["cluster_id"])] = [(r["image_id"], r["thumbnail"]) for r in rows]
    return tiles


def chosen_classes(clusters: list[dict], limit: int = MAX_STRATEGY_CLASSES) -> list[int]:
    """Classes to show: those with a suspicious strategy first, then those with the most strategies."""
    by_class: dict[int, list[dict]] = {}
    for c in clusters:
        by_class.setdefault(c["class_id"], []).append(c)
    order = sorted(by_class, key=lambda k: (not any(c["suspicious"] for c in by_class[k]), -len(by_class[k]), k))
    return order[:limit]


def strategies_section(run_dir: str, names: dict, exemplars: Optional[dict[str, list[dict]]],
                       clusters: Optional[list[dict]] = None) -> str:
    """The HTML of the strategies section (empty string when the run has no clusters table).

    Args:
      exemplars: `pipeline.report.page.exemplars_by_kind` of the run (None when it has no exemplars table).
    """
    clusters = read_clusters(run_dir) if clusters is None else clusters
    if not clusters:
        return ""
    classes = chosen_classes(clusters)
    shown = [c for c in clusters if c["class_id"] in set(classes)]
    tiles = exemplar_tiles(exemplars, shown)
    total = len({c["class_id"] for c in clusters})
    suspicious = sorted({c["class_id"] for c in clusters if c["suspicious"]})
    parts = [
        "<h2 id=strategies>Strategies per class</h2>",
        "<p class=muted>Each class's maps clustered (SpRAy, spectral clustering; the number of strategies from the "
        "eigengap): one panel per strategy, largest first, with its mean map over the image (lines cut it in "
        "ninths), its share of the class, and the images closest to its mean. Red: a suspicious strategy, one that "
        "looks off the objects. "
        f"{len(suspicious)} of {total} classes have one"
        + (f"; showing {len(classes)}" if len(classes) < total else "") + ".</p>",
    ]
    for class_id in classes:
        rows = sorted((c for c in clusters if c["class_id"] == class_id), key=lambda c: c["cluster_id"])
        gap = rows[0].get("eigengap")
        parts.append(f"<h3>{_esc(_class_name(names, class_id))}: {len(rows)} "
                     f"strateg{'y' if len(rows) == 1 else 'ies'} <span class=muted>(eigengap {_fmt(gap, '.3f')})"
                     "</span></h3><div class=strip>")
        for c in rows:
            cam = np.asarray(c["mean_cam"], np.float32).reshape(c["cam_height"], c["cam_width"])
            figures = "".join(
                f"<img alt='{_esc(image_id)}' title='{_esc(image_id)}' src='{_data_uri(tile, 'image/jpeg')}'>"
                for image_id, tile in tiles.get((class_id, c["cluster_id"]), [])
            )
            why = (f"<div class='why bad'>{_esc(c['reason'])}</div>" if c["suspicious"]
                   else f"<div class=why>in-box concentration {_fmt(c['mean_box_concentration'])}, "
                        f"peaks off their boxes {_fmt(c.get('miss_share'), '.0%')}, "
                        f"mass in the boxes {_fmt(c.get('mean_box_mass'), '.0%')}, "
                        f"border mass {_fmt(c['mean_border_mass'])}</div>")
            parts.append(
                f"<div class='strategy{' suspicious' if c['suspicious'] else ''}' data-class='{class_id}' "
                f"data-cluster='{c['cluster_id']}'><b>strategy {c['cluster_id']}</b>: {_fmt(c['share'], '.0%')} "
                f"({c['size']} maps)<div class=tiles><img alt='mean map' src='{_data_uri(map_tile(cam), 'image/png')}'>"
                f"{figures}</div>{why}</div>"
            )
        parts.append("</div>")
    return "".join(parts)


def summary_lines(clusters: list[dict], names: dict) -> list[str]:
    """One '! class' line per class with suspicious strategies (for the printed summary)."""
    lines = []
    for class_id in sorted({c["class_id"] for c in clusters if c["suspicious"]}):
        mine = [c for c in clusters if c["class_id"] == class_id]
        bad = sorted((c for c in mine if c["suspicious"]), key=lambda c: -c["share"])
        places = ", ".join(
            f"{'?' if c['peak_cell'] is None else CELL_NAMES[c['peak_cell']]} {c['share']:.0%}" for c in bad
        )
        name = f"{class_id} {names.get(class_id) or ''}".strip()
        lines.append(
            f"! class {name}: {len(bad)} of its {len(mine)} strategies look off the objects "
            f"({sum(c['share'] for c in bad):.0%} of its images; peaks {places}): a possible shortcut "
            "(strategies in report.html)."
        )
    return lines
