"""The Flex Template (issue 22, item 3): metadata.json in sync with every option, the launcher image
built FROM the worker image with nothing of a run frozen in it, the Cloud Scheduler launch body, the
run id and `{run_id}` in --input resolved at launch, classic templates refused in one line."""

from __future__ import annotations

import json
import os
import re

import pytest

from pipeline import flex_template
from pipeline.options import FLEX_TEMPLATE_ENV, build_parser, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEX = os.path.join(REPO, "templates", "flex")


def read(*parts) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as handle:
        return handle.read()


def test_metadata_is_in_sync_with_every_option(capsys):
    assert read("templates", "flex", "metadata.json") == flex_template.render(), (
        "templates/flex/metadata.json is stale: python -m pipeline.flex_template > templates/flex/metadata.json")
    assert flex_template.main(["--check", os.path.join(FLEX, "metadata.json")]) == 0
    metadata = json.loads(read("templates", "flex", "metadata.json"))
    names = {p["name"] for p in metadata["parameters"]}
    options = {s[2:] for a in build_parser()._actions for s in a.option_strings  # noqa: SLF001
               if s.startswith("--") and a.dest not in flex_template.SKIPPED}
    assert names == {s for s in options if s in names} and len(names) == len(metadata["parameters"])
    for action in build_parser()._actions:  # noqa: SLF001 - every option, under its first long name
        if action.dest in flex_template.SKIPPED:
            continue
        assert next(s for s in action.option_strings if s.startswith("--"))[2:] in names, action.option_strings
    for param in metadata["parameters"]:
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", param["name"]) and param["helpText"], param
    by_name = {p["name"]: p for p in metadata["parameters"]}
    assert "(default: true)" in by_name["wait"]["helpText"] and by_name["wait"]["regexes"]
    assert "{run_id}" in by_name["input"]["helpText"]


def test_a_stale_metadata_file_is_reported(tmp_path, capsys):
    stale = tmp_path / "metadata.json"
    stale.write_text(flex_template.render().replace('"wait"', '"wait_old"'))
    assert flex_template.main(["--check", str(stale)]) == 1
    assert "out of sync" in capsys.readouterr().err


def test_scheduler_body_uses_only_template_parameters_and_resolves_the_run_at_launch(monkeypatch):
    body = json.loads(read("templates", "flex", "scheduler_launch.json"))["launchParameter"]
    names = {p["name"] for p in json.loads(read("templates", "flex", "metadata.json"))["parameters"]}
    assert set(body["parameters"]) <= names, set(body["parameters"]) - names
    assert "run_id" not in body["parameters"]  # the launch date (UTC) of each night
    assert body["parameters"]["wait"] == "false"  # the launcher submits; the job finalises its run
    monkeypatch.setenv(FLEX_TEMPLATE_ENV, "/opt/gradcam-audit/flex_launch.py")  # in the launcher: Dataflow
    config, beam_args = parse_args([f"--{k}={v}" for k, v in body["parameters"].items()])
    assert config.compare_with_previous and not config.wait and config.run_id is None
    assert beam_args[0] == "--runner=DataflowRunner" and any("worker_accelerator" in a for a in beam_args)


def test_launcher_image_is_the_worker_image_with_nothing_of_a_run_frozen():
    dockerfile = read("templates", "flex", "Dockerfile")
    stages = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert stages[-1] == "${WORKER_IMAGE}"  # same Python, Beam and packages as the workers
    assert "python_template_launcher" in dockerfile
    main = re.search(rf"{FLEX_TEMPLATE_ENV}=(\S+)", dockerfile).group(1)
    assert "COPY templates/flex/launch.py " + main in dockerfile
    for frozen in ("run_id", "date", "--input", "RUN python -m pipeline"):
        assert not re.search(rf"^(ENV|ARG|RUN)\b.*{re.escape(frozen)}", dockerfile, re.M), frozen
    assert "from pipeline.cli import main" in read("templates", "flex", "launch.py")
    worker = read("Dockerfile")
    assert "pip install -c /opt/beam-constraints.txt \".[hub]\"" in worker and "COPY setup.py ./" in worker
    assert "import apache_beam, tensorflow, keras_hub, pipeline.graph" in worker  # the image build checks it


def test_classic_templates_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from pipeline import cli

    monkeypatch.delenv(FLEX_TEMPLATE_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--input", str(tmp_path / "none-*"), "--model", "resnet50", "--output", str(tmp_path / "out"),
                  "--runner=dataflow", "--project=p", "--region=r", "--temp_location=gs://b/t",
                  f"--template_location={tmp_path / 't.json'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "Flex Template" in err and "--dry_run" in err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "t.json")


def test_in_the_flex_launcher_the_default_runner_is_dataflow(monkeypatch):
    monkeypatch.setenv(FLEX_TEMPLATE_ENV, "/opt/gradcam-audit/flex_launch.py")
    _, beam_args = parse_args(["--input", "x", "--model", "y", "--output", "gs://b/o", "--project=p"])
    assert beam_args[0] == "--runner=DataflowRunner"
    monkeypatch.delenv(FLEX_TEMPLATE_ENV)
    _, beam_args = parse_args(["--input", "x", "--model", "y", "--output", "o"])
    assert beam_args[0] == "--runner=FnApiRunner"


def test_run_id_and_input_are_resolved_when_the_job_starts(dataset, model_path, tmp_path, monkeypatch):
    from pipeline import graph
    from pipeline.runs import history

    folder = os.path.dirname(dataset["pattern"])
    dated = tmp_path / "dt=2031-05-05"
    os.symlink(folder, dated)
    argv = ["--input", str(tmp_path / "dt={run_id}" / os.path.basename(dataset["pattern"])), "--model", model_path,
            "--output", str(tmp_path / "out")]
    config, _ = parse_args(argv)
    assert config.run_id is None and "{run_id}" in config.input  # nothing decided by parsing (or a build)
    monkeypatch.setattr(history, "default_run_id", lambda now=None: "2031-05-05")  # the launch date
    files, _, _ = graph.prepare(config)
    assert config.run_id == "2031-05-05" and config.input.startswith(str(dated))
    assert files and all(f.startswith(str(dated)) for f in files)
