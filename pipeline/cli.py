"""Command line entry point and its exit status.

    0    the audit ran (nothing flagged); with --wait=false: the job was submitted
    1    something flagged (--compare_with_previous): for nightly jobs; --flagged_exit_code N
         makes it N (e.g. 0 for a scheduler that retries on any non-zero status)
    2    bad option, input or model: one line on stderr, nothing was run
    3    the job failed unexpectedly (the traceback is logged on stderr), or the runner lost
         records (the job's count of the records it read exceeds what the tables account for), or
         the job ended without finalising its run (`python -m pipeline.finalize` finishes it)
    130  interrupted (Ctrl-C)

An unexpected failure must never exit 1 (Python's own status for an uncaught
exception), which would read as "something flagged".
"""

from __future__ import annotations

import logging
import sys

EXIT_FLAGGED = 1
EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130

_LOG = logging.getLogger("pipeline")


def main(argv=None) -> None:
    from pipeline.console import quiet_console, wants_verbose

    argv = sys.argv[1:] if argv is None else argv
    with quiet_console(wants_verbose(argv)):  # no TensorFlow/absl start-up noise unless --verbose
        _main(argv)


def _main(argv) -> None:
    from pipeline.finalize import RunNotFinalised
    from pipeline.graph import run
    from pipeline.runs.summary import summary_text
    from transforms.errors import AuditError

    try:
        _, manifest = run(argv)
    except AuditError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_BAD_INPUT)
    except RunNotFinalised as exc:  # the tables are there; the run is not in place
        sys.stderr.write(f"error: {exc}; exit status {EXIT_JOB_FAILED}\n")
        sys.exit(EXIT_JOB_FAILED)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the documented "job failed" status instead of Python's 1
        _LOG.error("the job failed", exc_info=True)
        sys.stderr.write(f"error: the job failed ({type(exc).__name__}); exit status {EXIT_JOB_FAILED}\n")
        sys.exit(EXIT_JOB_FAILED)
    if manifest.get("job_only"):  # Dataflow --dry_run / --template_location (pipeline/graph.build_job_only)
        print(manifest["message"])
        return
    if manifest.get("submitted"):  # --wait=false: the job finalises its run on its own
        print(manifest["message"])
        return
    if not manifest["options"]["quiet"]:
        print(summary_text(manifest))
    counts = manifest.get("counts", {})
    if counts.get("balanced") is False:  # the runner read more records than the tables account for
        sys.stderr.write(
            f"error: the job read {counts['records_read_by_runner']} records but the tables account for "
            f"{counts['records_read']}: records were lost by the runner; exit status {EXIT_JOB_FAILED}\n"
        )
        sys.exit(EXIT_JOB_FAILED)
    comparison = manifest.get("comparison") or {}
    if comparison.get("flagged") is None and comparison.get("exit_code") == EXIT_BAD_INPUT:  # could not compare
        sys.stderr.write(f"error: {comparison['message']}\n")
    if comparison.get("exit_code"):  # --compare_with_previous: --flagged_exit_code (1) flagged, 2 could not compare
        sys.exit(comparison["exit_code"])


if __name__ == "__main__":
    main()
