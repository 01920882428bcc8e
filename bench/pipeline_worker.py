"""One pipeline run in its own process, measured: `pipeline.graph.run(argv)`.

    python -m bench.pipeline_worker --result OUT.json [--profile cprofile|pyinstrument]
        [--profile_out PATH] [--lever NAME ...] -- <pipeline argv>

Writes {"import_seconds", "run_seconds", "startup_seconds", "pipeline_seconds",
"pipeline_cpu_seconds", "images_explained", "maxrss_mb", ...} to OUT.json. `run_seconds` is the wall
time of `run()` (launcher checks, model inspection, the Beam job, the manifest);
the process's imports (TensorFlow, Beam) are `import_seconds`. Levers are
experimental monkeypatches from `bench.levers` (measurement only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    parser.add_argument("--profile", choices=("cprofile", "pyinstrument"), default=None)
    parser.add_argument("--profile_out", default=None)
    parser.add_argument("--lever", action="append", default=[])
    args = parser.parse_args(argv[:split])
    pipeline_argv = argv[split + 1:]

    started = time.perf_counter()
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from pipeline.graph import run

    if args.lever:
        from bench.levers import apply_levers

        apply_levers(args.lever)
    imported = time.perf_counter()
    cpu = _time_pipeline_cpu()
    profiler = None
    if args.profile == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    elif args.profile == "pyinstrument":
        import pyinstrument

        profiler = pyinstrument.Profiler(interval=0.002)
        profiler.start()
    _, manifest = run(pipeline_argv)
    finished = time.perf_counter()
    if args.profile == "cprofile":
        profiler.disable()
        profiler.dump_stats(args.profile_out or args.result + ".prof")
    elif args.profile == "pyinstrument":
        profiler.stop()
        with open(args.profile_out or args.result + ".txt", "w") as handle:
            handle.write(profiler.output_text(unicode=False, color=False, show_all=False))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss survives execve on Linux (a vfork'ed child inherits its parent's
    # peak), so the process's own peak is read from VmHWM, which exec resets.
    with open("/proc/self/status") as handle:
        hwm = [line for line in handle if line.startswith("VmHWM:")]
    maxrss_kb = int(hwm[0].split()[1]) if hwm else usage.ru_maxrss
    result = {
        "import_seconds": imported - started,
        "run_seconds": finished - imported,
        "startup_seconds": manifest.get("timings", {}).get("startup_seconds"),
        "pipeline_seconds": manifest.get("timings", {}).get("pipeline_seconds"),
        "images_explained": manifest.get("counts", {}).get("images_explained"),
        "records_rejected": manifest.get("counts", {}).get("records_rejected"),
        "run_dir": manifest.get("run_dir"),
        "maxrss_mb": maxrss_kb / 1024.0,
        "cpu_user_seconds": usage.ru_utime,
        "cpu_system_seconds": usage.ru_stime,
        "levers": args.lever,
        # CPU of this process (all its threads) while Beam ran the job: in-process runners only.
        "pipeline_cpu_seconds": cpu.get("seconds"),
    }
    with open(args.result, "w") as handle:
        json.dump(result, handle)


def _time_pipeline_cpu() -> dict:
    """Wraps `beam.Pipeline.run` (the in-process runners run the whole job inside it) to record
    the process's CPU seconds it took; the returned dict gets "seconds"."""
    import apache_beam as beam

    measured: dict = {}
    original = beam.Pipeline.run

    def run(self, *args, **kwargs):
        started = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            measured["seconds"] = measured.get("seconds", 0.0) + time.process_time() - started

    beam.Pipeline.run = run
    return measured


if __name__ == "__main__":
    main()
