"""The visual report: self-contained HTML, tiles from the exemplars table, loads in a real browser."""

import html
import os
import re

import pytest

from pipeline.demo import SHORTCUT_CLASS, make_example
from pipeline.graph import run
from pipeline.report.page import flag_rules
from pipeline.report.page import main as report_main
from pipeline.runs.manifest import read_table
from tests.audit_fixtures import RUN_IDS
from tests.browser import dump_dom, find_browser, screenshot
from tests.helpers import SIZE, png_bytes, write_shard


def _html(demo_runs, run_id):
    return open(os.path.join(demo_runs.run_dir(run_id), "report.html"), encoding="utf-8").read()


def test_report_is_self_contained(demo_runs):
    for run_id in RUN_IDS:
        page = _html(demo_runs, run_id)
        refs = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]+)""", page)
        assert refs and all(ref.startswith("data:image/") for ref in refs), run_id
        assert "http://" not in page and "https://" not in page and "@import" not in page
        assert "Content-Security-Policy" in page
        assert len(page) < 1_500_000


def test_report_shows_the_shortcut_and_the_comparison(demo_runs):
    first = _html(demo_runs, RUN_IDS[0])
    assert f"Possible shortcut: class {SHORTCUT_CLASS} triangle" in first
    assert "Compared with the previous run" not in first
    for title in ("Confidently wrong", "Low confidence", "Attention outside the box", "Attention on the border"):
        assert title in first
    second = _html(demo_runs, RUN_IDS[1])
    assert "Compared with the previous run" in second and "something was flagged" in second
    assert "Possible shortcut" not in second
    assert "pointing game" in second


def test_tiles_are_the_exemplars_thumbnails(demo_runs):
    """The grids come from the run's exemplars table (drawn in the job), not from the shards."""
    import base64

    from pipeline.report.strategies import TILES_PER_STRATEGY

    run_dir = demo_runs.run_dir(RUN_IDS[0])
    page = _html(demo_runs, RUN_IDS[0])
    exemplars = read_table(run_dir, "exemplars").to_pylist()
    kinds = {r["kind"] for r in exemplars}
    assert f"shortcut:{SHORTCUT_CLASS}" in kinds and any(k.startswith("flag:") for k in kinds)
    assert not any(k.startswith("cell:") for k in kinds)  # per-ninth candidates never reach the table
    assert any(k.startswith("strategy:") for k in kinds)  # the strips' tiles, chosen in the job too
    # A strategy strip shows the TILES_PER_STRATEGY images closest to its cluster's mean.
    shown = [r for r in exemplars if not r["kind"].startswith("strategy:") or r["rank"] < TILES_PER_STRATEGY]
    for r in shown:
        assert base64.b64encode(r["thumbnail"]).decode("ascii") in page, (r["kind"], r["rank"])
    assert page.count("src='data:image/jpeg;base64,") == len(shown)


def test_report_command_rewrites_a_report(demo_runs, tmp_path, capsys):
    out = str(tmp_path / "again.html")
    assert report_main([demo_runs.run_dir(RUN_IDS[1]), "--out", out, "--per_flag", "3"]) == 0
    page = open(out, encoding="utf-8").read()
    assert "Compared with the previous run" in page  # read back from comparison.json
    assert report_main([str(tmp_path / "run=nothing")]) == 2
    assert "run_manifest.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser():
    found = find_browser(install=True)
    if not found:
        pytest.fail("no Chromium: run scripts/install_chromium.sh (apt-get install chromium) or set CHROMIUM")
    return found


@pytest.mark.parametrize("run_id", [RUN_IDS[0], RUN_IDS[2]])
def test_report_loads_in_a_headless_browser(demo_runs, browser, run_id):
    path = os.path.join(demo_runs.run_dir(run_id), "report.html")
    proc = dump_dom(browser, path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:500]
    expected = len(re.findall(r"<img\b", open(path, encoding="utf-8").read()))
    assert f'data-images="{expected}"' in body.group(0) and expected >= 10
    assert 'data-images-ok="true"' in body.group(0), "an <img> did not decode"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script error, no blocked fetch


