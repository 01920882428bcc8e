"""Every option of the audit job, with its default and a one-line error.

`AuditOptions` is a Beam `PipelineOptions` subclass, so the options travel
with the pipeline like Beam's own; `parse_args` reads them strictly first, so
a bad value exits with status 2 and one line saying what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.argtypes import OneLineParser, add_boolean, add_settings_arguments, exit_status
from pipeline.runners import RUNNER_DESTS, add_runner_arguments, runner_of, translate_runner_args
from pipeline.runs.compare import EXIT_FLAGGED, FLAGGED_EXIT_CODE_HELP, CompareThresholds
from pipeline.runs.history import check_run_id
from transforms.cam.methods import METHODS
from transforms.cam.preprocess import PRESETS, parse_image_size
from transforms.cam.targets import DEFAULT_MAX_TARGETS, LABEL_FORMATS, TARGET_HELP, TargetSpec, parse_target
from transforms.cam.tokens import parse_token_grid
from transforms.checks import CheckSettings
from transforms.errors import AuditError
from transforms.flags import FlagThresholds
from transforms.model_handler import BATCH_SIZE
from transforms.precision import MIXED_PRECISION
from transforms.settings import option, option_fields, settings_from, settings_options
from transforms.strategies import StrategySettings

DEFAULT_RUNNER = "FnApiRunner"
# The settings groups whose fields are also options (transforms/settings.py): AuditConfig attribute ->
# (dataclass, option prefix). Their defaults and help texts live in the dataclasses only.
SETTINGS_GROUPS = {
    "flags": (FlagThresholds, ""),
    "strategies": (StrategySettings, "strategy_"),
    "checks": (CheckSettings, ""),
    "compare": (CompareThresholds, ""),
}

# Set in the Flex Template's launcher image (templates/flex/Dockerfile): the Dataflow Flex launcher runs
# this command at each launch (with --template_location=<the job file it then submits>); there the
# default runner is Dataflow.
FLEX_TEMPLATE_ENV = "FLEX_TEMPLATE_PYTHON_PY_FILE"


def _checked(parse, show=str):
    """An argparse type from a parser that raises AuditError: the parsed value shown as a plain string
    (`show`; a plain string pickles and serialises), its error as argparse's one line."""

    def convert(text: str) -> str:
        try:
            return show(parse(text))
        except AuditError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    return convert


def _size(size: tuple[int, int]) -> str:
    return "{}x{}".format(*size)


_target = _checked(parse_target)  # --target, normalised
_image_size = _checked(parse_image_size, _size)  # --image_size as "HEIGHTxWIDTH"
_token_grid = _checked(parse_token_grid, _size)  # --token_grid as "HxW"
_run_id = _checked(check_run_id)


def add_audit_arguments(parser) -> None:
    """Adds the audit options to an argparse parser (or Beam's): one per option field of `AuditConfig` and of
    the settings groups (`SETTINGS_GROUPS`), plus `--no_report`, a second spelling of `--report`."""
    add_settings_arguments(parser, AuditConfig)
    add_boolean(parser, "--no_report", dest="report", negate=True, default=argparse.SUPPRESS,  # --report's
                help="Do not write report.html (the same as --report=false)")
    for cls, prefix in SETTINGS_GROUPS.values():
        add_settings_arguments(parser, cls, prefix)


def resolve_reshuffle_records(value: str, runner: Optional[str]) -> str:
    """--reshuffle_records auto -> "on" for cluster runners, "off" for local in-process ones."""
    if value != "auto":
        return value
    local = (runner or DEFAULT_RUNNER).strip().lower()
    return "off" if any(name in local for name in ("direct", "fnapi", "prism")) else "on"


