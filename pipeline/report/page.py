"""The visual report of one run: a single self-contained HTML file.

    python -m pipeline.report RUN_DIR [--out PATH] [--per_flag N]

Writes `<RUN_DIR>/report.html` (local or gs://): the run's counts, a
per-class table and plots, the mean CAM of each class, and for each audit
flag a grid of its worst images with the CAM overlaid (the thumbnails of the
run's `exemplars/` table, chosen and drawn in the job); and, when the run
folder holds a comparison.json, what changed since the baseline run.

Everything is embedded (images as data: URIs, CSS and a few lines of
script inline) and a Content-Security-Policy forbids any fetch, so the file
opens offline and from a bucket. An inline script sets
`<body data-images-ok="true">` once every <img> has decoded, which the
headless-browser test reads.

Cost: independent of the number of images. It reads the manifest, the
class_stats table (one row per class) and the exemplars table (at most
`transforms.exemplars.PER_KIND` rows per flag and per shortcut class); it
never reads the heatmaps or the source shards. Only a run folder written
before the exemplars table existed has its flag totals counted from two
projected heatmap columns, in record batches (and shows no image grids).

Strategies (SpRAy clusters, one strip per class): `pipeline.report.strategies`.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from typing import Optional

from pipeline.formatting import class_name as _class_name
from pipeline.formatting import data_uri as _data_uri
from pipeline.formatting import esc as _esc
from pipeline.formatting import fmt as _fmt
from pipeline.report.figures import class_plots, deletion_curves_figure, mean_cam_figure
from pipeline.report.strategies import CSS as STRATEGY_CSS
from pipeline.report.strategies import strategies_section
from pipeline.runs.compare import COMPARISON_JSON
from pipeline.runs.manifest import iter_batches, load_manifest, read_json, read_table, table_files
from transforms.attention import BORDER_FRACTION
from transforms.errors import AuditError
from transforms.exemplars import FLAG_RANKING, PER_KIND, flag_kind, shortcut_kind
from transforms.flags import CELL_NAMES, DEFAULT_THRESHOLDS, FlagThresholds
from transforms.thumbnails import ALPHA, COLORMAP

_LOG = logging.getLogger(__name__)

REPORT_NAME = "report.html"
PER_FLAG = PER_KIND  # the most the exemplars table holds per kind
MAX_CLASS_MAPS = 24

# flag column -> title; worst first as ranked by transforms.exemplars.FLAG_RANKING
FLAG_TITLES = {
    "confident_wrong": "Confidently wrong",
    "low_confidence": "Low confidence",
    "attention_outside_box": "Attention outside the box",
    "attention_on_border": "Attention on the border",
}


def flag_rules(thresholds: FlagThresholds = DEFAULT_THRESHOLDS) -> dict[str, str]:
    """Flag column -> the rule that sets it, worded from the thresholds the run used (transforms.flags)."""
    t = thresholds
    flat = ("no more of its mass than a flat map would" if t.outside_box_concentration == 1
            else f"at most {t.outside_box_concentration:g} times the share of its mass a flat map would")
    return {
        "confident_wrong": f"wrong prediction with a score of at least {t.confident:g}",
        "low_confidence": ("no class gets half of the probability" if t.low_confidence == 0.5
                           else f"the top score is below {t.low_confidence:g}"),
        "attention_outside_box": (f"the CAM peak misses every box (by more than {t.pointing_tolerance_px:g} px) and "
                                  f"the boxes get {flat} (box_mass / box_area <= {t.outside_box_concentration:g})"),
        "attention_on_border": (f"at least {t.border_mass:.0%} of the CAM's mass in the outer "
                                f"{BORDER_FRACTION:.1%} band"),
    }


# -- image grids from the exemplars table -------------------------------------------------------


def exemplars_by_kind(run_dir: str) -> Optional[dict[str, list[dict]]]:
    """{kind: exemplar rows, worst first} of the run, or None when it has no exemplars table."""
    if not table_files(run_dir, "exemplars"):
        return None
    by_kind: dict[str, list[dict]] = {}
    for row in read_table(run_dir, "exemplars").to_pylist():  # a few rows per kind
        by_kind.setdefault(row["kind"], []).append(row)
    for rows in by_kind.values():
        rows.sort(key=lambda r: r["rank"])
    return by_kind


def flag_totals(run_dir: str) -> dict[str, int]:
    """Images (rank-0 rows) with each flag set, counted over projected columns in record batches."""
    import pyarrow.compute as pc

    totals = dict.fromkeys(FLAG_TITLES, 0)
    for batch in iter_batches(run_dir, "heatmaps", ["target_rank", *FLAG_TITLES]):
        first = pc.equal(batch.column("target_rank"), 0)
        for flag in FLAG_TITLES:
            totals[flag] += pc.sum(pc.and_(first, pc.fill_null(batch.column(flag), False))).as_py() or 0
    return totals


# -- the page -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin-bottom:4px}
.muted{color:#666;font-size:13px} .counts span{display:inline-block;margin-right:18px}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} tr.alert td{background:#fde8e8}
.grid{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;width:150px;font-size:11px}
figure img{display:block;border:1px solid #ccc} figcaption{word-break:break-all;line-height:1.3}
.bad{color:#b00020;font-weight:600} .ok{color:#0a7a2f;font-weight:600}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_SCRIPT = """
function markImages(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.every(function(i){return i.complete&&i.naturalWidth>0;});
document.body.setAttribute('data-images',String(imgs.length));
document.body.setAttribute('data-images-ok',ok?'true':'false');}
window.addEventListener('load',markImages);
"""


def faithfulness_section(manifest: dict, stats: list[dict], names: dict) -> str:
    """The report's "Can the maps be trusted?" section: mean gap, sanity check, deletion curves."""
    summary = manifest.get("faithfulness") or {}
    if not summary:
        return ""
    parts = ["<h2>Can the maps be trusted?</h2>"]
    if summary.get("mean_gap") is not None:
        low, high = summary["gap_ci95"]
        cls = "bad" if high <= 0 else ""
        parts.append(
            f"<p class='{cls}'>On {_esc(summary['rows'])} sampled images, removing the map's hottest region "
            f"lowers the target's score by <b>{summary['mean_gap']:+.3f}</b> more than removing a random region "
            f"of the same size (95% bootstrap interval {low:+.3f} to {high:+.3f}; positive on "
            f"{_fmt(summary.get('share_positive_gap'), '.0%')} of them).</p>"
        )
    sanity = summary.get("sanity") or {}
    if sanity.get("images"):
        corr = _fmt(sanity.get("correlation"))
        layers = ", ".join(sanity.get("layers") or []) or "none"
        if sanity.get("flagged"):
            parts.append(f"<p class=bad>Sanity check failed: with the head's weights randomised ({_esc(layers)}) "
                         f"the maps of {_esc(sanity['images'])} images still rank-correlate {corr} with the real "
                         f"ones (limit {_fmt(sanity.get('max_correlation'))}).</p>")
        else:
            parts.append(f"<p>Sanity check passed: with the head's weights randomised ({_esc(layers)}) the maps "
                         f"change (rank correlation {corr} over {_esc(sanity['images'])} images).</p>")
    figure = deletion_curves_figure(stats, names, summary.get("fractions") or [0.1, 0.2, 0.3, 0.5], MAX_CLASS_MAPS)
    if figure:
        parts.append("<p class=muted>Deletion curves: the drop of the target's score as a growing share of the "
                     "image is removed (filled in from the rest), hottest pixels first (MoRF), coldest first "
                     "(LeRF) or at random. A faithful map's MoRF curve rises fast above the random one and its "
                     "LeRF curve stays near 0.</p>"
                     f"<p><img alt='deletion curves' src='{figure}'></p>")
    return "\n".join(parts)


