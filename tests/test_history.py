"""Run history: run folders, the atomic swap, the runs index."""

import datetime
import json
import os

import pytest

from pipeline.options import parse_args
from pipeline.runs import history
from pipeline.runs.manifest import MANIFEST_NAME
from tests.audit_fixtures import RUN_IDS
from transforms.errors import AuditError


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def _fake_run(output, run_id, marker):
    folder = history.run_dir(str(output), run_id)
    _write(f"{folder}/heatmaps/part-0.parquet", marker)
    _write(f"{folder}/{MANIFEST_NAME}", json.dumps({"run_id": run_id, "output": folder, "counts": {}}))
    return folder


def test_default_run_id_is_the_utc_date():
    now = datetime.datetime(2026, 3, 4, 23, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))
    assert history.default_run_id(now) == "2026-03-05"
    assert len(history.default_run_id()) == 10


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "_tmp", "has space", "x" * 101])
def test_bad_run_ids_are_refused(bad, capsys):
    with pytest.raises(AuditError, match="--run_id"):
        history.check_run_id(bad)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--run_id", bad])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--run_id" in lines[0]


def test_swap_replaces_one_run_and_keeps_the_others(tmp_path):
    keep = _fake_run(tmp_path, "2026-01-01", "old-1")
    _fake_run(tmp_path, "2026-01-02", "old-2")
    _write(f"{history.run_dir(str(tmp_path), '2026-01-02')}/stale/only-in-old.txt")
    temp = history.temp_dir(str(tmp_path), "2026-01-02")
    assert os.path.basename(temp).startswith("_tmp-run=2026-01-02-")
    _write(f"{temp}/heatmaps/part-0.parquet", "new-2")
    history.swap_in(temp, history.run_dir(str(tmp_path), "2026-01-02"))
    assert not os.path.exists(temp)
    new = history.run_dir(str(tmp_path), "2026-01-02")
    assert open(f"{new}/heatmaps/part-0.parquet").read() == "new-2"
    assert not os.path.exists(f"{new}/stale")  # nothing of the old run survives
    assert open(f"{keep}/heatmaps/part-0.parquet").read() == "old-1"
    assert sorted(os.listdir(tmp_path)) == ["run=2026-01-01", "run=2026-01-02"]


def test_clear_temps_removes_only_that_runs_leftovers(tmp_path):
    for run_id in ("2026-01-01", "2026-01-02"):
        _write(f"{history.temp_dir(str(tmp_path), run_id)}/heatmaps/part-0.parquet")
    history.clear_temps(str(tmp_path), "2026-01-01")
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith("_tmp-run=2026-01-02-")


def test_index_heals_and_finds_the_previous_run(tmp_path):
    for run_id in ("2026-01-01", "2026-01-02", "2026-01-03"):
        _fake_run(tmp_path, run_id, run_id)
    entries = history.update_index(str(tmp_path))  # no index yet: built from the manifests
    assert [e["run_id"] for e in entries] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    history.delete_folder(history.run_dir(str(tmp_path), "2026-01-02"))
    entries = history.update_index(str(tmp_path))
    assert [e["run_id"] for e in entries] == ["2026-01-01", "2026-01-03"]
    previous = history.previous_run(str(tmp_path), "2026-01-03")
    assert previous["run_id"] == "2026-01-01" and previous["run_dir"] == history.run_dir(str(tmp_path), "2026-01-01")
    assert history.previous_run(str(tmp_path), "2026-01-01") is None
    assert history.previous_run(str(tmp_path / "nothing"), "2026-01-01") is None


def test_demo_runs_keep_history(demo_runs):
    assert sorted(os.listdir(demo_runs.output)) == [f"run={r}" for r in RUN_IDS] + ["runs.json"]
    index = json.load(open(os.path.join(demo_runs.output, "runs.json")))
    assert [r["run_id"] for r in index["runs"]] == list(RUN_IDS)
    fingerprints = [r["model_fingerprint"] for r in index["runs"]]
    assert fingerprints[0] == fingerprints[2] != fingerprints[1]
    for entry in index["runs"]:
        assert entry["job"] == {"runner": "FnApiRunner", "id": None, "url": None}  # in-process: no job id
        assert entry["images_explained"] == 400 and entry["records_read"] == 403 and entry["records_rejected"] == 3
        assert entry["started_at"] <= entry["finished_at"]
    assert [r["compared_with"] for r in index["runs"]] == [None, RUN_IDS[0], RUN_IDS[1]]
    for run_id in RUN_IDS:
        folder = demo_runs.run_dir(run_id)
        manifest = json.load(open(os.path.join(folder, MANIFEST_NAME)))
        assert manifest["run_id"] == run_id and manifest["output"] == folder == manifest["run_dir"]
        assert manifest["output_root"] == demo_runs.output
        assert manifest["job"] == {"runner": "FnApiRunner", "id": None, "url": None}
        assert manifest["tables"]["heatmaps"] == f"{folder}/heatmaps/"
        assert {"heatmaps", "class_stats", "errors", MANIFEST_NAME, "report.html"} <= set(os.listdir(folder))


@pytest.mark.cluster
def test_history_on_gcs(tmp_path, demo_runs):
    """The same mechanics through Beam's gcsio on gcp-storage-emulator (started and stopped by PID)."""
    from tests.infra.gcs_emulator import GcsEmulator

    with GcsEmulator("history-test", log_dir=str(tmp_path / "logs")) as gcs:
        output = gcs.uri("audits")
        for run_id in RUN_IDS[:2]:  # two real runs copied up
            local = demo_runs.run_dir(run_id)
            for root, _, files in os.walk(local):
                for name in files:
                    path = os.path.join(root, name)
                    gcs.upload_file(path, f"{history.run_dir(output, run_id)}/{os.path.relpath(path, local)}")
        entries = history.update_index(output)
        assert [e["run_id"] for e in entries] == list(RUN_IDS[:2])
        temp = history.temp_dir(output, RUN_IDS[1])
        gcs.write(f"{temp}/heatmaps/part-0.parquet", b"new")
        gcs.write(f"{temp}/{MANIFEST_NAME}", json.dumps({"run_id": RUN_IDS[1]}).encode())
        gcs.write(f"{history.temp_dir(output, RUN_IDS[1])}/stale.txt", b"crashed attempt")
        crashed = [u for u in gcs.list(output + "/") if "stale.txt" in u][0].rsplit("/", 1)[0]
        history.swap_in(temp, history.run_dir(output, RUN_IDS[1]))
        swapped = sorted(u for u in gcs.list(history.run_dir(output, RUN_IDS[1]) + "/"))
        assert swapped == [f"{history.run_dir(output, RUN_IDS[1])}/{n}" for n in ("heatmaps/part-0.parquet",
                                                                                  MANIFEST_NAME)]
        assert not [u for u in gcs.list(temp + "/")]
        history.clear_temps(output, RUN_IDS[1])
        assert not gcs.list(crashed + "/")
        assert history.previous_run(output, RUN_IDS[1])["run_dir"] == history.run_dir(output, RUN_IDS[0])
        # A comparison reads runs on gs:// and writes there too.
        from pipeline.runs import compare

        first = history.run_dir(output, RUN_IDS[0])
        assert compare.main(["--baseline", first, "--current", first, "--quiet"]) == 0
        assert gcs.read(f"{first}/{compare.COMPARISON_JSON}").startswith(b"{")
