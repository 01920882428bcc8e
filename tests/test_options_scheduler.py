"""Options as schedulers and templates pass them: booleans with =true/=false, --flagged_exit_code, the job id.

The end-to-end checks ride on existing runs: the demo history (tests/audit_fixtures.py) passes
`--compare_with_previous=true` and `--flagged_exit_code=75` (tests/test_compare.py,
tests/test_history.py), tests/test_pipeline.py and tests/test_console.py check the job field and line.
"""

import argparse
import logging
import os
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.argtypes import BooleanAction, flag_value, parse_bool
from pipeline.console import wants_verbose
from pipeline.options import build_parser, parse_args
from pipeline.runners import job_identity, log_job
from pipeline.runs import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOLEANS = ("compare_with_previous", "quiet", "jit_compile", "check_moves_inside_boxes", "verbose")


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize(("args", "expected"), [
    ([], False), (["--{}"], True), (["--{}=true"], True), (["--{}=false"], False), (["--{}=TRUE"], True),
    (["--{}=False"], False), (["--{}=1"], True), (["--{}=0"], False), (["--{}=yes"], True), (["--{}", "no"], False),
])
def test_booleans_take_the_bare_flag_true_and_false(name, args, expected):
    config, beam_args = parse_args([a.format(name) for a in args])
    assert config.as_json()[name] is expected
    assert beam_args == ["--runner=FnApiRunner"]  # nothing leaks to Beam


@pytest.mark.parametrize(("args", "report"), [
    ([], True), (["--report"], True), (["--report=false"], False), (["--no_report"], False),
    (["--no_report=true"], False), (["--no_report=false"], True), (["--report=false", "--report=true"], True),
])
def test_report_and_its_negative_spelling(args, report):
    assert parse_args(args)[0].report is report


def test_every_boolean_option_takes_a_value():
    """No store_true/store_false left in either parser (--help and --help_beam only print and exit)."""
    for parser in (build_parser(), compare.build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                assert action.dest == "help_beam", action.option_strings
            if isinstance(action.default, bool) and action.dest != "help_beam":
                assert isinstance(action, BooleanAction), action.option_strings


@pytest.mark.parametrize("argv", [["--compare_with_previous=maybe"], ["--quiet=2"], ["--no_report=yes please"],
                                  ["--flagged_exit_code=256"], ["--flagged_exit_code=-1"], ["--flagged_exit_code=x"]])
def test_bad_values_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {argv[0].split('=')[0]}: expected ")


def test_bad_value_from_the_command_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--compare_with_previous=maybe"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: argument --compare_with_previous: expected true or false, got 'maybe' (see --help)"]


def test_compare_command_booleans(capsys):
    args = compare.build_parser().parse_args(["--baseline", "a", "--current", "b", "--no_write=true", "--quiet=false",
                                              "--check_moves_inside_boxes", "--flagged_exit_code", "0"])
    assert args.no_write and not args.quiet and args.check_moves_inside_boxes and args.flagged_exit_code == 0
    assert compare.thresholds_from(args).check_moves_inside_boxes
    with pytest.raises(SystemExit) as info:
        compare.main(["--baseline", "a", "--current", "b", "--no_write=maybe"])
    assert info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_parse_bool_and_the_raw_argv_reading():
    assert [parse_bool(v) for v in ("true", "On", "YES", "1", "false", "off", "No", "0")] == [True] * 4 + [False] * 4
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        parse_bool("maybe")
    assert [wants_verbose(a) for a in (["--verbose"], ["--verbose=true"], ["--verbose", "--quiet"],
                                       ["--verbose", "false"], ["--verbose=false"], ["--verbose=maybe"], [])] == [
        True, True, True, False, False, False, False]
    assert flag_value(["--quiet=false", "--quiet"], "--quiet") is True  # the last one wins, as in argparse


