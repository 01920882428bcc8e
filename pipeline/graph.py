"""The pipeline graph and `run(argv)`: the one file that wires every step.

    shard paths -> ReadRecords -> DecodeImages (checks) -> ExplainImages (batch decode + CAM: one element
      per batch) -> FormatHeatmapRows (one Arrow batch of heatmap rows per explained batch)
      -> BatchRows (those gathered into Arrow batches of BATCH_ROWS rows)
         -> SelectCheckImages (Top.Smallest of id hashes: no pixels) -> one list of the checks' images
              -> ScoreFaithfulness (records read again by offset, scored in full batches) -> score rows
              -> CheckSanity (the same images' first --sanity_images: the head randomised) --+
         -> FindStrategies (SpRAy: cluster_id, assigned over the batches)
            -> AddFaithfulnessScores (score rows as a side input) -> WriteHeatmaps (from the batches);
            clusters -> WriteClusters
         -> ComputeClassStats (numpy over the batches, + score rows) -> AddStrategyColumns -> WriteClassStats
      -> SelectExemplars (Top.PerKey per flag / shortcut class / strategy, + class stats) -> WriteExemplars
         score rows + sanity -> SummariseFaithfulness -> WriteFaithfulnessSummary (faithfulness.json)
    errors of every step -> CollectErrors -> WriteErrors
    records read -> CountRecordsRead --+
    every write's files (side inputs) -+-> FinalizeRun (pipeline/finalize.py): counts read back from the
      tables -> run_manifest.json, comparison, report.html, _SUCCESS, the run moved into place, runs.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import FLEX_TEMPLATE_ENV, AuditConfig, parse_args
from pipeline.progress_line import show_progress
from pipeline.runners import job_identity, log_job, only_builds_job
from transforms.checks import (
    FAITHFULNESS_SUMMARY,
    RunSanityCheck,
    ScoreCheckImages,
    SelectCheckImages,
    SummariseFaithfulness,
    record_key,
    with_scores,
)
from transforms.class_stats import ComputeClassStats
from transforms.decode import DecodeImageExamples
from transforms.error_rows import ERRORS_TAG
from transforms.errors import AuditError, one_line
from transforms.exemplars import SelectAuditExemplars
from transforms.heatmap_rows import EXEMPLAR_SOURCES_TAG, FormatHeatmapRows
from transforms.model_handler import ExplainBatches, KerasCamModelHandler
from transforms.records import FanOutRecords, ReadShardRecords
from transforms.sinks import CoalesceRecordBatches, WriteParquetTable
from transforms.strategies import BATCH_ROWS, AddStrategyColumns, FindStrategies
from transforms.tables import REGISTRY, TABLES

_LOG = logging.getLogger(__name__)


class ModelInfo:
    """What the launcher learnt about the model (plain values, pickles small).

    Attributes:
      input_shape: (H, W, C) every image is decoded to: the model's input, H
        and W from --image_size when the model's are dynamic; C = 1 or 3.
      input_dtype: the model's input dtype (the explainer casts to it).
      keras: which Keras loaded the model, e.g. "keras 3.15.1" or "tf_keras 2.21.0".
      custom_code: (file, source) of each --custom_objects file, carried to the workers.
    """

    def __init__(self, explainer, fingerprint: str, custom_code: tuple = ()):
        from transforms.cam.layers import keras_module

        km = keras_module(explainer.model)
        self.target_layer = explainer.target_layer
        self.target_layer_reason = explainer.target_layer_reason
        layout = explainer.token_layout
        self.token_layout = layout.as_json() if layout is not None else None
        self.output = {"index": explainer.output_index, "name": explainer.output_name,
                       "count": len(explainer.model.outputs)}
        self.input_shape = explainer.input_shape
        self.input_dtype = explainer.input_dtype
        self.cam_shape = explainer.cam_shape
        self.num_classes = explainer.num_classes
        self.head = explainer.head
        self.keras = f"{km.__name__} {km.__version__}"
        self.fingerprint = fingerprint
        self.custom_code = custom_code

    @property
    def token_grid(self):
        """(h, w) of the patch grid the launcher found for a token target layer, else None."""
        return (self.token_layout["height"], self.token_layout["width"]) if self.token_layout else None

    @property
    def prefix_tokens(self):
        return self.token_layout["prefix"] if self.token_layout else None

    @property
    def token_layout_text(self) -> str:
        t = self.token_layout
        return f"{t['prefix']} prefix token(s) + {t['height']}x{t['width']} patch grid ({t['source']})" if t else ""

    def explainer_options(self) -> dict:
        """What a worker's CamExplainer needs beyond the layer to explain exactly what the launcher checked."""
        return {"token_grid": self.token_grid, "prefix_tokens": self.prefix_tokens, "output": self.output["index"]}

    def as_json(self) -> dict:
        """The manifest's model section: the --custom_objects files by name and source hash, not their source."""
        from transforms.custom_code import source_digest

        fields = dict(vars(self))
        fields["custom_objects"] = [{"file": path, "sha256": source_digest(source)}
                                    for path, source in fields.pop("custom_code")]
        return fields


