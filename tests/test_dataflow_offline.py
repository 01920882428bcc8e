"""The Dataflow job, built offline without credentials: a dry run, and the job a Flex Template launch
builds (the Flex launcher runs the main with --template_location=<job file>; classic templates,
--template_location outside it, are refused: tests/test_flex_template.py).

`--runner=dataflow` goes through the shorthand translation (pipeline/runners.py):
setup.py staged as workflow.tar.gz, runner v2, and `--gpu_type/--gpu_count`
become `worker_accelerator=type:...;count:...;install-nvidia-driver`. Inputs
are local files (the launcher lists shards itself: a gs:// glob without
credentials or emulator would hang there); temp/staging locations and the
output are on gcp-storage-emulator. Nothing must be written to the output.
"""

import io
import json
import tarfile

import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline.graph import run
from pipeline.runners import canonical_runner, only_builds_job, translate_runner_args
from tests.infra.gcs_emulator import GcsEmulator
from tests.infra.servers import ListenerWatch

BUCKET = "dataflow-offline"
IMAGE = "us-docker.pkg.dev/demo-project/gradcam/worker:2.77.0-gpu"
ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
STEPS = ("ListShards", "ExplainDataset/ReadRecords", "ExplainDataset/FanOutRecords", "ExplainDataset/DecodeImages", "ExplainDataset/ExplainImages",
         "ExplainDataset/FormatHeatmapRows", "ExplainDataset/ComputeClassStats", "ExplainDataset/CollectErrors",
         "WriteHeatmaps", "WriteClassStats", "WriteErrors", "FinalizeRun", "FinalizeRun/Finalize")
WRITES = ("WriteHeatmaps", "WriteClassStats", "WriteClusters", "WriteErrors", "WriteExemplars")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    emulator = GcsEmulator(BUCKET, log_dir=str(tmp_path_factory.mktemp("gcs-logs")))
    with emulator, ListenerWatch(emulator.server) as watch:
        yield emulator
        assert watch.non_loopback() == []
    assert emulator.server.leftovers() == []


def dataflow_argv(dataset, model_path, gcs, *extra):
    return ["--input", dataset["pattern"], "--model", model_path, "--output", gcs.uri("audits"),
            "--runner=Dataflow", "--project=demo-project", "--region=us-central1",
            f"--temp_location={gcs.uri('tmp')}", "--gpu_type", "nvidia-tesla-t4", "--gpu_count", "1",
            f"--sdk_container_image={IMAGE}", "--machine_type=n1-standard-8", *extra]


def transform_names(pipeline_proto) -> set:
    return {t.unique_name for t in pipeline_proto.components.transforms.values()}


def assert_finalise_waits_for_every_write(pipeline_proto):
    """The finalise stage's inputs (its side inputs) are the outputs of every table's write."""
    transforms = pipeline_proto.components.transforms
    producer = {}
    for transform in transforms.values():
        if not transform.subtransforms:
            for pcoll in transform.outputs.values():
                producer[pcoll] = transform.unique_name
    (finalise,) = [t for t in transforms.values() if t.unique_name == "FinalizeRun/Finalize"]
    fed_by = {producer[p].split("/")[0] for p in finalise.inputs.values()}
    assert set(WRITES) <= fed_by, sorted(fed_by)


def test_shorthands_translate_to_beam_arguments():
    args = translate_runner_args(["--runner=DATAFLOW", "--project=p"], gpu_type="nvidia-l4", gpu_count=2)
    assert args[0] == "--runner=DataflowRunner" and "--project=p" in args
    assert "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:2;install-nvidia-driver" in args
    assert "--experiments=use_runner_v2" in args
    assert any(a.startswith("--setup_file=") and a.endswith("setup.py") for a in args)
    mine = translate_runner_args(["--runner", "dataflow", "--setup_file=/x/setup.py", "--experiments=use_runner_v2"])
    assert [a for a in mine if a.startswith("--setup_file")] == ["--setup_file=/x/setup.py"]
    assert mine.count("--experiments=use_runner_v2") == 1 and "--runner" not in mine
    assert translate_runner_args(["--runner=portable", "--job_endpoint=127.0.0.1:1"])[-1] == "--environment_type=LOOPBACK"
    assert translate_runner_args(["--runner=Flink"]) == [
        "--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=EXTERNAL",
        "--environment_config=localhost:50000"]
    uber = translate_runner_args(["--runner=flink", "--flink_master=127.0.0.1:8081"])
    assert uber[0] == "--runner=FlinkRunner" and "--flink_submit_uber_jar" in uber
    assert translate_runner_args(["--runner=FnApiRunner"]) == ["--runner=FnApiRunner"]
    assert canonical_runner("PortableRunner") == "portable" and canonical_runner("DirectRunner") is None
    with pytest.raises(ValueError, match="only for --runner=dataflow"):
        translate_runner_args(["--runner=FnApiRunner"], gpu_type="nvidia-tesla-t4")
    with pytest.raises(ValueError, match="already sets worker_accelerator"):
        translate_runner_args(["--runner=dataflow", f"--dataflow_service_options={ACCELERATOR}"], gpu_type="x")
    assert "--dry_run=False" not in translate_runner_args(["--runner=dataflow", "--dry_run=False"])
    assert only_builds_job(["--runner=DataflowRunner", "--dry_run=True"])
    assert only_builds_job(["--runner=DataflowRunner", "--template_location=gs://b/t.json"])
    assert not only_builds_job(["--runner=DataflowRunner"]) and not only_builds_job(["--runner=FnApiRunner", "--dry_run=True"])