def test_flagged_exit_code_defaults_to_1():
    assert parse_args([])[0].flagged_exit_code == 1
    assert parse_args(["--flagged_exit_code=0"])[0].flagged_exit_code == 0
    assert parse_args(["--flagged_exit_code", "255"])[0].flagged_exit_code == 255
    assert compare.exit_code({"flagged": True}) == 1
    assert compare.exit_code({"flagged": True}, 75) == 75 and compare.exit_code({"flagged": False}, 75) == 0


@pytest.mark.parametrize(("comparison", "status", "stderr"), [
    ({"flagged": True, "exit_code": 0}, 0, ""),  # --flagged_exit_code=0: flagged, and exit 0
    ({"flagged": True, "exit_code": 2}, 2, ""),  # a status of the user's choosing, not "could not compare"
    ({"flagged": None, "exit_code": 2, "message": "no table"}, 2, "error: no table\n"),
    ({"flagged": False, "exit_code": 0}, 0, ""),
])
def test_the_command_exits_with_the_comparisons_status(monkeypatch, capsys, comparison, status, stderr):
    from pipeline import graph

    manifest = {"options": {"quiet": True}, "counts": {}, "comparison": comparison}
    monkeypatch.setattr(graph, "run", lambda argv: (None, manifest))
    code = 0
    try:
        cli._main([])
    except SystemExit as exc:
        code = exc.code
    assert code == status and capsys.readouterr().err == stderr


class _DataflowResult:
    class _Options:
        def view_as(self, cls):
            return argparse.Namespace(project="my-project", region="europe-west4")

    _options = _Options()

    def job_id(self):
        return "2026-01-02_01_02_03-123"


def test_job_identity_per_runner(caplog):
    dataflow = job_identity(_DataflowResult(), ["--runner=DataflowRunner", "--project=other"])
    assert dataflow == {"runner": "DataflowRunner", "id": "2026-01-02_01_02_03-123",
                        "url": "https://console.cloud.google.com/dataflow/jobs/europe-west4/2026-01-02_01_02_03-123"
                               "?project=my-project"}
    portable = argparse.Namespace(_job_id="BeamApp-root-0102-a1b2_7d3e")  # Beam's portable PipelineResult
    assert job_identity(portable, ["--runner=PortableRunner", "--job_endpoint=localhost:8099"]) == {
        "runner": "PortableRunner", "id": "BeamApp-root-0102-a1b2_7d3e", "url": None}
    from apache_beam.runners.portability.fn_api_runner.fn_runner import RunnerResult

    local = job_identity(RunnerResult("DONE", {}), ["--runner=FnApiRunner"])
    assert local == {"runner": "FnApiRunner", "id": None, "url": None}
    logger = logging.getLogger("pipeline.graph")
    with caplog.at_level(logging.INFO, logger="pipeline.graph"):
        log_job(dataflow, logger)
        log_job(local, logger)
    assert caplog.messages == ["DataflowRunner: Created job with id: [2026-01-02_01_02_03-123]",
                               f"Console URL: {dataflow['url']}",
                               "FnApiRunner: the job runs in this process (no job id)"]


def test_demo_history_passes_true_and_flagged_exit_code(demo_runs):
    """The demo history (tests/audit_fixtures.py): run 2 with --compare_with_previous=true, run 3 with the bare
    flag and --flagged_exit_code=75; both comparisons flag the changed model."""
    from tests.audit_fixtures import RUN_IDS

    second, third = (demo_runs.manifests[r] for r in RUN_IDS[1:])
    assert second["options"]["compare_with_previous"] is True and second["options"]["flagged_exit_code"] == 1
    assert second["comparison"]["flagged"] and second["comparison"]["exit_code"] == demo_runs.exit_codes[RUN_IDS[1]] == 1
    assert third["options"]["flagged_exit_code"] == 75
    assert third["comparison"]["flagged"] and third["comparison"]["exit_code"] == demo_runs.exit_codes[RUN_IDS[2]] == 75