def match_shards(pattern: str) -> list[str]:
    """The files a glob matches (local or gs://), sorted; AuditError if none."""
    try:
        results = FileSystems.match([pattern])[0].metadata_list
    except (OSError, ValueError) as exc:
        raise AuditError(f"--input {pattern!r}: could not list files: {exc}") from exc
    files = sorted(m.path for m in results)
    if not files:
        raise AuditError(f"--input: expected TFRecord shards, the pattern {pattern!r} matches no file")
    return files


def inspect_model(config: AuditConfig) -> ModelInfo:
    """Loads the model and traces its CAM function once in the launcher.

    Every model the job could not explain fails here, before the job starts,
    with one line (AuditError, exit status 2), never as a traceback inside a
    Beam stage: the workers repeat exactly this load and trace.
    """
    from transforms.cam.explainer import CamExplainer
    from transforms.cam.targets import check_label_format
    from transforms.custom_code import read_custom_code
    from transforms.model_loading import load_keras_model, model_fingerprint

    check_label_format(config.target, config.label_format)  # before the model loads: seconds, one line
    custom_code = read_custom_code(config.custom_objects)
    try:
        model = load_keras_model(config.model, weights=config.weights, safe_mode=not config.unsafe_model,
                                 custom_code=custom_code)
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a loader raises, the launch stops with one line
        raise AuditError(f"--model {config.model}: could not be loaded ({one_line(exc)})") from exc
    try:
        explainer = CamExplainer(
            model,
            target_layer=config.target_layer,
            method=config.method,
            target=config.target,
            preprocess=config.preprocess,
            image_size=config.image_size,
            token_grid=config.token_grid,
            prefix_tokens=config.prefix_tokens,
            output=config.model_output,
        )
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure to build/trace the CAM function is the model's
        raise AuditError(f"--model {config.model}: the CAM function cannot be built for it ({one_line(exc)})") from exc
    return ModelInfo(explainer, model_fingerprint(config.model, config.weights), custom_code)


def read_class_names(path: Optional[str]) -> list[str]:
    if not path:
        return []
    with FileSystems.open(path) as handle:
        return [line.strip() for line in handle.read().decode("utf-8").splitlines() if line.strip()]