def test_dry_run_builds_the_gpu_job(dataset, model_path, gcs):
    result, described = run(dataflow_argv(dataset, model_path, gcs, "--dry_run=True"))
    assert described["job_only"] and str(result.state).endswith("DONE")
    proto = result.job.proto_pipeline
    names = transform_names(proto)
    assert set(STEPS) <= names, sorted(names)
    assert_finalise_waits_for_every_write(proto)
    (env,) = [e for e in proto.components.environments.values() if e.urn == "beam:env:docker:v1"]
    assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == IMAGE
    staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
              for d in env.dependencies}
    assert "workflow.tar.gz" in staged
    options = result.job.options.get_all_options()
    assert options["dataflow_service_options"] == [ACCELERATOR]
    assert options["machine_type"] == "n1-standard-8" and "use_runner_v2" in options["experiments"]
    assert options["setup_file"].endswith("setup.py")
    assert gcs.list(gcs.uri("audits")) == []  # a dry run writes nothing


def test_flex_launch_job_holds_accelerator_image_package_steps_and_the_launch_date(dataset, model_path, gcs,
                                                                                 tmp_path, monkeypatch):
    from pipeline.options import FLEX_TEMPLATE_ENV
    from pipeline.runs import history

    monkeypatch.setenv(FLEX_TEMPLATE_ENV, "/opt/gradcam-audit/flex_launch.py")  # as in the launcher image
    monkeypatch.setattr(history, "default_run_id", lambda now=None: "2031-05-05")  # the day of this launch
    template = tmp_path / "job_object"
    result, described = run(dataflow_argv(dataset, model_path, gcs, f"--template_location={template}", "--no_auth",
                                          f"--staging_location={gcs.uri('staging')}"))
    assert described["template_location"] == str(template)
    assert described["output"] == f"{gcs.uri('audits')}/run=2031-05-05"  # resolved at launch, not at build
    job = json.loads(template.read_text())
    env = job["environment"]
    assert env["serviceOptions"] == [ACCELERATOR]
    assert "use_runner_v2" in env["experiments"]
    (pool,) = env["workerPools"]
    assert pool["machineType"] == "n1-standard-8"
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    packages = {p["name"]: p["location"] for p in pool["packages"]}
    assert "workflow.tar.gz" in packages
    staged = gcs.list(gcs.uri("staging"))
    tarball = [u for u in staged if u.endswith("/workflow.tar.gz")]
    assert len(tarball) == 1 and packages["workflow.tar.gz"].endswith(tarball[0].split("/", 3)[3])
    with tarfile.open(fileobj=io.BytesIO(gcs.read(tarball[0]))) as tar:
        members = tar.getnames()
    assert any(m.endswith("pipeline/graph.py") for m in members) and any(m.endswith("transforms/records.py") for m in members)
    # Runner v2 keeps the steps in the staged pipeline proto.
    (pb,) = [u for u in staged if u.endswith("/pipeline.pb")]
    proto = beam_runner_api_pb2.Pipeline.FromString(gcs.read(pb))
    assert set(STEPS) <= transform_names(proto)
    assert_finalise_waits_for_every_write(proto)
    assert b"run=2031-05-05" in gcs.read(pb)  # the tables' temp folder of this launch's run
    assert gcs.list(gcs.uri("audits")) == []
