"""Daily DICOM ETL: import the day's landing files into the store, then archive the day's studies.

Two DAGs with the same three tasks, one per place the pipelines run:
- `dicom_etl_daily`: on Dataflow, launching the flex templates (DataflowStartFlexTemplateOperator);
- `dicom_etl_daily_local`: on the Airflow worker with the DirectRunner (BeamRunPythonPipelineOperator).

import_dicom >> make_filter_file >> export_dicom:
1. import_dicom stores the files matching `landing_pattern` in `store`, and writes a row per newly
   stored instance both to `metadata_destination` and to the day's own Parquet table
   `{work_prefix}/{ds}/rows`;
2. make_filter_file writes `{work_prefix}/{ds}/studies.txt`, one `/studies/UID` line per study in the
   day's table: the studies that got new instances that day. A retried import stores nothing again
   but its first rows stay, so retries keep the same studies. It runs even when the import failed
   (exit 3 leaves every good instance stored), and skips the export when there is no new study;
3. export_dicom copies those whole studies from `store` to `archive`.

Runs daily just after midnight UTC, for the day that has ended: `{{ ds }}` is that day. Settings: each
is the run's param if given, else the Airflow Variable `dicom_etl_<name>`; `{ds}` in a value is replaced
by the run's day (YYYY-MM-DD). Dead letters go to `{work_prefix}/{ds}/dead_letter`.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

try:  # Airflow 3
    from airflow.sdk import DAG, CronDataIntervalTimetable, Param, task
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.exceptions import AirflowSkipException
    from airflow.models.param import Param
    from airflow.timetables.interval import CronDataIntervalTimetable

GCP_CONN_ID = "google_cloud_default"
SETTINGS = {
    "landing_pattern": "import input: a gs:// (or, locally, a local) pattern, e.g. gs://landing/{ds}/**.dcm",
    "store": "the DICOM store: gs://bucket/prefix, a DICOMweb URL or projects/.../dicomStores/S",
    "metadata_destination": "import's metadata tables, comma-separated: bq://project.dataset.table, gs://...",
    "archive": "export output prefix, e.g. gs://archive/{ds}",
    "work_prefix": "gs:// (or, locally, a local) prefix for the day's rows, filter file and dead letters",
}
DATAFLOW_SETTINGS = {
    "project": "the Google Cloud project of the Dataflow jobs",
    "region": "the Dataflow region",
    "templates": "the gs:// prefix holding the template specs {pipeline}.json (templates/flex.sh build)",
    "image": "the image the templates were built with, for the workers (sdk_container_image)",
    "temp_location": "gs:// temp location of the jobs",
}
LOCAL_SETTINGS = {"python": "a Python with dicom-etl installed, e.g. /opt/dicom-etl/.venv/bin/python"}


def setting(name: str) -> str:
    """Jinja for a setting: the run's param, else the Variable dicom_etl_<name>; {ds} is the run's date."""
    return "{{ (params." + name + " or var.value.dicom_etl_" + name + ") | replace('{ds}', ds) }}"


ROWS = setting("work_prefix") + "/{{ ds }}/rows"
FILTER_FILE = setting("work_prefix") + "/{{ ds }}/studies.txt"
DEAD_LETTER = setting("work_prefix") + "/{{ ds }}/dead_letter"


@task(trigger_rule="all_done")
def make_filter_file(rows: str, filter_file: str) -> int:
    """Write one /studies/UID line per study in the day's rows; skip the export when there is none."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(data), columns=["StudyInstanceUID"]) for data in _parquet_files(rows)]
    studies = sorted({uid for table in tables for uid in table.column(0).to_pylist() if uid})
    if not studies:
        raise AirflowSkipException(f"no new instance in {rows}: nothing to export")
    _write_text(filter_file, "".join(f"/studies/{uid}\n" for uid in studies))
    return len(studies)