class ExplainDataset(beam.PTransform):
    """PCollection[shard path] -> {table name: its rows, for every table of `transforms.tables.REGISTRY`
    (Arrow RecordBatches for a table with `batches`, dicts otherwise), "records_read": the job's count of the
    records read, and "faithfulness": the faithfulness summary when the checks run}."""

    def __init__(self, config: AuditConfig, info: ModelInfo, class_names: list[str]):
        super().__init__()
        self._config = config
        self._info = info
        self._class_names = class_names

    def handler(self) -> KerasCamModelHandler:
        c = self._config
        return KerasCamModelHandler(
            c.model,
            weights=c.weights,
            safe_mode=not c.unsafe_model,
            custom_code=self._info.custom_code,
            target_layer=self._info.target_layer,
            method=c.method,
            target=c.target,
            preprocess=c.preprocess,
            image_size=self._info.input_shape[:2],
            **self._info.explainer_options(),
            batch_size=c.batch_size,
            jit_compile=c.jit_compile,
            large_model=c.large_model,
            mixed_precision=c.mixed_precision,
            label_format=c.label_format,
        )

    def expand(self, shards):
        c = self._config
        read = (
            shards
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadRecords" >> beam.ParDo(ReadShardRecords()).with_outputs(ERRORS_TAG, main="records")
        )
        records = read.records
        if c.reshuffle_records == "on":  # every worker gets records, whatever the shard count (docs/scale.md)
            records = records | "FanOutRecords" >> FanOutRecords()
        decoded = records | "DecodeImages" >> beam.ParDo(
            DecodeImageExamples(
                image_key=c.image_key,
                label_key=c.label_key,
                id_key=c.id_key,
                label_offset=c.label_offset,
                num_classes=self._info.num_classes,
                max_image_pixels=c.max_image_pixels,
                require_label=c.target.needs_label,
                label_format=c.label_format,
            )
        ).with_outputs(ERRORS_TAG, main="images")
        # ExplainBatches overlaps each batch's TensorFlow work with this thread's Python work and emits
        # each batch as one element; RunInference serves one model to all of a machine's processes
        # (--large_model) and emits one result per image, gathered back into batches of the batch size.
        if c.large_model:
            explained = (decoded.images | "ExplainImages" >> RunInference(self.handler())
                         | "GatherExplained" >> beam.BatchElements(min_batch_size=c.batch_size,
                                                                   max_batch_size=c.batch_size))
        else:
            explained = decoded.images | "ExplainImages" >> beam.ParDo(ExplainBatches(self.handler()))
        # One Arrow batch of heatmap rows per explained batch, made from its arrays (no dict per row).
        rows = (
            explained
            | "FormatHeatmapRows"
            >> beam.ParDo(
                FormatHeatmapRows(method=c.method, target_layer=self._info.target_layer,
                                  thresholds=c.flags, exemplar_sources=True,
                                  label_threshold=c.multilabel_threshold())
            ).with_outputs(ERRORS_TAG, EXEMPLAR_SOURCES_TAG, main="rows")
        )
        errors = (read[ERRORS_TAG], decoded[ERRORS_TAG], rows[ERRORS_TAG]) | "CollectErrors" >> beam.Flatten()
        # Those gathered into batches of BATCH_ROWS rows (a concatenation of Arrow buffers; the steps after
        # cost per batch): what the strategies' assignment waits with (a stage boundary), what the class
        # statistics are computed from in numpy, and what the heatmaps table is written from.
        batches = rows.rows | "BatchRows" >> CoalesceRecordBatches(BATCH_ROWS)
        scored, sanity = self.checks(batches)
        strategies = batches | "FindStrategies" >> FindStrategies(c.strategies, batched=True)
        heatmaps = strategies["heatmaps"]
        if scored is not None:  # the few scored rows' columns, filled as the batches go to the sink
            heatmaps = heatmaps | "AddFaithfulnessScores" >> beam.Map(
                with_scores, beam.pvalue.AsDict(scored | "KeyScoresByRecord" >> beam.Map(record_key)))
        stats = (
            batches
            | "ComputeClassStats" >> ComputeClassStats(self._class_names, c.flags,
                                                       c.multilabel_threshold(), faithfulness=scored)
            | "AddStrategyColumns" >> AddStrategyColumns(strategies["clusters"])
        )
        exemplars = (rows[EXEMPLAR_SOURCES_TAG], stats, strategies["exemplar_candidates"]) | "SelectExemplars" >> SelectAuditExemplars(
            method=c.method, target_layer=self._info.target_layer, image_key=c.image_key,
            thresholds=c.flags,
        )
        outputs = {"heatmaps": heatmaps, "class_stats": stats, "clusters": strategies["clusters"],
                   "errors": errors, "exemplars": exemplars,
                   # the job's own count of what it read: the tables must account for every record
                   "records_read": read.records | "CountRecordsRead" >> beam.combiners.Count.Globally()}
        for table in REGISTRY:  # tables made from another output's rows (transforms.tables.Table.derive)
            if table.derive is not None:
                outputs[table.name] = outputs[table.source] | f"Make{table.step}" >> table.derive(c)
        if c.checks.faithfulness_sample > 0 or c.checks.sanity_images > 0:
            pipeline = batches.pipeline
            scores = scored if scored is not None else pipeline | "NoFaithfulnessScores" >> beam.Create([])
            checks = sanity if sanity is not None else pipeline | "NoSanityCheck" >> beam.Create([])
            outputs["faithfulness"] = (scores, checks) | "SummariseFaithfulness" >> SummariseFaithfulness(
                c.checks.faithfulness_sample, max_images=c.checks.faithfulness_images if scored is not None else 0)
        return outputs

    def checks(self, batches):
        """(faithfulness score rows or None, the sanity check's one dict or None): both from one sample of
        the images with the smallest id hashes, chosen over the heatmap batches without pixels; its records
        are read again after the main pass, so the checks cost their images' model passes and no more."""
        c = self._config
        faithfulness = c.checks.faithfulness_images if c.checks.faithfulness_sample > 0 else 0
        sanity_images, settings = c.checks.sanity_images, None
        if sanity_images > 0:
            settings = {"model_uri": c.model, "weights": c.weights, "safe_mode": not c.unsafe_model,
                        "custom_code": self._info.custom_code,
                        "target_layer": self._info.target_layer, "method": c.method, "preprocess": c.preprocess,
                        "image_size": tuple(self._info.input_shape[:2])}
            settings.update(self._info.explainer_options())  # the token layout and the output, as the workers'
        k = max(faithfulness, sanity_images)
        if k == 0:
            return None, None
        sample = batches | "SelectCheckImages" >> SelectCheckImages(k)
        scored = sanity = None
        if faithfulness:
            scored = sample | "ScoreFaithfulness" >> beam.ParDo(ScoreCheckImages(
                self.handler(), c.checks.faithfulness_sample, faithfulness, c.image_key, c.batch_size))
        if sanity_images:
            sanity = sample | "CheckSanity" >> beam.ParDo(RunSanityCheck(
                settings, c.checks.max_sanity_correlation, sanity_images, c.image_key, c.batch_size))
        return scored, sanity