def test_report_screenshot(demo_runs, browser, tmp_path):
    """A screenshot of the top of the page; GRADCAM_AUDIT_UPDATE_DOCS=1 also saves docs/report.png."""
    from PIL import Image

    path = os.path.join(demo_runs.run_dir(RUN_IDS[2]), "report.html")
    png = str(tmp_path / "report.png")
    screenshot(browser, path, png)
    image = Image.open(png)
    assert image.size == (900, 1125)
    assert len(image.convert("RGB").getcolors(1 << 16) or []) > 20  # not a blank page
    if os.environ.get("GRADCAM_AUDIT_UPDATE_DOCS") == "1":
        import shutil

        from tests.browser import REPO

        shutil.copy(png, os.path.join(REPO, "docs", "report.png"))


def test_report_shows_the_strategy_strips(demo_runs):
    """One strip per class; the moving-marker class's corner strategies framed as suspicious, with tiles."""
    from pipeline.demo import MOVING_SHORTCUT_CLASS, SHORTCUT_CLASS

    page = _html(demo_runs, RUN_IDS[0])
    assert "<h2 id=strategies>Strategies per class</h2>" in page
    clusters = read_table(demo_runs.run_dir(RUN_IDS[0]), "clusters").to_pylist()
    for c in clusters:
        css = "strategy suspicious" if c["suspicious"] else "strategy"
        assert f"<div class='{css}' data-class='{c['class_id']}' data-cluster='{c['cluster_id']}'>" in page
    suspicious = set(re.findall(r"<div class='strategy suspicious' data-class='(\d+)'", page))
    # The moving marker's corner strategies; the fixed marker's one strategy may be framed too (its peaks miss
    # its boxes as well); never a clean class.
    assert str(MOVING_SHORTCUT_CLASS) in suspicious <= {str(MOVING_SHORTCUT_CLASS), str(SHORTCUT_CLASS)}
    # Each panel: its mean map and up to 3 exemplar tiles (titles are the exemplar ids).
    first = next(c for c in clusters if c["class_id"] == MOVING_SHORTCUT_CLASS)
    for image_id in first["exemplar_ids"][:3]:
        assert f"title='{image_id}'" in page


def test_default_rule_texts():
    rules = flag_rules()
    assert rules["confident_wrong"] == "wrong prediction with a score of at least 0.8"
    assert rules["attention_outside_box"] == (
        "the CAM peak misses every box (by more than 15 px) and the boxes get no more of its mass than a flat map "
        "would (box_mass / box_area <= 1)")
    assert rules["attention_on_border"] == "at least 60% of the CAM's mass in the outer 12.5% band"


def test_rule_texts_are_the_runs_thresholds(model_path, tmp_path):
    """`python -m pipeline --pointing_tolerance 30 --outside_box_concentration 0.8`: the report says 30 px, 0.8."""
    records = [make_example(png_bytes(SIZE, SIZE, seed=i), label=i % 3, image_id=f"x-{i}",
                            boxes=[(0.1, 0.1, 0.6, 0.7)]) for i in range(6)]
    shard = write_shard(str(tmp_path), "only.tfrecord", records)
    _, manifest = run(["--input", shard, "--model", model_path, "--output", str(tmp_path / "out"), "--run_id", "t",
                       "--batch_size", "4", "--faithfulness_sample", "0", "--sanity_images", "0", "--quiet",
                       "--pointing_tolerance", "30", "--outside_box_concentration", "0.8"])
    assert manifest["options"]["pointing_tolerance"] == 30 and manifest["options"]["outside_box_concentration"] == 0.8
    page = html.unescape(open(manifest["report"], encoding="utf-8").read())
    assert ("the CAM peak misses every box (by more than 30 px) and the boxes get at most 0.8 times the share of its "
            "mass a flat map would (box_mass / box_area <= 0.8)") in page
    assert "15 px" not in page and "box_area <= 1)" not in page