def _parquet_files(directory: str) -> list[bytes]:
    """The contents of a local or gs:// Parquet table's *.parquet files (none if it does not exist)."""
    if not directory.startswith("gs://"):
        return [path.read_bytes() for path in sorted(Path(directory).glob("*.parquet"))]
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    hook = GCSHook(gcp_conn_id=GCP_CONN_ID)
    bucket, _, prefix = directory[len("gs://") :].partition("/")
    prefix = prefix.rstrip("/") + "/"
    names = [name for name in hook.list(bucket, prefix=prefix) if name.endswith(".parquet")]
    return [hook.download(bucket, name) for name in sorted(names) if "/" not in name[len(prefix) :]]


def _write_text(uri: str, text: str) -> None:
    if not uri.startswith("gs://"):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
        return
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    bucket, _, name = uri[len("gs://") :].partition("/")
    GCSHook(gcp_conn_id=GCP_CONN_ID).upload(bucket, name, data=text, mime_type="text/plain")


def flex_template(task_id: str, job: str, parameters: dict[str, str]) -> DataflowStartFlexTemplateOperator:
    """Launch the flex template `task_id` and wait for its job: the next task needs its output."""
    return DataflowStartFlexTemplateOperator(
        task_id=task_id,
        project_id=setting("project"),
        location=setting("region"),
        gcp_conn_id=GCP_CONN_ID,
        body={
            "launchParameter": {
                "jobName": job + "-{{ ds_nodash }}",
                "containerSpecGcsPath": setting("templates") + f"/{task_id}.json",
                "parameters": parameters,
                "environment": {
                    "tempLocation": setting("temp_location"),
                    "sdkContainerImage": setting("image"),
                },
            }
        },
        wait_until_finished=True,
    )


class LocalPipeline(BeamRunPythonPipelineOperator):
    """`python -m pipelines.<task_id>` on the DirectRunner, with the interpreter a setting too."""

    template_fields = (*BeamRunPythonPipelineOperator.template_fields, "py_interpreter")

    def __init__(self, *, task_id: str, pipeline_options: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(
            task_id=task_id,
            py_file=f"pipelines.{task_id}",
            py_options=["-m"],
            py_interpreter=setting("python"),
            runner="DirectRunner",
            pipeline_options=pipeline_options,
            **kwargs,
        )


def make_dag(dag_id: str, on_dataflow: bool) -> DAG:
    settings = SETTINGS | (DATAFLOW_SETTINGS if on_dataflow else LOCAL_SETTINGS)
    where = "on Dataflow (flex templates)" if on_dataflow else "on the Airflow worker (DirectRunner)"
    with DAG(
        dag_id=dag_id,
        description=f"Import the day's DICOM files and archive the day's studies, {where}",
        # A run per day, once the day is over: {{ ds }} is that day (Airflow 3's "@daily" would
        # give the day the run starts on, whose landing folder is still empty).
        schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
        params={
            name: Param(None, type=["null", "string"], description=text) for name, text in settings.items()
        },
        doc_md=__doc__,
        tags=["dicom-etl"],
    ) as dag:
        imported = {
            "input": setting("landing_pattern"),
            "store": setting("store"),
            "dead_letter": DEAD_LETTER,
        }
        exported = {"store": setting("store"), "output": setting("archive"), "dead_letter": DEAD_LETTER}
        if on_dataflow:  # template parameters are strings: lists are comma-separated
            import_dicom = flex_template(
                "import_dicom",
                "dicom-import",
                imported | {"metadata_destination": setting("metadata_destination") + "," + ROWS},
            )
            export_dicom = flex_template(
                "export_dicom", "dicom-export", exported | {"filter_file": FILTER_FILE}
            )
        else:
            import_dicom = LocalPipeline(
                task_id="import_dicom",
                pipeline_options=imported | {"metadata_destination": [setting("metadata_destination"), ROWS]},
            )
            export_dicom = LocalPipeline(
                task_id="export_dicom", pipeline_options=exported | {"filter_file": FILTER_FILE}
            )
        import_dicom >> make_filter_file(ROWS, FILTER_FILE) >> export_dicom
    return dag


dicom_etl_daily = make_dag("dicom_etl_daily", on_dataflow=True)
dicom_etl_daily_local = make_dag("dicom_etl_daily_local", on_dataflow=False)
