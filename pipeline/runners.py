"""Runner shorthands: `--runner=dataflow | flink | portable` -> complete Beam arguments.

`translate_runner_args(beam_args, gpu_type=..., gpu_count=...)` is called by
`pipeline.options.parse_args` on the arguments that are not the audit's own.
Runner names are matched case-insensitively, with or without the `Runner`
suffix (`dataflow`, `Dataflow`, `DataflowRunner` are the same); any other
runner (FnApiRunner, DirectRunner, PrismRunner, a dotted class path) is
passed through untouched. Options given explicitly always win over the
defaults added here.

Dataflow (`dataflow_args`):
  --runner=DataflowRunner
  --setup_file=<repo>/setup.py        unless --setup_file is given: the
                                      workers install the launcher's code
                                      (staged as workflow.tar.gz)
  --experiments=use_runner_v2         (GPUs need runner v2)
  with --gpu_type T [--gpu_count N]:
  --dataflow_service_options=worker_accelerator=type:T;count:N;install-nvidia-driver
  --sdk_container_image, --machine_type, --number_of_worker_harness_threads,
  --experiments=no_use_multiple_sdk_containers ... are Beam's own options
  and pass through unchanged (see docs/dataflow.md).

Flink (`flink_args`):
  without --job_endpoint / --flink_master: the local cluster of
  scripts/flink/start_cluster.sh: --runner=PortableRunner
  --job_endpoint=localhost:$BEAM_JOB_PORT (8099) --environment_type=EXTERNAL
  --environment_config=localhost:$BEAM_WORKER_POOL_PORT (50000);
  with --job_endpoint: PortableRunner to that Beam Flink job server;
  with --flink_master: FlinkRunner --flink_submit_uber_jar (Beam builds a jar
  and posts it to Flink's REST API; no job server runs in between).

Portable (`portable_args`): --runner=PortableRunner, and
--environment_type=LOOPBACK when no environment is given (Beam's default,
DOCKER, needs a Docker engine).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

_LOG = logging.getLogger(__name__)

ACCELERATOR_OPTION = "worker_accelerator"
DEFAULT_GPU_TYPE_HINT = "nvidia-tesla-t4"

# Translator: (beam_args without --runner, settings) -> full beam args (with --runner).
Translator = Callable[[list, dict], list]


def repo_setup_file() -> Optional[str]:
    """`<repo>/setup.py` when the code runs from a source checkout (editable install)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    return path if os.path.isfile(path) else None


def add_runner_arguments(parser) -> None:
    """The friendly runner options (consumed here, never passed to Beam)."""
    group = parser.add_argument_group(
        "runner shorthands",
        "--runner=dataflow|flink|portable (any case) is expanded to complete Beam arguments "
        "(see pipeline/runners.py and docs/dataflow.md)",
    )
    group.add_argument(
        "--gpu_type", default=None,
        help=f"Dataflow: attach GPUs of this type to each worker, e.g. {DEFAULT_GPU_TYPE_HINT} "
        "(adds --dataflow_service_options=worker_accelerator=type:T;count:N;install-nvidia-driver)",
    )
    group.add_argument("--gpu_count", type=int, default=None, help="Dataflow: GPUs per worker (default 1 with --gpu_type)")


RUNNER_DESTS = ("gpu_type", "gpu_count")


# --- small helpers on argument lists -------------------------------------------------

def _names(arg: str) -> str:
    return arg.split("=", 1)[0]


def has_option(args: list, name: str) -> bool:
    """True when `--name` or `--name=...` is in args."""
    return any(_names(a) == name for a in args)


def option_values(args: list, name: str) -> list:
    """Every value given to `--name` (as `--name=v` or `--name v`)."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == name and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values.append(args[i + 1])
    return values


def remove_option(args: list, name: str) -> list:
    """args without `--name` / `--name=v` / `--name v`."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def runner_of(args: list) -> Optional[str]:
    values = option_values(args, "--runner")
    return values[-1] if values else None


def canonical_runner(name: Optional[str]) -> Optional[str]:
    """'dataflow', 'flink', 'portable' for those runners (any case, Runner suffix optional); else None."""
    if not name:
        return None
    key = name.strip().lower()
    if key.endswith("runner"):
        key = key[: -len("runner")]
    return key if key in _TRANSLATORS else None