def clear_outputs(output: str, run_id: Optional[str] = None) -> None:
    """Removes what an earlier run into the same place left behind.

    With `run_id` (the history layout, `pipeline.runs.history`): the temp folders
    of crashed earlier attempts at that run; the finished run itself is only
    replaced by the new one's swap. Without: the tables and manifest written
    straight into `output`.
    """
    from pipeline.runs.manifest import MANIFEST_NAME

    if run_id is not None:
        from pipeline.runs.history import clear_temps

        clear_temps(output, run_id)
        return
    stale = [m.path for t in TABLES for m in FileSystems.match([f"{output}/{t}/*"])[0].metadata_list]
    for name in (MANIFEST_NAME, FAITHFULNESS_SUMMARY):
        if FileSystems.exists(f"{output}/{name}"):
            stale.append(f"{output}/{name}")
    if stale:
        FileSystems.delete(stale)


def build(pipeline: beam.Pipeline, config: AuditConfig, info: ModelInfo, files: list[str], class_names: list[str],
          finalize: Optional[dict] = None):
    """Adds the whole audit to `pipeline`; returns the output PCollections.

    With `finalize` (`pipeline.finalize.launch_settings`), the last stage finalises the run once every
    table is written (`pipeline.finalize.FinalizeRun`)."""
    outputs = (
        pipeline
        | "ListShards" >> beam.Create(files)
        | "ExplainDataset" >> ExplainDataset(config, info, class_names)
    )
    run_id = config.run_id  # a plain setting: every table's run_id column (transforms.sinks.WriteParquetTable)
    written = [  # one Write<Table> per table of the registry (transforms.tables)
        outputs[table.name] | f"Write{table.step}" >> WriteParquetTable(
            config.output, table.name, table.schema_for(config.multilabel), batches=table.batches, run_id=run_id)
        for table in REGISTRY
    ]
    if "faithfulness" in outputs:
        name, suffix = FAITHFULNESS_SUMMARY.rsplit(".", 1)
        written.append(
            outputs["faithfulness"]
            | "SummaryToJson" >> beam.Map(lambda summary: json.dumps(summary, default=str))
            | "WriteFaithfulnessSummary" >> beam.io.WriteToText(
                f"{config.output}/{name}", file_name_suffix=f".{suffix}", num_shards=1, shard_name_template=""
            )
        )
    if finalize is not None:
        from pipeline.finalize import FinalizeRun

        outputs["finalized"] = pipeline | "FinalizeRun" >> FinalizeRun(finalize, written, outputs["records_read"])
    return outputs


