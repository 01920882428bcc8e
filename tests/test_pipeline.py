"""The whole job on the DirectRunner engine: outputs, accounting, schemas, modes."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.graph import run
from tests.conftest import BAD_RECORDS
from tests.helpers import parquet_schema, read_parquet_dir
from transforms.schemas import CLASS_STATS_SCHEMA, CLUSTER_SCHEMA, ERROR_SCHEMA, HEATMAP_SCHEMA

RUN = "run=test"  # each run writes under <output>/run=<run_id>/ (pipeline/runs/history.py)


def run_audit(dataset, model_path, output, *extra):
    _, manifest = run(["--input", dataset["pattern"], "--model", model_path, "--output", str(output),
                       "--batch_size", "4", "--max_image_pixels", "1000000", "--run_id", "test", *extra])
    assert manifest["output"] == str(output / RUN)
    return manifest


@pytest.fixture(scope="module")
def audited(dataset, model_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    return output / RUN, run_audit(dataset, model_path, output)


def test_every_record_is_explained_or_rejected(audited, dataset):
    output, manifest = audited
    counts = manifest["counts"]
    assert counts["images_explained"] == dataset["good"]
    assert counts["records_rejected"] == {"decode": dataset["bad"], "compute": 0}
    assert counts["records_read"] == dataset["records"]
    assert counts["records_read_by_runner"] == dataset["records"] and counts["balanced"]
    assert counts["shard_errors"] == dataset["shard_errors"]
    errors = read_parquet_dir(str(output / "errors")).to_pylist()
    assert len(errors) == dataset["bad"] + dataset["shard_errors"]
    kinds = {e["image_id"]: e["error"] for e in errors if e["image_id"]}
    assert {k: kinds[k] for k in BAD_RECORDS} == BAD_RECORDS
    read_errors = sorted((os.path.basename(e["source"]), e["error"], e["record_index"])
                         for e in errors if e["stage"] == "read")
    assert read_errors == [("data-00002.tfrecord", "CorruptRecord", 2), ("data-00003.tfrecord", "CorruptRecord", 3),
                           ("data-00004.tfrecord", "EmptyShard", None)]
    assert all(e["raw_record"] is not None and e["message"] for e in errors)
    assert sum(1 for e in errors if e["error"] == "InvalidExample") == 1


def test_heatmap_rows(audited, dataset):
    output, manifest = audited
    table = read_parquet_dir(str(output / "heatmaps"))
    rows = table.to_pylist()
    assert len(rows) == dataset["good"]
    ids = {r["image_id"] for r in rows}
    assert {"grey-png", "rgba-png", "rgb-jpeg", "a-0", "c-1", "c-3", "d-2"} <= ids and "c-2" not in ids
    for r in rows:
        cam = np.asarray(r["cam"])
        assert cam.shape == (r["cam_height"] * r["cam_width"],) == (64,)
        assert (cam >= 0).all() and r["cam_max"] == pytest.approx(cam.max())
        assert 0 < r["predicted_score"] <= 1 and r["target_class"] == r["predicted_class"]
        assert r["method"] == "gradcam" and r["target_layer"] == "last_conv"
    boxed = [r for r in rows if r["num_boxes"]]
    assert boxed and all(r["box_mass"] is None or 0 <= r["box_mass"] <= 1 for r in boxed)
    assert manifest["model"]["target_layer"] == "last_conv"
    assert manifest["model"]["fingerprint"].startswith("sha256:")


def test_schemas_are_exactly_the_declared_ones(audited):
    output, _ = audited
    assert parquet_schema(str(output / "heatmaps")).equals(HEATMAP_SCHEMA)
    assert parquet_schema(str(output / "class_stats")).equals(CLASS_STATS_SCHEMA)
    assert parquet_schema(str(output / "errors")).equals(ERROR_SCHEMA)
    assert parquet_schema(str(output / "clusters")).equals(CLUSTER_SCHEMA)


def test_class_stats_match_the_heatmaps(audited):
    output, _ = audited
    rows = read_parquet_dir(str(output / "heatmaps")).to_pylist()
    stats = {s["class_id"]: s for s in read_parquet_dir(str(output / "class_stats")).to_pylist()}
    for cls, s in stats.items():
        assert s["num_predicted"] == sum(r["predicted_class"] == cls for r in rows)
        assert s["num_labelled"] == sum(r["label"] == cls for r in rows)
        assert s["num_correct"] == sum(r["label"] == cls == r["predicted_class"] for r in rows)


def test_manifest_on_disk(audited):
    output, manifest = audited
    on_disk = json.loads((output / "run_manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]
    assert {"apache_beam", "tensorflow", "keras", "pyarrow"} <= set(on_disk["versions"])
    assert on_disk["timings"]["pipeline_seconds"] > 0
    assert on_disk["job"] == manifest["job"] == {"runner": "FnApiRunner", "id": None, "url": None}


def test_topk_writes_k_rows_per_image(dataset, model_path, tmp_path):
    manifest = run_audit(dataset, model_path, tmp_path, "--target", "topk:2", "--method", "layercam")
    rows = read_parquet_dir(str(tmp_path / RUN / "heatmaps")).to_pylist()
    assert len(rows) == 2 * dataset["good"] and manifest["counts"]["images_explained"] == dataset["good"]
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_rows in by_image.values():
        ranks = sorted(image_rows, key=lambda r: r["target_rank"])
        assert [r["target_rank"] for r in ranks] == [0, 1]
        assert ranks[0]["target_class"] == ranks[0]["predicted_class"] != ranks[1]["target_class"]
        assert ranks[0]["target_score"] >= ranks[1]["target_score"]


def test_multi_process_run_gives_the_same_rows(audited, dataset, model_path, tmp_path):
    output, _ = audited
    run_audit(dataset, model_path, tmp_path, "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    key = lambda r: r["image_id"]  # noqa: E731
    single = sorted(read_parquet_dir(str(output / "heatmaps")).to_pylist(), key=key)
    multi = sorted(read_parquet_dir(str(tmp_path / RUN / "heatmaps")).to_pylist(), key=key)
    assert [r["image_id"] for r in multi] == [r["image_id"] for r in single]
    for a, b in zip(single, multi, strict=True):
        assert a["predicted_class"] == b["predicted_class"] and a["target_class"] == b["target_class"]
        np.testing.assert_allclose(a["cam"], b["cam"], rtol=1e-4, atol=1e-5 * max(a["cam_max"], 1e-6))
    assert len(read_parquet_dir(str(tmp_path / RUN / "errors"))) == dataset["bad"] + dataset["shard_errors"]


def test_fanned_out_records_give_the_same_rows(audited, dataset, model_path, tmp_path):
    output, first = audited
    assert first["options"]["reshuffle_records"] == "off"  # auto on the in-process runner
    manifest = run_audit(dataset, model_path, tmp_path, "--reshuffle_records", "on")
    assert manifest["options"]["reshuffle_records"] == "on" and manifest["counts"] == first["counts"]
    key = lambda r: (r["image_id"], r["target_rank"])  # noqa: E731
    plain = sorted(read_parquet_dir(str(output / "heatmaps")).to_pylist(), key=key)
    fanned = sorted(read_parquet_dir(str(tmp_path / RUN / "heatmaps")).to_pylist(), key=key)
    assert [key(r) for r in fanned] == [key(r) for r in plain]
    for a, b in zip(plain, fanned, strict=True):
        assert (a["source"], a["record_index"], a["predicted_class"]) == (b["source"], b["record_index"],
                                                                          b["predicted_class"])
        np.testing.assert_allclose(a["cam"], b["cam"], rtol=1e-4, atol=1e-5 * max(a["cam_max"], 1e-6))


def test_rerun_into_the_same_output_replaces_it(audited, dataset, model_path, tmp_path):
    # The first run: a copy of the module's run (same options), so only the re-run costs a job.
    shutil.copytree(audited[0].parent, tmp_path, dirs_exist_ok=True)
    assert len(read_parquet_dir(str(tmp_path / RUN / "heatmaps"))) == dataset["good"]
    run_audit(dataset, model_path, tmp_path, "--batch_size", "7")
    assert len(read_parquet_dir(str(tmp_path / RUN / "heatmaps"))) == dataset["good"]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=300, env=env)


BAD_OPTIONS = [
    (["--target", "top3"], "--target: expected predicted | label | class:N | topk:K"),
    (["--method", "cam"], "invalid choice"),
    (["--batch_size", "0"], "expected a whole number >= 1"),
    (["--input", "x*.tfrecord"], "give both --input and --model"),
]


@pytest.fixture(scope="module")
def cli_runs(model_path, tmp_path_factory):
    """The command-line checks of this file, each a fresh process (~3.5 s, mostly start-up on one core),
    started together when the first of them needs its result; `cli_runs(key)` waits for one."""
    empty = tmp_path_factory.mktemp("no-shards")
    commands = {tuple(args): args for args, _ in BAD_OPTIONS}
    commands["glob"] = ["--input", str(empty / "none-*.tfrecord"), "--model", model_path, "--output", str(empty)]
    commands["help"] = ["--help"]
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {key: pool.submit(cli, *args) for key, args in commands.items()}
        yield lambda key: futures[key].result(timeout=330)


@pytest.mark.parametrize(("args", "expected"), BAD_OPTIONS)
def test_bad_option_values_exit_2_with_one_line(cli_runs, args, expected):
    proc = cli_runs(tuple(args))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_glob_matching_nothing_is_a_clear_error(cli_runs):
    proc = cli_runs("glob")
    assert proc.returncode == 2
    assert "matches no file" in proc.stderr.strip().splitlines()[-1]


def test_unsafe_model_needs_opt_in(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Conv2D(2, 3, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    from transforms.errors import AuditError
    from transforms.model_loading import load_keras_model

    with pytest.raises(AuditError, match="--unsafe_model"):
        load_keras_model(path)
    assert load_keras_model(path, safe_mode=False).name == model.name


def test_help_lists_every_option_with_defaults(cli_runs):
    proc = cli_runs("help")
    assert proc.returncode == 0
    for option in ("--input", "--output", "--model", "--weights", "--target_layer", "--target", "--method",
                   "--image_key", "--label_key", "--id_key", "--label_offset", "--class_names",
                   "--preprocess", "--batch_size", "--max_image_pixels", "--unsafe_model"):
        assert option in proc.stdout
    assert "(default: gradcam)" in proc.stdout and "(default: 32)" in proc.stdout
