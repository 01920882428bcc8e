"""Exemplars: Top.PerKey picks the worst of each kind, the table's schema, tiles, a report without shards."""

import io
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline.demo import make_example
from tests.helpers import parquet_schema, png_bytes, read_parquet_dir, write_shard
from transforms.decode import DecodedImage
from transforms.exemplars import (
    FLAG_RANKING,
    SelectAuditExemplars,
    SelectExemplars,
    audit_candidates,
    candidate_from_row,
    cell_kind,
    flag_kind,
    shortcut_kind,
)
from transforms.heatmap_rows import heatmap_rows
from transforms.model_handler import Explained
from transforms.schemas import EXEMPLAR_SCHEMA
from transforms.sinks import WriteParquetTable
from transforms.thumbnails import TILE, draw_boxes, jet, overlay

N_IMAGES = 48
PER_KIND = 3
SHORTCUT_CELL = 0  # the ninth class 1's peaks crowd into, as its class_stats say


def fake_explained(i: int) -> Explained:
    """An explained image with a 4x4 CAM; scores repeat so that ties occur (broken by image id)."""
    rng = np.random.default_rng(i)
    cam = rng.random((1, 4, 4)).astype(np.float32)
    if i % 4 == 0:
        cam[0, 0, 0] = 10.0  # peak in the top-left ninth, mass on the border
    boxes = ((0.0, 0.0, 0.5, 0.5),) if i % 2 else ()
    label = i % 3
    predicted = (i // 5) % 3
    score = [0.95, 0.3, 0.85, 0.45, 0.6][i % 5]
    image = DecodedImage(
        source="/gone/shard-0.tfrecord", record_index=i, image_id=f"im-{i:03d}", label=label, boxes=boxes,
        image_height=20, image_width=30, pixels=None,
        raw_record=make_example(png_bytes(20, 30, seed=i), label=label, image_id=f"im-{i:03d}", boxes=boxes),
    )
    return Explained(image, predicted, score, np.array([predicted]), np.array([score], np.float32),
                     np.array([1.0], np.float32), cam)


def rank0_rows():
    return [heatmap_rows(fake_explained(i), method="gradcam", target_layer="conv")[0] for i in range(N_IMAGES)]


def expected_kinds(rows, shortcut_class: int) -> dict:
    """kind -> (image ids worst first, total): an independent sort of every row (the old report's rule)."""
    out = {}
    for flag, (column, largest) in FLAG_RANKING.items():
        hits = [r for r in rows if r[flag] and r[column] is not None]
        hits.sort(key=lambda r: (-r[column] if largest else r[column], r["image_id"]))
        if hits:
            out[flag_kind(flag)] = ([r["image_id"] for r in hits[:PER_KIND]], len(hits))
    hits = [r for r in rows if r["predicted_class"] == shortcut_class and r["peak_cell"] == SHORTCUT_CELL]
    hits.sort(key=lambda r: (-r["predicted_score"], r["image_id"]))
    out[shortcut_kind(shortcut_class)] = ([r["image_id"] for r in hits[:PER_KIND]], len(hits))
    return out


def test_candidates_of_one_row():
    row = dict(rank0_rows()[0])
    row.update(confident_wrong=True, low_confidence=False, attention_outside_box=None, attention_on_border=True,
               predicted_score=0.9, border_mass=0.7, predicted_class=2, peak_cell=5)
    kinds = {kind: c.score for kind, c in audit_candidates(row, b"raw")}
    assert kinds == {flag_kind("confident_wrong"): pytest.approx(0.9), flag_kind("attention_on_border"):
                     pytest.approx(0.7), cell_kind(2, 5): pytest.approx(0.9)}
    row.update(low_confidence=True, predicted_score=0.3)
    assert {k: c.score for k, c in audit_candidates(row, b"raw")}[flag_kind("low_confidence")] == pytest.approx(-0.3)
    # The record's bytes travel with its candidates only when it cannot be read again at its offset.
    boxes = ((0.1, 0.2, 0.3, 0.4),)
    assert {(c.raw_record, c.boxes) for _, c in audit_candidates(row, b"raw", boxes)} == {(b"raw", boxes)}
    row["record_offset"] = 1234
    assert {(c.raw_record, c.boxes) for _, c in audit_candidates(row, b"raw", boxes)} == {(b"", ())}


def test_top_per_kind_picks_the_worst_of_each_kind(tmp_path):
    rows = rank0_rows()
    assert len({r["predicted_score"] for r in rows}) < len(rows)  # ties exist
    shortcut_class = 1
    want = expected_kinds(rows, shortcut_class)
    assert len(want) >= 4 and len(want[shortcut_kind(shortcut_class)][0]) > 0

    def check(got):
        by_kind = {}
        for r in got:
            by_kind.setdefault(r["kind"], []).append(r)
        assert set(by_kind) == set(want), sorted(by_kind)
        for kind, (ids, total) in want.items():
            chosen = sorted(by_kind[kind], key=lambda r: r["rank"])
            assert [r["image_id"] for r in chosen] == ids, kind
            assert [r["rank"] for r in chosen] == list(range(len(ids)))
            assert all(r["kind_total"] == total for r in chosen), kind
            assert all(r["thumbnail"][:2] == b"\xff\xd8" for r in chosen)  # JPEG
        pa.Table.from_pylist(got, schema=EXEMPLAR_SCHEMA)  # every row fits the schema

    stats = [{"class_id": 0, "shortcut": False, "peak_cell": 4},
             {"class_id": shortcut_class, "shortcut": True, "peak_cell": SHORTCUT_CELL},
             {"class_id": 2, "shortcut": False, "peak_cell": None}]
    with TestPipeline() as p:
        explained = p | "Images" >> beam.Create([fake_explained(i) for i in range(N_IMAGES)])
        class_stats = p | "Stats" >> beam.Create(stats)
        exemplars = (explained, class_stats) | SelectAuditExemplars(method="gradcam", target_layer="conv",
                                                                   per_kind=PER_KIND)
        assert_that(exemplars, check)
        exemplars | WriteParquetTable(str(tmp_path), "exemplars", EXEMPLAR_SCHEMA, run_id="r")
    assert parquet_schema(str(tmp_path / "exemplars")).equals(EXEMPLAR_SCHEMA)
    assert read_parquet_dir(str(tmp_path / "exemplars")).num_rows == sum(len(ids) for ids, _ in want.values())


@pytest.mark.parametrize("inputs", [1, 2, "pre-selected"])
def test_select_exemplars_takes_any_kind(inputs):
    """Another step's own kinds ("strategy:<class>:<cluster>") go through unchanged, no relabelling;
    with two candidate inputs sharing the kinds, the winners and kind_total are those of the union;
    a step that proposes only its best few of a kind (the first counting for those it left out,
    `Candidate.count`) gives the same winners and totals."""
    rows = rank0_rows()[:10]
    pairs = [(f"strategy:0:{i % 2}", candidate_from_row(r, float(i), b"not an example")) for i, r in enumerate(rows)]
    if inputs == "pre-selected":  # the 2 best of each kind; the best counts for the other 3
        pairs = [(kind, c._replace(count=4 if c.score >= 8 else 1)) for kind, c in pairs if c.score >= 6]

    def check(got):
        ids = {(r["kind"], r["rank"]): r["image_id"] for r in got}
        assert ids == {("strategy:0:0", 0): "im-008", ("strategy:0:0", 1): "im-006",
                       ("strategy:0:1", 0): "im-009", ("strategy:0:1", 1): "im-007"}
        assert {r["kind_total"] for r in got} == {5}

    with TestPipeline() as p:
        if inputs != 2:
            candidates = p | beam.Create(pairs)
        else:
            candidates = (p | "First" >> beam.Create(pairs[:5]), p | "Second" >> beam.Create(pairs[5:]))
        assert_that(candidates | SelectExemplars(per_kind=2), check)


def test_a_winner_without_bytes_is_read_again_at_its_offset(tmp_path):
    """A strategy candidate carries no record: its tile is drawn from the record read at its
    record_offset, with the boxes the record holds, the same tile as from the bytes. A record that
    cannot be read again (no offset, shard gone) leaves the map alone on the tile, not a failed job."""
    from transforms.exemplars import DrawThumbnails
    from transforms.records import ReadShardRecords
    from transforms.thumbnails import overlay_tile

    explained = [fake_explained(i) for i in (1, 2, 3)]  # image 1 and 3 have a box
    path = write_shard(str(tmp_path), "s.tfrecord", [e.image.raw_record for e in explained])
    records = list(ReadShardRecords().process(path))
    draw = DrawThumbnails("image/encoded")
    draw.setup()
    try:
        for e, record in zip(explained, records, strict=True):
            row = heatmap_rows(e, method="gradcam", target_layer="conv")[0]
            row.update(source=path, record_offset=record.offset)
            with_bytes = candidate_from_row(row, 1.0, e.image.raw_record, e.image.boxes)
            without = candidate_from_row(row, 1.0, b"")
            assert without.raw_record == b"" and without.boxes == ()
            assert draw._tile(without) == draw._tile(with_bytes)
        cam_alone = overlay_tile(None, np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"]))
        os.remove(path)
        assert draw._tile(candidate_from_row(row, 1.0, b"")) == cam_alone != draw._tile(with_bytes)
        row["record_offset"] = None
        assert draw._tile(candidate_from_row(row, 1.0, b"")) == cam_alone
    finally:
        draw.teardown()


def test_jet_matches_matplotlib():
    import matplotlib

    x = np.arange(256) / 255  # matplotlib tabulates 256 entries at i / 255 (and looks up int(x * 256))
    np.testing.assert_allclose(jet(x), matplotlib.colormaps["jet"](x)[:, :3], atol=1e-6)


def test_overlay_tile():
    image = np.zeros((60, 120, 3), np.uint8)
    image[..., 2] = 200  # blue
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0  # hot top-left corner only
    tile = overlay(image, cam, [(0.5, 0.5, 1.0, 1.0)])
    assert tile.shape == (TILE // 2, TILE, 3)
    hot, cold = tile[2, 2].astype(int), tile[30, 40].astype(int)
    # Hottest point: (1 - 0.6) * image + 0.6 * jet(1) = 0.4 * (0, 0, 200) + 0.6 * (127.5, 0, 0).
    np.testing.assert_allclose(hot, [0.6 * 127.5, 0, 0.4 * 200], atol=12)
    np.testing.assert_array_equal(cold, [0, 0, 200])
    assert (tile[TILE // 4, TILE // 2 + 5] == 255).all() and (tile[-1, TILE - 1] == 255).all()  # box outline
    drawn = draw_boxes(np.zeros((10, 10, 3), np.uint8), [(0.0, 0.0, 1.0, 1.0)], width=1)
    assert drawn[:, 0].min() == 255 and drawn[5, 5].max() == 0


def test_the_report_draws_tiles_from_exemplars_without_the_shards(model_path, tmp_path):
    """A real run; the shard is deleted before the report renders every tile from exemplars/."""
    from PIL import Image

    from pipeline.graph import run
    from pipeline.report.page import render_report
    from pipeline.report.strategies import TILES_PER_STRATEGY
    from pipeline.runs.manifest import read_table
    from tests.helpers import SIZE

    records = [make_example(png_bytes(SIZE, SIZE, seed=i), label=i % 3, image_id=f"x-{i}",
                            boxes=[(0.1, 0.1, 0.6, 0.7)]) for i in range(12)]
    shard = write_shard(str(tmp_path), "only.tfrecord", records)
    _, manifest = run(["--input", shard, "--model", model_path, "--output", str(tmp_path / "out"),
                       "--batch_size", "4", "--run_id", "t"])
    run_dir = manifest["output"]
    exemplars = read_table(run_dir, "exemplars")
    assert exemplars.schema.equals(EXEMPLAR_SCHEMA)
    assert exemplars.num_rows > 0 and set(exemplars.column("source").to_pylist()) == {shard}
    heat = read_table(run_dir, "heatmaps").to_pylist()
    for r in exemplars.to_pylist():  # each exemplar is the image's own row, and its tile is an image
        same = next(h for h in heat if h["image_id"] == r["image_id"])
        assert r["cam"] == same["cam"] and r["predicted_score"] == same["predicted_score"]
        assert max(Image.open(io.BytesIO(r["thumbnail"])).size) == TILE
    os.remove(shard)
    page = render_report(run_dir, manifest)
    # Every flag/shortcut exemplar (8 per kind at most) is a grid tile; a strategy strip
    # shows the TILES_PER_STRATEGY closest to its cluster's mean.
    shown = [r for r in exemplars.to_pylist()
             if r["rank"] < (TILES_PER_STRATEGY if r["kind"].startswith("strategy:") else 8)]
    assert any(r["kind"].startswith("strategy:") for r in shown)
    assert page.count("src='data:image/jpeg;base64,") == len(shown)
    for r in shown:
        assert r["image_id"] in page