class AuditOptions(PipelineOptions):
    """The audit options as a Beam PipelineOptions view.

    Every converter returns a plain value (str, int, float, bool): portable
    runners (PortableRunner, Flink, Dataflow runner v2) serialise all pipeline
    options into a protobuf Struct, where an object such as a TargetSpec
    fails ("Value predicted has unexpected type TargetSpec").
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        add_audit_arguments(parser)


@dataclasses.dataclass
class AuditConfig:
    """The audit options after parsing (plain values only): every field made with `option` is also an
    option of `python -m pipeline` (`transforms/settings.py`), its default written here only. `target`,
    `image_size` and `token_grid` are checked strings on the command line and parsed values here."""

    input: Optional[str] = option(
        None, "Glob of TFRecord shards of tf.train.Example images, local or gs:// (omit with --model for the "
        "demo); {run_id} in it is replaced by the run's id when the job starts, e.g. gs://b/val/dt={run_id}/*",
        kind="text")
    output: Optional[str] = option(None, "Output folder, local or gs:// (demo: <demo_dir>/output)", kind="text")
    model: Optional[str] = option(
        None, "A Keras 3 .keras/.h5 file, a tf.keras 2 .h5 file or SavedModel folder (local or gs://), "
        "or a keras.applications name such as resnet50 (see 'Models' below)", kind="text")
    image_size: Optional[tuple[int, int]] = option(
        None, "HEIGHTxWIDTH every image is resized to, e.g. 224x224: required for a model whose input "
        "size is dynamic (None, None, C); must match a fixed one", kind="text", check=_image_size)
    weights: Optional[str] = option(
        None, "Weights file for a keras.applications --model (random but fixed weights when omitted; nothing is "
        "downloaded)", kind="text")
    unsafe_model: bool = option(
        False, "Load the model with Keras safe mode OFF (runs code stored in the file: only for files you trust)")
    custom_objects: Optional[str] = option(
        None, "A .py file (local or gs://; comma-separated for several) defining the model's custom layers or "
        "functions: each class and function it defines is given to Keras by its name, on the launcher and every "
        "worker (its source travels with the job). It runs as your code: pass only your own files",
        kind="text")
    target_layer: Optional[str] = option(
        None, "Layer whose activations are explained (default: the last layer with a 4-D spatial output before "
        "the head; nested models as outer/inner)", kind="text")
    token_grid: Optional[tuple[int, int]] = option(
        None, "Transformers: ROWSxCOLUMNS of the patch grid of a target layer with a (batch, tokens, channels) "
        "output, e.g. 14x14 (default: from the patch embedding's output or the sequence length)",
        kind="text", check=_token_grid)
    prefix_tokens: Optional[int] = option(
        None, "Transformers: tokens before the patch tokens (class, distillation, register tokens), dropped "
        "from the map (default: inferred with the grid)", kind="count")
    model_output: Optional[str] = option(
        None, "Name or index of the model output to explain, for a model with several outputs "
        "(required then; a one-output model needs none)", kind="text")
    target: TargetSpec = option(
        "predicted", f"Class each CAM explains: {TARGET_HELP} (topk:K writes K rows per image; labels: one per "
        "true label of a multi-label record; above:T: one per class scoring >= T, sigmoid heads)",
        kind="text", check=_target)
    label_format: str = option(
        "single", "The label feature: single (one int64 class per image), index (a list of int64 class indices) "
        "or multi_hot (one 0/1 int64 per class); index and multi_hot make a multi-label run (README "
        "'Multi-label')", kind="text", choices=LABEL_FORMATS)
    max_targets: int = option(
        DEFAULT_MAX_TARGETS, "--target labels / above:T: the most maps per image (the highest-scoring wanted "
        "classes; at most the class count)", kind="positive")
    label_threshold: Optional[float] = option(
        None, "Multi-label runs: a class counts as predicted when its score is >= this (class_stats' precision, "
        "recall, F1; heatmaps' predicted_labels). Default: T of --target above:T, else 0.5", kind="share")
    method: str = option("gradcam", "CAM method", kind="text", choices=METHODS)
    image_key: str = option("image/encoded", "Feature with the encoded image", kind="text")
    label_key: str = option("image/class/label", "Feature with the int64 label", kind="text")
    id_key: str = option("image/filename", "Feature with the image id (when absent: <shard>:<index>)", kind="text")
    label_offset: int = option(
        0, "Subtracted from every label (1 for ImageNet TFRecords with 1-based labels)", kind="int")
    class_names: Optional[str] = option(
        None, "Text file with one class name per line (local or gs://)", kind="text")
    preprocess: str = option(
        "none", "Input scaling: none = float32 pixels 0-255, scale_0_1, or a keras.applications preset",
        kind="text", choices=PRESETS)
    batch_size: int = option(BATCH_SIZE, "Images per model call", kind="positive")
    max_image_pixels: int = option(
        40_000_000, "Images with more pixels (width x height, read from the header) are rejected before "
        "decoding", kind="positive")
    jit_compile: bool = option(
        False, "Compile the CAM function with XLA (slower for some models on CPU; try on GPU)")
    mixed_precision: str = option(
        "off", "Run the model's layers in float16 or bfloat16 (GPU speed-up; the CAM and scores stay float32)",
        kind="text", choices=MIXED_PRECISION)
    large_model: bool = option(
        False, "Share one model across the worker processes of a machine (RunInference large_model)")
    demo_dir: str = option(".demo", "Where the demo keeps its data, model and output (environment: "
                           "GRADCAM_AUDIT_DEMO_DIR)", kind="text", env="GRADCAM_AUDIT_DEMO_DIR")
    quiet: bool = option(False, "Do not print the summary")
    run_id: Optional[str] = option(
        None, "Name of this run: outputs go to <output>/run=<run_id>/ (a re-run of an id replaces it; "
        "default: today's date in UTC, YYYY-MM-DD)", kind="text", check=_run_id)
    compare_with_previous: bool = option(
        False, "Compare with the run listed just before this one in <output>/runs.json; exit status "
        "--flagged_exit_code (1) when something is flagged (thresholds below, see pipeline/runs/compare.py)")
    flagged_exit_code: int = option(EXIT_FLAGGED, FLAGGED_EXIT_CODE_HELP, kind="int", check=exit_status)
    wait: bool = option(
        True, "Wait for the job, print the summary and exit with its status (default). --wait=false "
        "submits the job, logs its id and exits 0: the job's last stage finalises the run on its own "
        "(manifest, comparison, report, runs.json). The in-process runners (FnApiRunner, DirectRunner) "
        "run the whole job inside this command, so there it still returns only when the run is done; "
        "on PortableRunner/Flink the workers must not be LOOPBACK (they live in this process)")
    report: bool = option(True, "Write <run>/report.html, a self-contained visual report (default)")
    reshuffle_records: str = option(
        "auto", "Spread the records of every shard over all workers (a shuffle after reading; costs one "
        "shuffle of the raw records). auto = on for cluster runners (Flink, Dataflow, portable), off for "
        "the local in-process runners, which would hold the whole dataset in memory",
        kind="text", choices=("auto", "on", "off"))
    verbose: bool = option(
        False, "Keep TensorFlow/absl/gRPC start-up logging (hidden by default) and Beam's INFO logging")
    # The settings groups (SETTINGS_GROUPS): their options, parsed into their dataclasses.
    flags: FlagThresholds = dataclasses.field(default_factory=FlagThresholds)
    strategies: StrategySettings = dataclasses.field(default_factory=StrategySettings)
    checks: CheckSettings = dataclasses.field(default_factory=CheckSettings)
    compare: CompareThresholds = dataclasses.field(default_factory=CompareThresholds)

    @property
    def is_demo(self) -> bool:
        return self.input is None and self.model is None

    @property
    def multilabel(self) -> bool:
        """A multi-label run: list labels, the MULTILABEL_* table variants."""
        return self.label_format != "single"

    def multilabel_threshold(self) -> Optional[float]:
        """The score at which a class counts as predicted in a multi-label run (None in a single-label one)."""
        if not self.multilabel:
            return None
        if self.label_threshold is not None:
            return self.label_threshold
        return self.target.threshold if self.target.mode == "above" else 0.5

    def as_json(self) -> dict:
        """Every option by its command-line name (the settings groups flattened back): the manifest's "options"."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SETTINGS_GROUPS}
        for group, (_, prefix) in SETTINGS_GROUPS.items():
            out.update(settings_options(getattr(self, group), prefix))
        out["target"] = str(self.target)
        out["image_size"] = _size(self.image_size) if self.image_size else None
        out["token_grid"] = _size(self.token_grid) if self.token_grid else None
        return out


