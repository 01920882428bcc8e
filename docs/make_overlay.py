"""Makes docs/overlay.png (the README's picture) from a finished demo run.

    ./run_pipeline.sh && .venv/bin/python docs/make_overlay.py .demo/output/run=<id>

Top row: images of the shortcut class (triangle) with their Grad-CAM overlaid;
bottom row: the same for circles. Uses the job's own overlay code
(`transforms.thumbnails.overlay_tile`) on records read again at their offsets.
"""

import io
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.runs.manifest import read_table
from transforms.decode import _boxes
from transforms.records import read_records_at
from transforms.thumbnails import example_image, overlay_tile

TILE = 192
COLUMNS = ["source", "record_offset", "label", "predicted_class", "cam", "cam_height", "cam_width"]


def main(run_dir: str, out: str = "docs/overlay.png") -> None:
    table = read_table(run_dir, "heatmaps", COLUMNS)
    picked = []
    for label in (2, 0):  # triangle (marker), circle
        rows = table.filter((table["label"] == label) & (table["predicted_class"] == label)).slice(0, 4)
        picked.append(rows.to_pylist())
    sheet = Image.new("RGB", (4 * TILE + 5 * 6, 2 * TILE + 3 * 6), (255, 255, 255))
    for i, group in enumerate(picked):
        for j, r in enumerate(group):
            record = read_records_at(r["source"], [r["record_offset"]])[r["record_offset"]]
            boxes = _boxes(tf.train.Example.FromString(record).features.feature)
            cam = np.asarray(r["cam"], np.float32).reshape(r["cam_height"], r["cam_width"])
            tile = Image.open(io.BytesIO(overlay_tile(example_image(record, "image/encoded"), cam, boxes, size=TILE)))
            sheet.paste(tile, (6 + j * (TILE + 6), 6 + i * (TILE + 6)))
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
