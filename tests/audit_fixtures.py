"""Session fixture: three nightly runs of the demo into one output.

    run=2026-01-01  the demo model (learnt the marker of class 2 "triangle")
    run=2026-01-02  the control model (markers on every class alike), --compare_with_previous=true
    run=2026-01-03  the demo model again, --compare_with_previous --flagged_exit_code=75

The audited shards are the same demo shards every time (class 2 carries its
marker), so only the model changes. Costs two trainings (the demo's, 8
epochs, ~25-80 s on 2 idle cores; the control's, 12) and three runs
(~12 s each). Registered in tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

RUN_IDS = ("2026-01-01", "2026-01-02", "2026-01-03")


@dataclasses.dataclass
class DemoRuns:
    root: str
    output: str
    demo: object
    plain_model: str  # trained without the shortcut
    manifests: dict  # run id -> manifest returned by run()
    exit_codes: dict  # run id -> exit status of the main command

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.output, f"run={run_id}")


def audit_cli(args: list[str]) -> tuple[int, dict]:
    """The main command in-process: (exit status, manifest of the run)."""
    from pipeline import cli, graph

    captured = {}
    original = graph.run

    def recording_run(argv=None, test_pipeline=None):
        result, manifest = original(argv, test_pipeline)
        captured["manifest"] = manifest
        return result, manifest

    graph.run = recording_run
    try:
        cli.main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        graph.run = original
    return code, captured.get("manifest")


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> DemoRuns:
    from pipeline.demo import ensure_demo, train_control_model

    root = str(tmp_path_factory.mktemp("audit_demo"))
    demo = ensure_demo(os.path.join(root, "demo"))
    plain = os.path.join(root, "plain", "demo_cnn.keras")
    train_control_model(plain)  # the same markers on every class alike: it learns to look past them
    output = os.path.join(root, "out")
    common = ["--input", demo.input_pattern, "--class_names", demo.class_names_path, "--output", output, "--quiet"]
    manifests, codes = {}, {}
    for run_id, model, extra in (
        (RUN_IDS[0], demo.model_path, []),
        (RUN_IDS[1], plain, ["--compare_with_previous=true"]),  # as schedulers and templates pass booleans
        (RUN_IDS[2], demo.model_path, ["--compare_with_previous", "--flagged_exit_code=75"]),
    ):
        codes[run_id], manifests[run_id] = audit_cli([*common, "--model", model, "--run_id", run_id, *extra])
    return DemoRuns(root, output, demo, plain, manifests, codes)
