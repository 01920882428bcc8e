"""Reading an audit's tables back (local or gs://) and comparing two runs row for row.

Tables are found through the returned manifest (`manifest["tables"]`), so
the tests do not depend on the output layout.
"""

from __future__ import annotations

import os

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.runs.manifest import read_table

AUDIT_ARGS = ("--batch_size", "4", "--max_image_pixels", "1000000")

_LOCAL_RUNS: dict = {}


def audit(dataset_pattern: str, model: str, output: str, *extra: str) -> dict:
    """Runs the audit (pipeline.graph.run) and returns its manifest."""
    from pipeline.graph import run

    _, manifest = run(["--input", dataset_pattern, "--model", model, "--output", str(output), *AUDIT_ARGS, *extra])
    return manifest


def local_audit(dataset: dict, model_path: str, tmp_path_factory) -> dict:
    """The in-process (FnApiRunner) run every other runner is compared with; once per session."""
    key = (dataset["pattern"], model_path)
    if key not in _LOCAL_RUNS:
        _LOCAL_RUNS[key] = audit(dataset["pattern"], model_path, str(tmp_path_factory.mktemp("local-baseline")))
    return _LOCAL_RUNS[key]


def table_dir(manifest: dict, table: str) -> str:
    return manifest["tables"][table].rstrip("/")


def table_files(manifest: dict, table: str) -> list:
    return sorted(m.path for m in FileSystems.match([f"{table_dir(manifest, table)}/*"])[0].metadata_list)


def read_rows(manifest: dict, table: str) -> list:
    """Every row of one table of a run, as dicts (read through Beam's FileSystems)."""
    return read_table(manifest["output"], table).to_pylist()


def heatmap_key(row: dict) -> tuple:
    return row["image_id"], row["target_rank"]


def error_key(row: dict) -> tuple:
    return (os.path.basename(row["source"] or ""), row["record_index"] if row["record_index"] is not None else -1,
            row["stage"], row["error"], row["image_id"] or "")


def assert_same_results(expected: dict, actual: dict) -> None:
    """Same heatmap rows (ids, classes, CAMs within tolerance), same errors, same counts."""
    want = sorted(read_rows(expected, "heatmaps"), key=heatmap_key)
    got = sorted(read_rows(actual, "heatmaps"), key=heatmap_key)
    assert [heatmap_key(r) for r in got] == [heatmap_key(r) for r in want]
    for a, b in zip(want, got, strict=True):
        for column in ("record_index", "predicted_class", "target_class", "label", "cam_height", "cam_width", "num_boxes"):
            assert a[column] == b[column], (a["image_id"], column, a[column], b[column])
        np.testing.assert_allclose(b["predicted_score"], a["predicted_score"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["cam"], a["cam"], rtol=1e-4, atol=1e-5 * max(a["cam_max"], 1e-6),
                                   err_msg=a["image_id"])
    assert sorted(map(error_key, read_rows(actual, "errors"))) == sorted(map(error_key, read_rows(expected, "errors")))
    stats_key = lambda r: r["class_id"]  # noqa: E731
    want_stats = sorted(read_rows(expected, "class_stats"), key=stats_key)
    got_stats = sorted(read_rows(actual, "class_stats"), key=stats_key)
    assert [(s["class_id"], s["num_predicted"], s["num_labelled"], s["num_correct"]) for s in got_stats] == \
        [(s["class_id"], s["num_predicted"], s["num_labelled"], s["num_correct"]) for s in want_stats]
    assert actual["counts"] == expected["counts"]
    assert actual["model"]["fingerprint"] == expected["model"]["fingerprint"]
