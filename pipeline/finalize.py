"""The run's last stage: the job finishes its own run, on any runner, with or without a launcher that waits.

In the job (`FinalizeRun`, the graph's last step): one element (`beam.Create([None])`) goes through a
DoFn whose side inputs are the files every table's write produced (and the job's own count of the
records read), so it runs once every write has finished, on any runner. It then, in order:

    <temp>/_finalize.json   what it needs to redo all this (plain settings: output, run id, options as
                            JSON, the model, the shards), written first
    <temp>/run_manifest.json  counts read back from the tables (they must add up), the job's identity
    <temp>/comparison.{json,parquet}  with --compare_with_previous: against the run before it in runs.json
    <temp>/report.html      unless --report=false
    <temp>/_SUCCESS         the run is complete
    <temp> -> run=<id>/     `pipeline.runs.history.swap_in`
    runs.json               the run's entry (`pipeline.runs.history.update_index`)

where <temp> is the run's `_tmp-run=<id>-<random>` folder. Everything here is importable on a worker:
no launcher state, only the settings (a JSON string) given when the graph was built.

A launcher that waits (`python -m pipeline`, the default) only reads what the job wrote: the manifest
of `run=<id>/` (it checks that the manifest is its own attempt's), prints the summary and turns it into
the exit status. With `--wait=false` it submits and exits 0; the job completes the run on its own.

    python -m pipeline.finalize --output OUT --run_id ID [--quiet]

redoes the finalisation from the tables: of the newest `_tmp-run=<ID>-*` folder whose tables were all
written (it holds `_finalize.json`: the stage started) when one is there, e.g. when the last stage
failed or the job died in it, else of `run=<ID>/` itself, in place. Idempotent: running it again gives
the same files (only the timestamps of the manifest, runs.json and report move).
Exit status as `python -m pipeline`: 0 done, 1 (or --flagged_exit_code) flagged, 2 nothing to finalise.

Job identity: the stage reads `<temp>/_job.json`, which a launcher writes as soon as the runner gives
it the job id (Flink, Dataflow); without it (no launcher, or one killed before), on Dataflow it asks
the worker's metadata server for the job id; otherwise the id stays None.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import types
from typing import Optional

import apache_beam as beam

_LOG = logging.getLogger(__name__)

SETTINGS_NAME = "_finalize.json"
JOB_NAME = "_job.json"
SUCCESS_NAME = "_SUCCESS"
# Tests only: "skip" makes the stage stop right after writing _finalize.json (the job succeeds, the
# run stays in its temp folder); "after_report" makes it raise after the report, before the move.
FAULT_ENV = "GRADCAM_AUDIT_FINALIZE_FAULT"


class FinalizeError(Exception):
    """There is nothing (or not enough) to finalise."""


class RunNotFinalised(Exception):
    """The job ended but its run is not in place (the last stage did not run, or failed)."""


def _fault(point: str) -> bool:
    return os.environ.get(FAULT_ENV, "") == point


# --- the settings: what the stage needs, as plain JSON values -------------------------------------------


def launch_settings(config, info, files: list, beam_args: list, *, work_dir: str, started_at: str,
                    started: float, attempt: str) -> dict:
    """The plain settings of one attempt at a run (what `finalize_run` needs), built by the launcher."""
    from pipeline.runners import runner_of

    now = time.time()
    return {
        "output": config.output,
        "run_id": config.run_id,
        "work_dir": work_dir,
        "attempt": attempt,
        "started_at": started_at,
        "launched_at": now,
        "startup_seconds": round(now - started, 3),
        "runner": runner_of(beam_args),
        "beam_args": list(beam_args),
        "shards": list(files),
        "model": {"uri": config.model, "fingerprint": info.fingerprint, **info.as_json()},
        "options": config.as_json(),
    }


def _options(settings: dict) -> types.SimpleNamespace:
    """The run's options as attributes (what `pipeline.runs.compare.thresholds_from` and friends read)."""
    return types.SimpleNamespace(**settings["options"])


# --- the job's identity -----------------------------------------------------------------------------------


