"""Run history: one folder per run under the output, swapped in whole, and an index.

Layout (local or any Beam filesystem, e.g. gs://):

    <output>/runs.json                      the index of the runs (below)
    <output>/run=<run_id>/heatmaps/*.parquet
    <output>/run=<run_id>/class_stats/*.parquet
    <output>/run=<run_id>/errors/*.parquet
    <output>/run=<run_id>/run_manifest.json
    <output>/run=<run_id>/comparison.{json,parquet}   with --compare_with_previous
    <output>/run=<run_id>/report.html                  unless --no_report
    <output>/run=<run_id>/_SUCCESS                     the run is complete
    <output>/run=<run_id>/_finalize.json               what `python -m pipeline.finalize` needs to redo it
    <output>/_tmp-run=<run_id>-<random>/               a run being written

A run writes everything into its temporary sibling folder, then its last
stage (`pipeline.finalize`, in the job) writes the manifest, comparison,
report and `_SUCCESS` there, `swap_in` replaces `run=<run_id>/` with it,
and only then is `runs.json` rewritten.
Re-running an id replaces that run; other runs are never touched.

The run id defaults to today's date (UTC, YYYY-MM-DD). Ids are compared as
strings: "the previous run" is the one whose id sorts just before, so ids
should sort in time order (ISO dates do; "nightly-9" and "nightly-10" do not).
"""

from __future__ import annotations

import datetime
import logging
import re
import uuid
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from pipeline.runs.manifest import read_json, write_json
from transforms.errors import AuditError

_LOG = logging.getLogger(__name__)