RUN_ID_PLACEHOLDER = "{run_id}"


def resolve_input(pattern: Optional[str], run_id: str) -> Optional[str]:
    """--input with `{run_id}` replaced by the run's id (e.g. gs://b/tfrecords/dt={run_id}/*.tfrecord: a
    nightly job reads the day's partition), resolved when the job is launched."""
    return pattern.replace(RUN_ID_PLACEHOLDER, run_id) if pattern else pattern


def check_template(beam_args: list) -> None:
    """Refuses a classic Dataflow template (--template_location outside the Flex launcher) in one line."""
    import os

    from pipeline.runners import option_values

    if option_values(beam_args, "--template_location") and not os.environ.get(FLEX_TEMPLATE_ENV):
        raise AuditError(
            "--template_location: a classic Dataflow template would freeze the run id and the shard list of "
            "the day it is built (every launch would rewrite one run=<id>/); build the Flex Template instead "
            "(templates/flex/, docs/dataflow.md), which resolves them at each launch; --dry_run=true builds "
            "the job offline")


def prepare(config: AuditConfig):
    """Resolves the demo, the shards, the model and the class names (start-up checks)."""
    if config.is_demo:
        from pipeline.demo import ensure_demo

        demo = ensure_demo(config.demo_dir)
        config.input, config.model = demo.input_pattern, demo.model_path
        config.class_names = config.class_names or demo.class_names_path
        config.output = config.output or demo.output_dir
    if not config.output:
        raise AuditError("--output: expected a folder (local or gs://), none given")
    config.output = config.output.rstrip("/")
    if not config.run_id:  # resolved now, at launch (a Flex Template runs this at every launch)
        from pipeline.runs.history import default_run_id

        config.run_id = default_run_id()
    config.input = resolve_input(config.input, config.run_id)
    files = match_shards(config.input)
    info = inspect_model(config)
    _LOG.info("Target layer: %s (%s), maps of %dx%d%s", info.target_layer, info.target_layer_reason,
              *info.cam_shape, f"; tokens: {info.token_layout_text}" if info.token_layout else "")
    return files, info, read_class_names(config.class_names)


