"""Makes docs/overlay.png (the README's picture) from a finished demo run.

    ./run_pipeline.sh && .venv/bin/python docs/make_overlay.py .demo/output/run=<id>

Top row: images of the shortcut class (triangle) with their Grad-CAM overlaid;
bottom row: the same for circles. Uses the report's own overlay code.
"""

import io
import sys

import numpy as np
from PIL import Image

from pipeline.manifest import read_table
from pipeline.report import overlay_tile, parse_example, read_records

TILE = 192


def main(run_dir: str, out: str = "docs/overlay.png") -> None:
    rows = read_table(run_dir, "heatmaps").to_pylist()
    picked = []
    for label in (2, 0):  # triangle (marker), circle
        picked.append([r for r in rows if r["label"] == label == r["predicted_class"]][:4])
    wanted = {}
    for r in sum(picked, []):
        wanted.setdefault(r["source"], set()).add(r["record_index"])
    records = read_records(wanted)
    sheet = Image.new("RGB", (4 * TILE + 5 * 6, 2 * TILE + 3 * 6), (255, 255, 255))
    for i, group in enumerate(picked):
        for j, r in enumerate(group):
            image, boxes = parse_example(records[(r["source"], r["record_index"])], "image/encoded")
            cam = np.asarray(r["cam"], np.float32).reshape(r["cam_height"], r["cam_width"])
            tile = Image.open(io.BytesIO(overlay_tile(image, cam, boxes, size=TILE)))
            sheet.paste(tile, (6 + j * (TILE + 6), 6 + i * (TILE + 6)))
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
