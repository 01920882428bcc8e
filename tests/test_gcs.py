"""gs:// everywhere, on gcp-storage-emulator: input shards, model and output on a bucket.

The emulator runs as a subprocess on 127.0.0.1 (stopped by PID, also on
failure); Beam's credential lookup is pre-seeded so no process waits ~25 s
for google.auth.default. The results must equal an in-process local run.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.infra.audit_results import assert_same_results, audit, local_audit, read_rows, table_files
from tests.infra.gcs_emulator import GcsEmulator
from tests.infra.servers import ListenerWatch

pytestmark = pytest.mark.cluster  # starts the GCS emulator (as the other gs:// tests marked cluster do)

BUCKET = "audit-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    emulator = GcsEmulator(BUCKET, log_dir=str(tmp_path_factory.mktemp("gcs-logs")))
    with emulator, ListenerWatch(emulator.server) as watch:
        yield emulator
        assert watch.non_loopback() == [], f"listening beyond loopback: {watch.non_loopback()}"
    assert emulator.server.leftovers() == []


@pytest.fixture(scope="module")
def gs_inputs(gcs, dataset, model_path):
    shards = gcs.upload_glob(dataset["pattern"], gcs.uri("data"))
    assert len(shards) == 5
    return {"pattern": gcs.uri("data", "data-*.tfrecord"), "model": gcs.upload_file(model_path, gcs.uri("models", "small.keras"))}


@pytest.fixture(scope="module")
def baseline(dataset, model_path, tmp_path_factory):
    return local_audit(dataset, model_path, tmp_path_factory)


@pytest.fixture(scope="module")
def gs_run(gcs, gs_inputs):
    started = time.monotonic()
    manifest = audit(gs_inputs["pattern"], gs_inputs["model"], gcs.uri("audits", "small"))
    return manifest, time.monotonic() - started


def test_gs_input_model_and_output_give_the_local_results(gs_run, baseline, dataset, gcs):
    manifest, seconds = gs_run
    assert manifest["output"].startswith(gcs.uri("audits", "small"))
    assert all(t.startswith("gs://") for t in manifest["tables"].values())
    assert_same_results(baseline, manifest)
    assert manifest["counts"]["images_explained"] == dataset["good"]
    assert manifest["counts"]["balanced"]
    assert all(r["source"].startswith(gcs.uri("data") + "/") for r in read_rows(manifest, "heatmaps"))
    on_bucket = json.loads(gcs.read(f"{manifest['output']}/run_manifest.json"))
    assert on_bucket["counts"] == manifest["counts"] and on_bucket["shards"] == manifest["shards"]
    assert seconds < 60, f"the gs:// run took {seconds:.0f} s: is Beam waiting for credentials?"


def test_rerun_into_the_same_gs_output_replaces_it(gs_run, gs_inputs, gcs, dataset):
    first, _ = gs_run
    root = gcs.uri("audits", "small")
    # Stale files a re-run must not leave behind: extra parts in two tables.
    part = table_files(first, "heatmaps")[0]
    stale = [f"{first['tables']['heatmaps'].rstrip('/')}/part-99999-of-99999.parquet",
             f"{first['tables']['errors'].rstrip('/')}/part-99999-of-99999.parquet"]
    for uri in stale:
        gcs.write(uri, gcs.read(part))
    second = audit(gs_inputs["pattern"], gs_inputs["model"], root, "--batch_size", "7")
    after = gcs.list(root)
    assert not set(stale) & set(after)
    assert not [u for u in after if "beam-temp" in u or "/_tmp" in u], after
    assert second["output"] == first["output"]
    assert len(read_rows(second, "heatmaps")) == dataset["good"]
    assert_same_results(first, second)


@pytest.mark.cluster  # a second full run in a fresh process (~25-30 s)
def test_cli_in_a_new_process_reads_and_writes_gs(gs_inputs, gcs, tmp_path):
    """A fresh process: the sitecustomize pre-seed (tests/infra/gcs_site) must spare it the auth retries."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--input", gs_inputs["pattern"], "--model", gs_inputs["model"],
         "--output", gcs.uri("audits", "cli"), "--batch_size", "8", "--max_image_pixels", "1000000", "--quiet"],
        capture_output=True, text=True, timeout=240, env=gcs.subprocess_env(),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unable to find default credentials" not in proc.stderr
    manifests = [u for u in gcs.list(gcs.uri("audits", "cli")) if u.endswith("/run_manifest.json")]
    assert len(manifests) == 1
    assert json.loads(gcs.read(manifests[0]))["counts"]["balanced"]
    assert seconds < 90, f"the CLI took {seconds:.0f} s"


def test_tf_keras2_saved_model_folder_from_gs(gcs, tmp_path):
    """A SavedModel folder on gs:// is copied locally through Beam's filesystems and loaded with tf_keras."""
    import numpy as np

    from tests.test_models import tf_keras_small_nested
    from transforms.model_loading import load_keras_model, model_fingerprint

    model, _ = tf_keras_small_nested()
    local = str(tmp_path / "savedmodel")
    model.save(local, save_format="tf")
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            gcs.upload_file(path, gcs.uri("models", "savedmodel", *os.path.relpath(path, local).split(os.sep)))
    uri = gcs.uri("models", "savedmodel")
    loaded = load_keras_model(uri)
    assert type(loaded).__module__.startswith("tf_keras")
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-6)
    assert model_fingerprint(uri, None) == model_fingerprint(local, None)