INDEX_NAME = "runs.json"
RUN_PREFIX = "run="
TEMP_PREFIX = "_tmp-run="
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_run_id(now: Optional[datetime.datetime] = None) -> str:
    """Today's date in UTC, YYYY-MM-DD."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d")


def check_run_id(run_id: str) -> str:
    """The id itself if it can name a folder everywhere; AuditError otherwise."""
    if not _RUN_ID.match(run_id or ""):
        raise AuditError(
            f"--run_id: expected 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit, got {run_id!r}"
        )
    return run_id


def run_dir(output: str, run_id: str) -> str:
    """`<output>/run=<run_id>`."""
    return f"{output.rstrip('/')}/{RUN_PREFIX}{run_id}"


def temp_dir(output: str, run_id: str) -> str:
    """A fresh `<output>/_tmp-run=<run_id>-<random>` for a run being written."""
    return f"{output.rstrip('/')}/{TEMP_PREFIX}{run_id}-{uuid.uuid4().hex[:10]}"


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def list_files(folder: str) -> list[str]:
    """Every file under `folder` (recursively), sorted."""
    folder = folder.rstrip("/")
    try:
        found = FileSystems.match([f"{folder}/**"])[0].metadata_list
    except (OSError, ValueError):
        return []
    return sorted(m.path for m in found)


def folder_exists(folder: str) -> bool:
    if _is_local(folder):
        return FileSystems.exists(folder)
    return bool(list_files(folder))


def delete_folder(folder: str) -> None:
    """Deletes a folder and everything under it (no error when absent)."""
    if _is_local(folder):
        if FileSystems.exists(folder):
            FileSystems.delete([folder])
        return
    files = list_files(folder)
    if files:
        FileSystems.delete(files)


def swap_in(temp: str, final: str) -> None:
    """Replaces folder `final` by folder `temp` (which disappears).

    What "atomic" means here:

    * Local (POSIX) filesystems: the old folder is first renamed aside
      (`<final>.old-<random>`), then `temp` is renamed to `final`, then the
      old folder is deleted. Each rename is atomic, so `final` is always
      either the whole old run or the whole new one, except for the instant
      between the two renames when it does not exist at all; it is never a
      mix of both.
    * Object stores (gs://, s3://): there are no folders and no rename, only
      objects. Beam's `FileSystems.rename` copies then deletes each object, so
      the swap is per object: first every object of the old run is deleted,
      then every object of the new run is copied in. During that window a
      reader listing `run=<id>/` can see the run missing or half there.
      What is atomic is the write of one object: `runs.json` is rewritten (a
      single object) only after the swap finished, so readers that start
      from the index (as `pipeline.runs.compare` and `--compare_with_previous`
      do) see either the old state or the complete new run, never a partial
      one. A crash mid-swap leaves the temp folder in place; re-running the
      same id redoes the run and the swap.
    """
    temp, final = temp.rstrip("/"), final.rstrip("/")
    if _is_local(temp):
        aside = None
        if FileSystems.exists(final):
            aside = f"{final}.old-{uuid.uuid4().hex[:10]}"
            FileSystems.rename([final], [aside])
        FileSystems.rename([temp], [final])
        if aside:
            FileSystems.delete([aside])
        return
    delete_folder(final)
    sources = list_files(temp)
    FileSystems.rename(sources, [final + src[len(temp):] for src in sources])
    delete_folder(temp)


def temp_folders(output: str, run_id: str) -> list[str]:
    """The temp folders of attempts at `run_id` (`<output>/_tmp-run=<run_id>-*`), sorted."""
    output = output.rstrip("/")
    pattern = f"{output}/{TEMP_PREFIX}{run_id}-*"
    if _is_local(output):
        import glob

        return sorted(glob.glob(pattern))
    try:
        found = FileSystems.match([f"{pattern}/**"])[0].metadata_list
    except (OSError, ValueError):
        found = []
    return sorted({f"{output}/{m.path[len(output) + 1:].split('/')[0]}" for m in found})


def clear_temps(output: str, run_id: str) -> None:
    """Deletes temp folders left by crashed earlier attempts at `run_id`."""
    for folder in temp_folders(output, run_id):
        _LOG.info("Deleting %s, left by an earlier attempt at run %s", folder, run_id)
        delete_folder(folder)


def index_entry(manifest: dict) -> dict:
    """What the index keeps of one run's manifest."""
    counts = manifest.get("counts", {})
    attention = manifest.get("attention", {})
    comparison = manifest.get("comparison") or {}
    return {
        "run_id": manifest.get("run_id"),
        "schema_version": manifest.get("schema_version", 0),  # of the run's tables (transforms.schemas)
        "run_dir": manifest.get("run_dir") or manifest.get("output"),
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "state": manifest.get("state"),
        "job": manifest.get("job"),
        "records_read": counts.get("records_read"),
        "images_explained": counts.get("images_explained"),
        "records_rejected": sum((counts.get("records_rejected") or {}).values()),
        "model_uri": manifest.get("model", {}).get("uri"),
        "model_fingerprint": manifest.get("model", {}).get("fingerprint"),
        "pointing_accuracy": attention.get("pointing_accuracy"),
        "shortcut_classes": attention.get("shortcut_classes"),
        "compared_with": comparison.get("baseline_run_id"),
        "comparison_flagged": comparison.get("flagged"),
    }


def read_index(output: str) -> list[dict]:
    """The runs of `<output>/runs.json`, sorted by run id ([] when absent)."""
    index = read_json(f"{output.rstrip('/')}/{INDEX_NAME}") or {}
    return sorted(index.get("runs", []), key=lambda r: r["run_id"])


def _present_runs(output: str) -> dict:
    """run id -> path of its run_manifest.json, for every run folder under `output`."""
    from pipeline.runs.manifest import MANIFEST_NAME

    try:
        found = FileSystems.match([f"{output}/{RUN_PREFIX}*/{MANIFEST_NAME}"])[0].metadata_list
    except (OSError, ValueError):
        found = []
    present = {}
    for meta in found:
        folder = meta.path[: -len(MANIFEST_NAME) - 1]
        present[folder.rsplit("/", 1)[-1][len(RUN_PREFIX):]] = meta.path
    return present


def _as_written(entry: dict) -> dict:
    """An index entry as it reads back from the JSON file."""
    import json

    return json.loads(json.dumps(entry, default=str))


def update_index(output: str, manifest: Optional[dict] = None, attempts: int = 50) -> list[dict]:
    """Rewrites `<output>/runs.json` with `manifest`'s run added or replaced.

    The index heals itself: entries whose folder is gone are dropped, and
    run folders missing from it are added back from their manifests.

    Concurrent runs: the index is one object rewritten whole (read, merge,
    write), so two runs finishing at the same moment can each write an index
    that lacks the other's run. After writing, this reads the index back and
    lists the run folders again; while the index lacks a run folder that
    exists (or holds another entry than this run's), it merges and writes
    again (up to `attempts` times, with a short random pause). Every run
    folder is swapped in before its run updates the index, so the last
    writer always sees every folder: whoever writes last, the final index
    lists every run (test: tests/test_runs_index_race.py, local and gs://).
    """
    import random
    import time

    output = output.rstrip("/")
    mine = _as_written(index_entry(manifest)) if manifest is not None else None
    entries: list[dict] = []
    for attempt in range(attempts):
        runs = {r["run_id"]: r for r in read_index(output)}
        present = _present_runs(output)
        if attempt and set(present) <= set(runs) and (mine is None or runs.get(mine["run_id"]) == mine):
            return [runs[run_id] for run_id in sorted(runs) if run_id in present]
        if mine is not None:
            runs[mine["run_id"]] = mine
        for run_id, path in present.items():
            if run_id not in runs:
                runs[run_id] = index_entry(read_json(path) or {"run_id": run_id})
        entries = [runs[run_id] for run_id in sorted(runs) if run_id in present]
        write_json(f"{output}/{INDEX_NAME}", {"updated_at": _now(), "runs": entries})
        time.sleep(random.uniform(0.005, 0.02) * min(attempt + 1, 10))
    _LOG.warning("%s/%s still changed after %d rewrites; the next run's update will complete it",
                 output, INDEX_NAME, attempts)
    return entries


def previous_run(output: str, run_id: str) -> Optional[dict]:
    """The index entry of the run whose id sorts just before `run_id`, if any."""
    earlier = [r for r in read_index(output) if r["run_id"] < run_id]
    if not earlier:
        return None
    # The folder beside the index, even if the output was moved since.
    return {**earlier[-1], "run_dir": run_dir(output, earlier[-1]["run_id"])}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
