"""Airflow DAG: the nightly Grad-CAM audit on Dataflow (Flex Template) and on a Flink cluster.

Copy into your DAGs folder and edit the constants. Needs apache-airflow-providers-google (Dataflow)
and nothing else for the Flink task (a BashOperator on a worker where `python -m pipeline` is
installed; use a KubernetesPodOperator with the worker image instead if your workers lack it).
docs/scheduling.md explains each choice; tests/test_airflow_dag.py only checks that this compiles.

Run ids: `{{ ds }}` (the DAG run's logical date) makes each DAG run its own `run=<ds>/`, so backfills
and retries of a night land in that night's run (a retry replaces it); the audit's own default would
be the date the job starts instead.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

PROJECT = "my-project"
REGION = "europe-west1"
BUCKET = "gs://my-bucket"
TEMPLATE = f"{BUCKET}/templates/gradcam-audit.json"  # gcloud dataflow flex-template build (docs/dataflow.md)
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/audit/gradcam-audit-flex:2.77.0-gpu"
OUTPUT = f"{BUCKET}/gradcam-audit"

with DAG(
    dag_id="gradcam_audit_nightly",
    schedule="30 2 * * *",  # UTC
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    default_args={"retries": 2, "retry_delay": datetime.timedelta(minutes=10)},
    tags=["gradcam-audit"],
) as dag:
    # Dataflow: the operator launches the Flex Template and (wait_until_finished) polls the job until it
    # ends; the job finalises its run itself (manifest, comparison, report, runs.json), so the launcher
    # inside the template does not wait (wait=false). A flagged comparison does not fail the job: its
    # verdict is runs.json's comparison_flagged (read it in a downstream task to alert or branch).
    dataflow_audit = DataflowStartFlexTemplateOperator(
        task_id="gradcam_audit_dataflow",
        project_id=PROJECT,
        location=REGION,
        wait_until_finished=True,
        deferrable=False,  # True frees the Airflow worker while the job runs (triggerer needed)
        body={
            "launchParameter": {
                "jobName": "gradcam-audit-{{ ds_nodash }}",
                "containerSpecGcsPath": TEMPLATE,
                "parameters": {
                    "input": f"{BUCKET}/tfrecords/dt={{{{ ds }}}}/val-*",  # or dt={run_id}/... (launch date)
                    "model": f"{BUCKET}/models/classifier.keras",
                    "class_names": f"{BUCKET}/models/class_names.txt",
                    "output": OUTPUT,
                    "run_id": "{{ ds }}",
                    "compare_with_previous": "true",
                    "wait": "false",
                    "gpu_type": "nvidia-tesla-t4",
                    "gpu_count": "1",
                },
                "environment": {
                    "sdkContainerImage": IMAGE,
                    "tempLocation": f"{BUCKET}/tmp",
                    "machineType": "n1-standard-8",
                    "maxWorkers": 8,
                },
            }
        },
    )

    # Flink: the command submits to the cluster's job server and waits; its exit status is the verdict:
    # 0 ok, 75 flagged (--flagged_exit_code), 2 bad option or input, 3 the job failed, 130 interrupted.
    # Any non-zero status fails the task; retries=0 so that a flagged audit alerts instead of re-running.
    # EXTERNAL workers (not LOOPBACK): the job survives this task being killed or timed out and still
    # finalises its run (`python -m pipeline.finalize` redoes that stage if it failed).
    flink_audit = BashOperator(
        task_id="gradcam_audit_flink",
        bash_command=(
            "cd /opt/gradcam-audit && .venv/bin/python -m pipeline"
            " --runner=flink --job_endpoint=flink-jobserver:8099"
            " --environment_type=EXTERNAL --environment_config=beam-workers:50000"
            " --input '/data/val/dt={{ ds }}/*.tfrecord' --model /models/current.keras"
            " --output /data/audits --run_id {{ ds }}"
            " --compare_with_previous=true --flagged_exit_code=75 --quiet"
        ),
        retries=0,  # 75 (flagged) must not re-run the audit
    )
