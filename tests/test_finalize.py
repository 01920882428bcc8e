"""The job finalises its own run (pipeline/finalize.py), and `python -m pipeline.finalize` redoes it.

Three DirectRunner-engine (FnApiRunner) jobs of the same run id into three outputs, all with
--wait=false (in-process, the job still runs to its end inside run()):

  normal   first a job that fails while writing a table: nothing is left (no run folder, no runs.json,
           no temp folder); then the same id again, which the job's own last stage finalises.
  skipped  the last stage stops after noting its settings (GRADCAM_AUDIT_FINALIZE_FAULT=skip): the tables
           stay in the temp folder; `python -m pipeline.finalize` (a subprocess) finishes the run.
  midway   the last stage fails after the report, before the move (=after_report): the job fails, the
           launcher keeps the complete tables; pipeline.finalize finishes the run, twice (idempotent).

Each repaired output must hold the same files as the normal one, with the same manifest except timings
(and the attempt's id and clock times) and the same runs.json entry.
"""

import json
import os
import subprocess
import sys

import pytest

from pipeline import finalize
from pipeline.graph import run
from pipeline.runs import history
from tests.audit_fixtures import audit_cli

RUN_ID = "2026-02-01"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCKS = ("timings", "started_at", "finished_at", "attempt")


def argv(dataset, model_path, output, *extra):
    return ["--input", dataset["pattern"], "--model", model_path, "--output", str(output), "--run_id", RUN_ID,
            "--batch_size", "4", "--max_image_pixels", "1000000", "--quiet", "--wait=false", *extra]


def files_under(output) -> list:
    return sorted(os.path.relpath(os.path.join(root, name), output)
                  for root, _, names in os.walk(output) for name in names)


def load(output, path, root):
    """A JSON file of `output`, with `output` itself written as `root` (outputs differ only by where)."""
    with open(os.path.join(output, path)) as handle:
        return json.loads(handle.read().replace(str(output), str(root)))


def without(value: dict, keys) -> dict:
    return {k: v for k, v in value.items() if k not in keys}


def assert_same_run(repaired, normal):
    assert files_under(repaired) == files_under(normal)
    manifest_path = f"run={RUN_ID}/run_manifest.json"
    got, want = load(repaired, manifest_path, normal), load(normal, manifest_path, normal)
    assert without(got, CLOCKS) == without(want, CLOCKS)
    assert set(got["timings"]) == set(want["timings"])
    got_index, want_index = load(repaired, "runs.json", normal)["runs"], load(normal, "runs.json", normal)["runs"]
    assert [without(e, ("started_at", "finished_at")) for e in got_index] == [
        without(e, ("started_at", "finished_at")) for e in want_index]


@pytest.fixture(scope="module")
def normal(dataset, model_path, tmp_path_factory):
    from transforms import sinks

    output = tmp_path_factory.mktemp("normal")

    def full_disk(self, batch):
        raise OSError("No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sinks._GatherTables, "process", full_disk)  # the heatmaps' writer fails mid-job
        with pytest.raises(Exception, match="No space left"):
            run(argv(dataset, model_path, output))
    crashed = files_under(output)
    code, submitted = audit_cli(argv(dataset, model_path, output))  # the same id again, --wait=false
    return output, crashed, code, submitted


def test_a_crash_before_finalising_leaves_nothing_and_the_id_runs_again(normal, dataset):
    output, crashed, code, submitted = normal
    assert crashed == []  # no run=<id>/, no runs.json, no temp folder
    assert code == 0 and submitted["submitted"] and submitted["job"] == {"runner": "FnApiRunner", "id": None,
                                                                         "url": None}
    final = history.run_dir(str(output), RUN_ID)
    assert sorted(os.listdir(output)) == [f"run={RUN_ID}", "runs.json"]
    assert {"heatmaps", "class_stats", "clusters", "errors", "exemplars", "run_manifest.json", "report.html",
            finalize.SUCCESS_NAME, finalize.SETTINGS_NAME} <= set(os.listdir(final))
    manifest = json.load(open(os.path.join(final, "run_manifest.json")))
    counts = manifest["counts"]
    assert counts["records_read"] == dataset["records"] == counts["records_read_by_runner"] and counts["balanced"]
    assert counts["images_explained"] + sum(counts["records_rejected"].values()) == counts["records_read"]
    assert manifest["report"] == f"{final}/report.html" and manifest["job"]["runner"] == "FnApiRunner"
    assert manifest["options"]["wait"] is False and manifest["timings"]["pipeline_seconds"] > 0
    (entry,) = json.load(open(os.path.join(output, "runs.json")))["runs"]
    assert entry["run_id"] == RUN_ID and entry["records_read"] == dataset["records"]


def test_a_skipped_last_stage_is_finished_by_the_command(normal, dataset, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv(finalize.FAULT_ENV, "skip")
    run(argv(dataset, model_path, tmp_path))
    monkeypatch.delenv(finalize.FAULT_ENV)
    (temp,) = os.listdir(tmp_path)  # no run folder, no runs.json: only the complete tables
    assert temp.startswith(f"_tmp-run={RUN_ID}-")
    attempt = json.load(open(tmp_path / temp / finalize.SETTINGS_NAME))["attempt"]
    with pytest.raises(finalize.RunNotFinalised, match="python -m pipeline.finalize"):
        finalize.read_finalised(str(tmp_path), RUN_ID, attempt)  # what a waiting launcher says (exit 3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pipeline.finalize", "--output", str(tmp_path), "--run_id", RUN_ID,
                           "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path, normal[0])
    assert finalize.read_finalised(str(tmp_path), RUN_ID, attempt)["attempt"] == attempt


def test_a_last_stage_failing_midway_is_finished_by_the_command_idempotently(normal, dataset, model_path,
                                                                             tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(finalize.FAULT_ENV, "after_report")
    with pytest.raises(Exception, match="after_report"):
        run(argv(dataset, model_path, tmp_path))
    monkeypatch.delenv(finalize.FAULT_ENV)
    (temp,) = os.listdir(tmp_path)  # the job failed in its last stage: the tables are kept, nothing is in place
    assert {"run_manifest.json", "report.html", finalize.SETTINGS_NAME} <= set(os.listdir(tmp_path / temp))
    assert finalize.SUCCESS_NAME not in os.listdir(tmp_path / temp)
    assert finalize.main(["--output", str(tmp_path), "--run_id", RUN_ID, "--quiet"]) == 0
    assert_same_run(tmp_path, normal[0])
    first = load(tmp_path, f"run={RUN_ID}/run_manifest.json", tmp_path)
    assert finalize.main(["--output", str(tmp_path), "--run_id", RUN_ID, "--quiet"]) == 0  # again, in place
    assert_same_run(tmp_path, normal[0])
    assert without(load(tmp_path, f"run={RUN_ID}/run_manifest.json", tmp_path), CLOCKS) == without(first, CLOCKS)
    capsys.readouterr()
    assert finalize.main(["--output", str(tmp_path), "--run_id", "2026-02-02"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run 2026-02-02 to finalise")