def build_job_only(config: AuditConfig, beam_args: list, info: ModelInfo, files: list, class_names: list,
                   settings: dict):
    """Builds (and for a template, saves) the Dataflow job without running it; nothing is written or deleted.

    The job is the same as a launched one: tables into the run's temp folder, then its last stage
    (FinalizeRun) writes the manifest, the comparison and the report and moves the run into place, with
    no launcher. --template_location comes only from the Flex Template's launcher (`check_template`
    refuses classic templates), which runs this at each launch: the run id and the shards are that launch's.
    Returns (PipelineResult or None, a short description instead of a manifest).
    """
    from pipeline.runs import history

    work = dataclasses.replace(config, output=settings["work_dir"])
    final = history.run_dir(config.output, config.run_id)
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build(pipeline, work, info, files, class_names, finalize=settings)
    result = pipeline.run()
    template = PipelineOptions(beam_args).get_all_options().get("template_location")
    return result, {
        "job_only": True,
        "state": str(getattr(result, "state", "")),
        "template_location": template,
        "message": f"Dataflow job built, not run ({'template saved to ' + template if template else 'dry run'}); "
                   f"it would write its tables to {settings['work_dir']}/ and finalise them into {final}/.",
        "output": final,
        "tables": {t: f"{final}/{t}/" for t in TABLES},
        "shards": files,
        "model": {"uri": config.model, "fingerprint": info.fingerprint, **info.as_json()},
        "options": config.as_json(),
        "beam_args": beam_args,
    }


def run(argv: Optional[list[str]] = None, test_pipeline: Optional[beam.Pipeline] = None):
    """Runs the audit; returns (PipelineResult, manifest dict).

    The job writes the run to a temp folder beside `<output>/run=<run_id>/` and its last stage
    finalises it (`pipeline.finalize`): manifest, comparison, report, `_SUCCESS`, the move into place,
    the runs.json entry. Waiting (the default), this returns the manifest the job wrote; with
    --wait=false it returns once the job is submitted, with {"submitted": True, "job": ..., "message"}.
    """
    import uuid

    from pipeline import finalize
    from pipeline.runs import history

    config, beam_args = parse_args(argv)
    check_template(beam_args)
    started = time.time()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    files, info, class_names = prepare(config)
    work_dir = history.temp_dir(config.output, config.run_id)
    settings = finalize.launch_settings(config, info, files, beam_args, work_dir=work_dir, started_at=started_at,
                                        started=started, attempt=uuid.uuid4().hex)
    if only_builds_job(beam_args):  # Dataflow --dry_run / --template_location: build the job only
        return build_job_only(config, beam_args, info, files, class_names, settings)
    clear_outputs(config.output, config.run_id)
    work = dataclasses.replace(config, output=work_dir)
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    build(pipeline, work, info, files, class_names, finalize=settings)
    try:
        with show_progress(beam_args, files):  # a progress line on a terminal, local runners only
            result = pipeline.run()  # in-process runners (FnApiRunner, DirectRunner) run the whole job here
            job = job_identity(result, beam_args)  # the runner's job id, logged even in the quiet mode
            log_job(job, _LOG)
            finalize.record_job(work_dir, job)  # for the job's last stage, which cannot ask the runner
            if not config.wait:
                return result, submitted(config, job)
            result.wait_until_finish()
    except BaseException:
        if finalize.started_stage(work_dir):  # every table was written: keep them for pipeline.finalize
            _LOG.error("The job failed in its last stage; the tables are complete in %s: `python -m "
                       "pipeline.finalize --output %s --run_id %s` finishes the run", work_dir, config.output,
                       config.run_id)
        else:
            history.delete_folder(work_dir)
        raise
    manifest = finalize.read_finalised(config.output, config.run_id, settings["attempt"])
    if history.folder_exists(work_dir):  # only a job-id note written after the job had moved the run
        history.delete_folder(work_dir)
    return result, manifest


def submitted(config: AuditConfig, job: dict) -> dict:
    """What `run` returns with --wait=false: the job, where its run will appear."""
    from pipeline.runs import history

    final = history.run_dir(config.output, config.run_id)
    where = f"job {job['id']} on {job['runner']}" if job.get("id") else f"the job ({job.get('runner')}, in this process)"
    return {"submitted": True, "job": job, "run_id": config.run_id, "output": final,
            "options": config.as_json(),
            "message": f"Submitted {where}; it finalises run {config.run_id} into {final}/ and "
                       f"{config.output}/runs.json on its own."}