MODELS_HELP = (
    "Models: Keras 3 .keras or .h5 files; .h5/.hdf5 files and SavedModel folders saved by tf.keras 2 "
    "(loaded with tf_keras, the 'keras2' extra); keras.applications names; nested models (a base inside "
    "Sequential). Input: 1 channel (grey; images are converted with the luma weights) or 3 (RGB); "
    "float32, float16 or uint8; a fixed size, or (None, None, C) with --image_size HEIGHTxWIDTH. "
    "Output: one [batch, classes] output (softmax, sigmoid or linear head; a one-element list is fine), or "
    "several with --model_output NAME|INDEX naming the one to explain. Transformers: a target layer with "
    "tokens (batch, P+N, channels) is explained on its patch grid (--token_grid, --prefix_tokens when it "
    "cannot be inferred); the default layer of a model with attention is its last block's output. "
    "Refused at launch with one line: subclassed models, several inputs, SavedModels "
    "without Keras metadata (export with model.save instead)."
)
EXIT_CODES_HELP = (
    "Exit status: 0 done (with --wait=false: submitted); 1 something flagged (--compare_with_previous; --flagged_exit_code N gives N "
    "instead); 2 bad option, input or model (one line on stderr, nothing run); 3 the job failed "
    "unexpectedly (traceback on stderr); 130 interrupted. Boolean options take the bare flag, "
    "=true or =false."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; keeps the epilog's paragraphs (each one wrapped)."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(super(_HelpFormatter, self)._fill_text(p, width, indent) for p in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pipeline",
        description=(
            "Explain an image classifier over a whole TFRecord dataset with batched "
            "Grad-CAM and write heatmaps, per-class statistics and rejected records "
            "to Parquet. With neither --input nor --model it runs the built-in demo."
        ),
        formatter_class=_HelpFormatter,
        epilog=(
            "Every Apache Beam pipeline option is accepted too, e.g. --runner "
            f"(default here: {DEFAULT_RUNNER}, Beam's in-process engine), "
            "--direct_num_workers=2 --direct_running_mode=multi_processing, "
            "--runner=PortableRunner --job_endpoint=..., --runner=DataflowRunner "
            "--project=... --region=... --temp_location=gs://...; "
            "`python -m pipeline --help_beam` lists them all.\n\n"
            f"{MODELS_HELP}\n\n{EXIT_CODES_HELP}"
        ),
    )
    add_audit_arguments(parser)
    add_runner_arguments(parser)
    parser.add_argument("--help_beam", action="store_true", help="List every Beam pipeline option and exit")
    return parser


