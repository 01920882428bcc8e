"""Command line entry point: errors become one line and exit status 2."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    from pipeline.console import quiet_console, wants_verbose

    argv = sys.argv[1:] if argv is None else argv
    with quiet_console(wants_verbose(argv)):  # no TensorFlow/absl start-up noise unless --verbose
        _main(argv)


def _main(argv) -> None:
    from pipeline.graph import run
    from pipeline.summary import summary_text
    from transforms.errors import AuditError

    try:
        _, manifest = run(argv)
    except AuditError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    if manifest.get("job_only"):  # Dataflow --dry_run / --template_location (pipeline/graph.build_job_only)
        print(manifest["message"])
        return
    if not manifest["options"]["quiet"]:
        print(summary_text(manifest))
    comparison = manifest.get("comparison") or {}
    if comparison.get("exit_code"):  # --compare_with_previous: 1 flagged, 2 could not compare
        if comparison["exit_code"] == 2:
            sys.stderr.write(f"error: {comparison['message']}\n")
        sys.exit(comparison["exit_code"])


if __name__ == "__main__":
    main()