def _dataflow_job_id() -> Optional[str]:
    """The Dataflow job id from a worker VM's metadata server (attribute job_id), or None elsewhere."""
    import urllib.request

    request = urllib.request.Request(
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/job_id",
        headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - a fixed http URL
            return response.read().decode("utf-8").strip() or None
    except (OSError, ValueError):
        return None


def job_of(settings: dict, folder: str) -> dict:
    """{"runner", "id", "url"} of the job that made the run (see the module docstring)."""
    from pipeline.runners import canonical_runner, job_identity
    from pipeline.runs.manifest import read_json

    recorded = read_json(f"{folder}/{JOB_NAME}")
    if recorded:
        return recorded
    runner = settings.get("runner")
    job_id = _dataflow_job_id() if canonical_runner(runner) == "dataflow" else None
    return job_identity(types.SimpleNamespace(_job_id=job_id), settings.get("beam_args") or [])


def record_job(work_dir: str, job: dict) -> None:
    """The launcher's note of the job id for the stage (only when the runner gave one)."""
    from pipeline.runs.manifest import write_json

    if job.get("id"):
        write_json(f"{work_dir.rstrip('/')}/{JOB_NAME}", job)


# --- the stage's work ---------------------------------------------------------------------------------------


def finalize_run(settings: dict, folder: Optional[str] = None, records_read: Optional[int] = None) -> dict:
    """Finalises the run whose tables are in `folder` (default: the settings' temp folder, or, when a
    retry finds it already moved, the run folder itself); returns the manifest. Idempotent."""
    from pipeline.runs import history
    from pipeline.runs.manifest import build_manifest, read_json, save_manifest, write_json

    output, run_id = settings["output"].rstrip("/"), settings["run_id"]
    final = history.run_dir(output, run_id)
    if folder is None:
        folder = settings["work_dir"]
        if not history.folder_exists(folder):
            existing = read_json(f"{final}/{SETTINGS_NAME}") or {}
            if existing.get("attempt") != settings["attempt"]:
                raise FinalizeError(f"{folder}: no tables of run {run_id} to finalise")
            folder, settings = final, {**existing, **settings}  # a retry of the stage after the move
    folder = folder.rstrip("/")
    started = time.time()
    saved = read_json(f"{folder}/{SETTINGS_NAME}") or {}
    settings = {**saved, **settings, "work_dir": settings.get("work_dir", folder)}
    if records_read is not None:
        settings["records_read"] = records_read
    settings.setdefault("tables_written_at", started)  # the first time the stage ran: the writes just ended
    write_json(f"{folder}/{SETTINGS_NAME}", settings)  # from here on `python -m pipeline.finalize` can redo it
    if _fault("skip"):
        _LOG.warning("%s=skip: the run stays in %s", FAULT_ENV, folder)
        return {}
    options = _options(settings)
    timings = {"startup_seconds": settings.get("startup_seconds"),
               "pipeline_seconds": round(settings["tables_written_at"] - settings["launched_at"], 3)}
    manifest = build_manifest(settings, folder, final, job=job_of(settings, folder), timings=timings,
                              records_read=settings.get("records_read"))
    manifest["comparison"] = None
    manifest["report"] = None
    save_manifest(folder, manifest)  # the comparison reads this run's manifest
    comparison = None
    if getattr(options, "compare_with_previous", False):
        comparison = _compare_with_previous(options, output, run_id, manifest, folder)
    if getattr(options, "report", True):
        from pipeline.report.page import write_report

        try:
            write_report(folder, manifest=manifest, comparison=comparison)
            manifest["report"] = f"{final}/report.html"
        except Exception as exc:  # noqa: BLE001 - the tables are the product; the report is a view of them
            _LOG.warning("Could not write the report: %s", exc, exc_info=True)
            manifest["report"] = {"error": f"{type(exc).__name__}: {exc}"}
    if _fault("after_report"):
        raise RuntimeError(f"{FAULT_ENV}=after_report: the stage fails before the run is moved into place")
    manifest["timings"]["finalize_seconds"] = round(time.time() - started, 3)
    save_manifest(folder, manifest)
    write_json(f"{folder}/{SUCCESS_NAME}", {"run_id": run_id, "attempt": settings["attempt"]})
    if folder != final:
        history.swap_in(folder, final)
    history.update_index(output, manifest)
    _LOG.info("Run %s finalised in %s", run_id, final)
    return manifest


def _compare_with_previous(options, output: str, run_id: str, manifest: dict, folder: str) -> Optional[dict]:
    """Compares the run in `folder` with the one before it in runs.json; sets manifest["comparison"]."""
    from pipeline.runs import compare, history

    previous = history.previous_run(output, run_id)
    if previous is None:
        _LOG.info("No earlier run in %s/%s: nothing to compare with", output, history.INDEX_NAME)
        manifest["comparison"] = {"baseline_run_id": None, "flagged": False, "exit_code": compare.EXIT_OK,
                                  "message": "no earlier run in the index"}
        return None
    try:
        baseline = compare.load_run(previous["run_dir"], "baseline")
        current = compare.load_run(folder, "current")
        current.run_dir = history.run_dir(output, run_id)
        result = compare.compare_runs(baseline, current, compare.thresholds_from(options))
        compare.write_comparison(result, folder)
    except compare.CompareError as exc:
        manifest["comparison"] = {"baseline_run_id": previous["run_id"], "flagged": None,
                                  "exit_code": compare.EXIT_FAILED, "message": str(exc)}
        return None
    flagged_exit_code = getattr(options, "flagged_exit_code", compare.EXIT_FLAGGED)
    manifest["comparison"] = {**compare.brief(result), "exit_code": compare.exit_code(result, flagged_exit_code)}
    return result


class _FinalizeFn(beam.DoFn):
    """One element in; runs `finalize_run` once every side input (the tables' written files) is there."""

    def __init__(self, settings_json: str):
        self._settings_json = settings_json

    def process(self, _, records_read, *written_files):
        settings = json.loads(self._settings_json)
        _LOG.info("Every table is written (%d files): finalising run %s", sum(len(w) for w in written_files),
                  settings["run_id"])
        manifest = finalize_run(settings, records_read=int(records_read))
        yield manifest.get("run_dir", settings["work_dir"])


class FinalizeRun(beam.PTransform):
    """The graph's last step: `pipeline | FinalizeRun(settings, written, records_read)`.

    Args:
      settings: `launch_settings(...)` (plain JSON values).
      written: the write transforms' outputs (PCollections of written file names), one per table.
      records_read: a one-element PCollection: the records the read step emitted (the job's own count,
        checked against what the tables account for: counts["balanced"]).
    """

    def __init__(self, settings: dict, written: list, records_read):
        super().__init__()
        self._settings_json = json.dumps(settings, default=str)
        self._written = written
        self._records_read = records_read

    def expand(self, pbegin):
        side = [beam.pvalue.AsList(w) for w in self._written]
        return (
            pbegin
            | "Start" >> beam.Create([None])
            | "Finalize" >> beam.ParDo(_FinalizeFn(self._settings_json),
                                       beam.pvalue.AsSingleton(self._records_read), *side)
        )


# --- what the launcher and the command read ---------------------------------------------------------------


def started_stage(work_dir: str) -> bool:
    """Whether the finalise stage started in `work_dir` (every table was written there)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(f"{work_dir.rstrip('/')}/{SETTINGS_NAME}")


def read_finalised(output: str, run_id: str, attempt: str) -> dict:
    """The manifest of `run=<run_id>/` as the job finalised it (RunNotFinalised when it is not this
    attempt's, or not complete)."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.runs import history
    from pipeline.runs.manifest import read_json

    final = history.run_dir(output, run_id)
    manifest = read_json(f"{final}/run_manifest.json") or {}
    if manifest.get("attempt") != attempt or not FileSystems.exists(f"{final}/{SUCCESS_NAME}"):
        raise RunNotFinalised(
            f"the job ended but run {run_id} was not finalised (no {SUCCESS_NAME} of this attempt in {final}/); "
            f"`python -m pipeline.finalize --output {output} --run_id {run_id}` finishes it from the tables")
    return manifest


def find_attempt(output: str, run_id: str) -> tuple[str, dict]:
    """(folder, settings) to finalise for `python -m pipeline.finalize` (see the module docstring)."""
    from pipeline.runs import history
    from pipeline.runs.manifest import read_json

    output = output.rstrip("/")
    candidates = []
    for folder in history.temp_folders(output, run_id):
        settings = read_json(f"{folder}/{SETTINGS_NAME}")
        if settings:
            candidates.append((settings.get("launched_at") or 0, folder, settings))
        else:
            _LOG.info("%s: its job did not finish writing the tables (no %s); skipped", folder, SETTINGS_NAME)
    if candidates:
        _, folder, settings = max(candidates, key=lambda c: c[0])
        return folder, {**settings, "output": output, "work_dir": folder}
    final = history.run_dir(output, run_id)
    settings = read_json(f"{final}/{SETTINGS_NAME}")
    if settings:
        return final, {**settings, "output": output}
    raise FinalizeError(
        f"no run {run_id} to finalise under {output}: no {history.TEMP_PREFIX}{run_id}-* folder whose tables "
        f"were all written and no {history.RUN_PREFIX}{run_id}/ with {SETTINGS_NAME}; re-run the id instead")


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.argtypes import add_boolean
    from transforms.errors import AuditError

    parser = argparse.ArgumentParser(prog="python -m pipeline.finalize",
                                     description="Redo a run's finalisation from its tables (see pipeline/finalize.py)")
    parser.add_argument("--output", required=True, help="The output folder the run was written to (local or gs://)")
    parser.add_argument("--run_id", required=True, help="The run's id")
    add_boolean(parser, "--quiet", help="Do not print the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        folder, settings = find_attempt(args.output, args.run_id)
        manifest = finalize_run(settings, folder=folder)
    except (FinalizeError, AuditError) as exc:  # AuditError: tables of a schema version this release does not know
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if not manifest:  # the test-only fault "skip"
        return 3
    if not args.quiet:
        from pipeline.runs.summary import summary_text

        print(summary_text(manifest))
    return (manifest.get("comparison") or {}).get("exit_code") or 0


if __name__ == "__main__":
    sys.exit(main())