def print_beam_help() -> None:
    """Prints every Beam pipeline option (as Beam collects them) and exits."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(prog="python -m pipeline", allow_abbrev=False)
    for cls in PipelineOptions.__subclasses__():
        cls._add_argparse_args(parser)
    parser.print_help()
    sys.exit(0)


def parse_args(argv: Optional[list[str]]) -> tuple[AuditConfig, list[str]]:
    """Splits argv into the audit config and the Beam arguments.

    Exits with status 2 and a one-line message on a bad value.
    """
    parser = build_parser()
    known, beam_args = parser.parse_known_args(argv)
    if known.help_beam:
        print_beam_help()
    del known.help_beam
    if (known.input is None) != (known.model is None):
        parser.error("give both --input and --model, or neither to run the built-in demo")
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args):
        default = "DataflowRunner" if os.environ.get(FLEX_TEMPLATE_ENV) else DEFAULT_RUNNER
        beam_args = [f"--runner={default}", *beam_args]
    runner_settings = {name: vars(known).pop(name) for name in RUNNER_DESTS}
    try:  # --runner=dataflow|flink|portable shorthands and --gpu_type/--gpu_count (pipeline/runners.py)
        beam_args = translate_runner_args(beam_args, **runner_settings)
    except ValueError as exc:
        parser.error(str(exc))
    known.reshuffle_records = resolve_reshuffle_records(known.reshuffle_records, runner_of(beam_args))
    known.target = parse_target(known.target, known.max_targets)
    known.image_size = parse_image_size(known.image_size) if known.image_size else None
    known.token_grid = parse_token_grid(known.token_grid) if known.token_grid else None
    values = vars(known)
    groups = {group: settings_from(cls, {name: values.pop(name) for name, _ in option_fields(cls, prefix)}, prefix)
              for group, (cls, prefix) in SETTINGS_GROUPS.items()}
    return AuditConfig(**values, **groups), beam_args