def _experiments(args: list) -> list:
    found = []
    for value in option_values(args, "--experiments") + option_values(args, "--experiment"):
        found.extend(v.strip() for v in value.split(",") if v.strip())
    return found


def _service_options(args: list) -> list:
    return option_values(args, "--dataflow_service_options")


def accelerator_option(gpu_type: str, gpu_count: int = 1, install_driver: bool = True) -> str:
    """`worker_accelerator=type:T;count:N;install-nvidia-driver`."""
    if gpu_count < 1:
        raise ValueError(f"--gpu_count: expected a whole number >= 1, got {gpu_count}")
    value = f"{ACCELERATOR_OPTION}=type:{gpu_type};count:{gpu_count}"
    return value + (";install-nvidia-driver" if install_driver else "")


_FALSE = ("", "false", "0", "no", "off")


# --- the translators -------------------------------------------------------------------

def dataflow_args(args: list, settings: dict) -> list:
    """DataflowRunner with the project staged, runner v2 and the GPU settings."""
    dry = option_values(args, "--dry_run")
    if dry and dry[-1].strip().lower() in _FALSE:
        # Beam reads --dry_run as a string: "False" would be a true value there.
        args = remove_option(args, "--dry_run")
    out = ["--runner=DataflowRunner", *args]
    if not has_option(args, "--setup_file"):
        setup = repo_setup_file()
        if setup:
            out.append(f"--setup_file={setup}")
        elif not has_option(args, "--sdk_container_image"):
            _LOG.warning("no setup.py next to the pipeline package and no --sdk_container_image: "
                         "Dataflow workers will not have the project installed")
    if "use_runner_v2" not in _experiments(args) and "disable_runner_v2" not in _experiments(args):
        out.append("--experiments=use_runner_v2")
    gpu_type, gpu_count = settings.get("gpu_type"), settings.get("gpu_count")
    if gpu_count is not None and not gpu_type:
        raise ValueError("--gpu_count: give --gpu_type too (e.g. --gpu_type nvidia-tesla-t4)")
    if gpu_type:
        if any(o.startswith(ACCELERATOR_OPTION + "=") for o in _service_options(args)):
            raise ValueError("--gpu_type: --dataflow_service_options already sets worker_accelerator; give one of them")
        out.append(f"--dataflow_service_options={accelerator_option(gpu_type, gpu_count or 1)}")
        if not has_option(args, "--sdk_container_image"):
            _LOG.warning("--gpu_type without --sdk_container_image: the default Beam image has no CUDA "
                         "libraries, TensorFlow will run on the CPU (build the image in Dockerfile)")
    return out


def flink_args(args: list, settings: dict) -> list:
    """`--runner=flink`: submit to a Flink cluster through a Beam Flink job server.

    Without --job_endpoint / --flink_master it targets the local cluster of
    scripts/flink/start_cluster.sh (job server and worker pool ports from
    BEAM_JOB_PORT / BEAM_WORKER_POOL_PORT, defaults 8099 / 50000). With
    --flink_master (e.g. a session cluster's REST address) Beam's FlinkRunner
    builds an uber jar and posts it to Flink itself.
    """
    environment = []
    if not has_option(args, "--environment_type") and not has_option(args, "--default_environment_type"):
        pool = os.environ.get("BEAM_WORKER_POOL_PORT", "50000")
        environment = ["--environment_type=EXTERNAL", f"--environment_config=localhost:{pool}"]
    if has_option(args, "--flink_master"):
        extra = [] if has_option(args, "--flink_submit_uber_jar") else ["--flink_submit_uber_jar"]
        return ["--runner=FlinkRunner", *args, *extra, *environment]
    endpoint = [] if has_option(args, "--job_endpoint") else [
        f"--job_endpoint=localhost:{os.environ.get('BEAM_JOB_PORT', '8099')}"]
    return ["--runner=PortableRunner", *args, *endpoint, *environment]


def portable_args(args: list, settings: dict) -> list:
    """PortableRunner; LOOPBACK workers unless an environment is given."""
    out = ["--runner=PortableRunner", *args]
    if not has_option(args, "--environment_type") and not has_option(args, "--default_environment_type"):
        out.append("--environment_type=LOOPBACK")
    return out