def _class_table(stats: list[dict], names: dict) -> str:
    """One row per class; a multi-label run's rows (class_stats with `recall`) also show support, recall and F1
    at the run's threshold (precision is there for both kinds)."""
    multilabel = any("recall" in s for s in stats)
    extra_head = "<th>support</th><th>recall</th><th>F1</th>" if multilabel else ""
    head = ("<tr><th class=l>class</th><th>images</th><th>accuracy</th><th>precision</th>" + extra_head +
            "<th>mean score</th><th>in-box mass</th><th>border mass</th><th>pointing game</th><th>flagged</th>"
            "<th class=l>peaks in one ninth</th><th>boxes there</th><th>shortcut score</th><th>shortcut?</th></tr>")
    body = []
    for s in stats:
        cell = s.get("peak_cell")
        where = "-" if cell is None else f"{CELL_NAMES[cell]} {_fmt(s.get('peak_cell_share'), '.0%')}"
        extra = (f"<td>{s.get('support')}</td><td class=recall>{_fmt(s.get('recall'))}</td>"
                 f"<td class=f1>{_fmt(s.get('f1'))}</td>") if multilabel else ""
        body.append(
            f"<tr class='{'alert' if s.get('shortcut') else ''}' data-class='{s['class_id']}'>"
            f"<td class=l>{_esc(_class_name(names, s['class_id']))}</td>"
            f"<td>{s['num_labelled']}</td><td>{_fmt(s['accuracy'])}</td><td class=precision>{_fmt(s['precision'])}</td>"
            f"{extra}<td>{_fmt(s['mean_predicted_score'])}</td><td>{_fmt(s['mean_box_mass'])}</td>"
            f"<td>{_fmt(s['mean_border_mass'])}</td><td>{_fmt(s['pointing_accuracy'])}</td>"
            f"<td>{_fmt(s.get('share_flagged'), '.0%')}</td><td class=l>{_esc(where)}</td>"
            f"<td>{_fmt(s.get('box_cell_share'), '.0%')}</td><td>{_fmt(s.get('shortcut_score'))}</td>"
            f"<td>{'<span class=bad>yes</span>' if s.get('shortcut') else 'no'}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _tile_grid(rows: list[dict], names: dict, extra: str) -> str:
    figures = []
    for r in rows:
        tile = r["thumbnail"]
        wrong = r["label"] is not None and r["label"] != r["predicted_class"]
        figures.append(
            f"<figure><img alt='{_esc(r['image_id'])}' src='{_data_uri(tile, 'image/jpeg')}'>"
            f"<figcaption><b>{_esc(r['image_id'])}</b><br>label {_esc(_class_name(names, r['label']))}<br>"
            f"<span class='{'bad' if wrong else ''}'>pred {_esc(_class_name(names, r['predicted_class']))}</span>"
            f" ({_fmt(r['predicted_score'])})<br>{_esc(extra.format(**r)) if extra else ''}</figcaption></figure>"
        )
    return f"<div class=grid>{''.join(figures)}</div>"


def _extra_caption(flag: str) -> str:
    sort_key = FLAG_RANKING[flag][0]
    return {"box_mass": "in-box {box_mass:.2f}",
            "box_concentration": "in-box {box_mass:.2f}, {box_concentration:.1f}x flat", "border_mass": "border {border_mass:.2f}"}.get(sort_key, "")


def _comparison_section(comparison: dict, names: dict, current_stats: list[dict]) -> str:
    b, c = comparison["baseline"], comparison["current"]
    verdict = ("<span class=bad>something was flagged</span>" if comparison["flagged"]
               else "<span class=ok>nothing flagged</span>")
    parts = [
        "<h2>Compared with the previous run</h2>",
        (
            f"<p>Baseline run <b>{_esc(b['run_id'])}</b> ({_esc(b['images_explained'])} images) vs this run "
            f"({_esc(c['images_explained'])} images); model "
            f"{'changed' if comparison['model_changed'] else 'unchanged'}: {verdict}.</p>"
        ),
    ]
    for reason in comparison.get("run_reasons", []):
        parts.append(f"<p class=bad>Run: {_esc(reason)}</p>")
    head = ("<tr><th class=l>class</th><th>images</th><th>accuracy</th><th>mean score</th><th>CAM correlation</th>"
            "<th>peak shift</th><th>border mass</th><th>in-box mass</th><th class=l>flagged because</th></tr>")
    body = []
    for row in comparison["classes"]:
        body.append(
            f"<tr class='{'alert' if row['flagged'] else ''}'><td class=l>"
            f"{_esc(_class_name(names, row['class_id']))}</td>"
            f"<td>{_esc(row['baseline_images'])} &rarr; {_esc(row['current_images'])}</td>"
            f"<td>{_fmt(row['baseline_accuracy'])} &rarr; {_fmt(row['current_accuracy'])}</td>"
            f"<td>{_fmt(row['mean_score_change'], '+.2f')}</td><td>{_fmt(row['cam_correlation'])}</td>"
            f"<td>{_fmt(row['peak_shift'])}</td><td>{_fmt(row['border_mass_change'], '+.2f')}</td>"
            f"<td>{_fmt(row['box_mass_change'], '+.2f')}</td>"
            f"<td class=l>{_esc('; '.join(row['reasons'])) or '-'}</td></tr>"
        )
    parts.append(f"<table>{head}{''.join(body)}</table>")
    flagged = set(comparison["flagged_classes"])
    if flagged:
        try:
            before = [s for s in read_table(b["run_dir"], "class_stats").to_pylist() if s["class_id"] in flagged]
            after = [s for s in current_stats if s["class_id"] in flagged]
            for title, rows in ((f"Baseline {b['run_id']}: mean CAM of the flagged classes", before),
                                ("This run: mean CAM of the flagged classes", after)):
                uri = mean_cam_figure(sorted(rows, key=lambda s: s["class_id"]), names, title)
                if uri:
                    parts.append(f"<p><img alt='{_esc(title)}' src='{uri}'></p>")
        except Exception as exc:  # noqa: BLE001 - the baseline may have moved; the table above stands alone
            parts.append(f"<p class=muted>(Baseline maps unavailable: {_esc(exc)})</p>")
    return "".join(parts)


def render_report(run_dir: str, manifest: dict, comparison: Optional[dict] = None, per_flag: int = PER_FLAG) -> str:
    """The HTML of the report of the run whose tables are in `run_dir`."""
    import pyarrow as pa

    stats = sorted(read_table(run_dir, "class_stats").to_pylist(), key=lambda s: s["class_id"])  # one row/class
    names = {s["class_id"]: s["class_name"] for s in stats if s["class_name"]}
    exemplars = exemplars_by_kind(run_dir)
    if exemplars is None:  # a run written before the exemplars table: totals only
        totals = flag_totals(run_dir)
    else:
        totals = {flag: (exemplars.get(flag_kind(flag)) or [{"kind_total": 0}])[0]["kind_total"]
                  for flag in FLAG_TITLES}
    has_exemplars, exemplars = exemplars is not None, exemplars or {}
    rules = flag_rules(FlagThresholds.from_options(manifest.get("options") or {}))  # the run's thresholds
    grids = [(flag, title, rules[flag], totals[flag], exemplars.get(flag_kind(flag), [])[:per_flag])
             for flag, title in FLAG_TITLES.items()]
    shortcut_grids = [(s, exemplars.get(shortcut_kind(s["class_id"]), [])[:per_flag])
                      for s in stats if s.get("shortcut") and s.get("peak_cell") is not None]

    counts = manifest.get("counts", {})
    attention = manifest.get("attention", {})
    model = manifest.get("model", {})
    options = manifest.get("options", {})
    rejected = counts.get("records_rejected") or {}
    title = f"Grad-CAM audit, run {manifest.get('run_id') or '-'}"
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
        f"<title>{_esc(title)}</title><style>{_CSS}{STRATEGY_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_esc(title)}</h1>",
        (
            f"<p class=muted>Finished {_esc(manifest.get('finished_at'))} &middot; model {_esc(model.get('uri'))} "
            f"({_esc(model.get('fingerprint'))}) &middot; layer {_esc(model.get('target_layer'))} &middot; "
            f"method {_esc(options.get('method'))}, target {_esc(options.get('target'))}</p>"
        ),
        (
            "<p class=counts>"
            f"<span><b>{_esc(counts.get('images_explained'))}</b> images explained</span>"
            f"<span><b>{_esc(counts.get('records_read'))}</b> records read</span>"
            f"<span><b>{sum(rejected.values())}</b> rejected "
            f"({_esc(', '.join(f'{k} {v}' for k, v in rejected.items() if v) or 'none')})</span>"
            f"<span><b>{_esc(counts.get('shard_errors'))}</b> shard errors</span>"
            f"<span>pointing game <b>{_fmt(attention.get('pointing_accuracy'), '.1%')}</b> "
            f"of {_esc(attention.get('pointing_images'))} boxed images</span></p>"
        ),
    ]
    shortcut = [s for s in stats if s.get("shortcut")]
    if shortcut:
        for s in shortcut:
            parts.append(
                f"<p class=bad>Possible shortcut: class {_esc(_class_name(names, s['class_id']))}: "
                f"{_fmt(s['peak_cell_share'], '.0%')} of its images peak in the {CELL_NAMES[s['peak_cell']]} ninth, "
                f"where {_fmt(s.get('box_cell_share'), '.0%')} of its objects are.</p>"
            )
    parts.append("<h2>Classes</h2>")
    parts.append(_class_table(stats, names))
    if stats:
        parts.append(f"<p><img alt='per-class plots' src='{class_plots(stats, names)}'></p>")
        shown = sorted(stats, key=lambda s: (not s.get("shortcut"), -(s.get("share_flagged") or 0)))[:MAX_CLASS_MAPS]
        maps = mean_cam_figure(sorted(shown, key=lambda s: s["class_id"]), names)
        if maps:
            more = f" (the {MAX_CLASS_MAPS} most flagged of {len(stats)})" if len(stats) > MAX_CLASS_MAPS else ""
            parts.append(f"<h2>Mean heatmap per class{more}</h2>"
                         "<p class=muted>Mean of each image's CAM divided by its maximum; lines cut the image in "
                         f"ninths.</p><p><img alt='mean heatmaps' src='{maps}'></p>")

    parts.append(strategies_section(run_dir, names, exemplars if has_exemplars else None))
    parts.append(faithfulness_section(manifest, stats, names))
    for s, chosen in shortcut_grids:
        parts.append(
            f"<h3 class=bad>Possible shortcut, class {_esc(_class_name(names, s['class_id']))}: images peaking in "
            f"the {CELL_NAMES[s['peak_cell']]} ninth</h3>"
        )
        parts.append(_tile_grid(chosen, names, ""))
    parts.append("<h2>Flagged images</h2><p class=muted>Worst first; white rectangles are the boxes; "
                 f"CAM in the '{COLORMAP}' colour map, opacity up to {ALPHA} where it is hottest.</p>")
    if not has_exemplars:
        parts.append("<p class=muted>This run folder has no exemplars table (runs written before it existed "
                     "have none): no image grids.</p>")
    for flag, title_, meaning, total, chosen in grids:
        parts.append(f"<h3>{_esc(title_)}: {total} image{'s' if total != 1 else ''}</h3>"
                     f"<p class=muted>{_esc(meaning)}</p>")
        if chosen:
            parts.append(_tile_grid(chosen, names, _extra_caption(flag)))
    if comparison:
        parts.append(_comparison_section(comparison, names, stats))
    parts.append(f"<p class=muted>Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
                 f"by pipeline.report.page (pyarrow {pa.__version__}).</p></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str, *, manifest: Optional[dict] = None, comparison: Optional[dict] = None,
                 out: Optional[str] = None, per_flag: int = PER_FLAG) -> str:
    """Renders the report of the run in `run_dir` and writes it; returns its path."""
    from apache_beam.io.filesystems import FileSystems

    run_dir = run_dir.rstrip("/")
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    if comparison is None:
        comparison = read_json(f"{run_dir}/{COMPARISON_JSON}")
    page = render_report(run_dir, manifest, comparison, per_flag)
    out = out or f"{run_dir}/{REPORT_NAME}"
    with FileSystems.create(out) as handle:
        handle.write(page.encode("utf-8"))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="A run folder (<output>/run=<id>, local or gs://)")
    parser.add_argument("--out", default=None, help="Where to write the HTML (default: <run_dir>/report.html)")
    parser.add_argument("--per_flag", type=int, default=PER_FLAG,
                        help=f"Images shown per flag (at most the {PER_KIND} per kind the job keeps)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_report(args.run_dir, out=args.out, per_flag=args.per_flag)
    except FileNotFoundError as exc:
        sys.stderr.write(f"error: expected a finished run folder with run_manifest.json, found none at {exc}\n")
        return 2
    except AuditError as exc:  # a run of a table schema version this release does not know
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