_TRANSLATORS: dict[str, Translator] = {"dataflow": dataflow_args, "flink": flink_args, "portable": portable_args}


def translate_runner_args(beam_args: list, **settings) -> list:
    """Expands a runner shorthand into Beam arguments (see the module docstring).

    Args:
      beam_args: the arguments that are not the audit's own, with one --runner.
      settings: the friendly options (gpu_type, gpu_count); None = not given.

    Raises:
      ValueError: GPU options given for a runner that cannot use them, or twice.
    """
    kind = canonical_runner(runner_of(beam_args))
    given = {k: v for k, v in settings.items() if v is not None}
    if kind is None or (kind != "dataflow" and given):
        if given and kind != "dataflow":
            raise ValueError(
                f"--{next(iter(given))}: only for --runner=dataflow (on Flink or a local runner the workers "
                "use the GPUs their machines have)"
            )
        return list(beam_args)
    rest = remove_option(beam_args, "--runner")
    return _TRANSLATORS[kind](rest, settings)


def only_builds_job(beam_args: list) -> bool:
    """True when the runner will build the job without running it (Dataflow --dry_run / --template_location)."""
    if canonical_runner(runner_of(beam_args)) != "dataflow":
        return False
    dry = option_values(beam_args, "--dry_run")
    dry_run = bool(dry) and dry[-1].strip().lower() not in _FALSE
    return dry_run or bool(option_values(beam_args, "--template_location"))


# --- which job a run is ---------------------------------------------------------------

DATAFLOW_CONSOLE = "https://console.cloud.google.com/dataflow/jobs/{region}/{job_id}?project={project}"


def _result_job_id(result) -> Optional[str]:
    """The runner's id of the job: `result.job_id()` (Dataflow), the job service's id (portable runners:
    Flink, Spark, Prism, Beam's job servers), None for the in-process runners (FnApiRunner, DirectRunner)."""
    try:
        job_id = result.job_id() if callable(getattr(result, "job_id", None)) else getattr(result, "_job_id", None)
    except Exception:  # noqa: BLE001 - e.g. a Dataflow result without a job (template builds)
        return None
    return str(job_id) if job_id else None


def _gcp_setting(result, beam_args: list, name: str) -> Optional[str]:
    """--project / --region as the Dataflow result's options hold them (Beam may have filled in a
    default), else as given."""
    options = getattr(result, "_options", None)
    if options is not None:
        try:
            from apache_beam.options.pipeline_options import GoogleCloudOptions

            value = getattr(options.view_as(GoogleCloudOptions), name, None)
            if value:
                return str(value)
        except Exception:  # noqa: BLE001 - the given arguments below are good enough
            pass
    values = option_values(beam_args, f"--{name}")
    return values[-1] if values else None


def job_identity(result, beam_args: list) -> dict:
    """{"runner", "id", "url"} of the job behind `result` (a PipelineResult), for the log, the manifest and
    runs.json: the runner as given (--runner), the runner's job id (None for in-process runners) and, on
    Dataflow, the job's console URL."""
    runner = runner_of(beam_args)
    job_id = _result_job_id(result)
    url = None
    if job_id and canonical_runner(runner) == "dataflow":
        project, region = _gcp_setting(result, beam_args, "project"), _gcp_setting(result, beam_args, "region")
        if project and region:
            url = DATAFLOW_CONSOLE.format(region=region, job_id=job_id, project=project)
    return {"runner": runner, "id": job_id, "url": url}


def log_job(job: dict, logger: logging.Logger) -> None:
    """Logs the job's id (and console URL) at INFO on the project's logger, which the quiet console mode
    keeps (it only silences Beam's own INFO lines, where Beam says the same). The wording of Beam's
    Dataflow line, "Created job with id: [ID]", is what Airflow's Dataflow hook looks for."""
    if job.get("id"):
        logger.info("%s: Created job with id: [%s]", job.get("runner"), job["id"])
    else:
        logger.info("%s: the job runs in this process (no job id)", job.get("runner"))
    if job.get("url"):
        logger.info("Console URL: %s", job["url"])
