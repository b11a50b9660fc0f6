"""Daily DICOM ETL: import the day's landing files into the store, then archive the day's studies.

Two DAGs with the same tasks, one per place the pipelines run:
- `dicom_etl_daily`: on Dataflow, launching the flex templates (DataflowStartFlexTemplateOperator);
- `dicom_etl_daily_local`: on the Airflow worker with the DirectRunner (BeamRunPythonPipelineOperator).

import_dicom >> make_filter_file >> export_dicom, and watcher:
1. import_dicom stores the files matching `landing_pattern` in `store`, and writes a row per newly
   stored instance both to `metadata_destination` and to the day's own Parquet table
   `{work_prefix}/{day}/rows`;
2. make_filter_file writes `{work_prefix}/{day}/studies.txt`, one `/studies/UID` line per study in the
   day's table: the studies that got new instances that day. A retried import stores nothing again
   but its first rows stay, so retries keep the same studies. It runs even when the import failed
   (exit 3 leaves every good instance stored), and skips the export when there is no new study;
3. export_dicom copies those whole studies from `store` to `archive`;
4. watcher fails when any other task failed, so that the run fails (a run's state is its last tasks').

The day: the run's `day` param (YYYY-MM-DD) if given, else the day of its logical date, else (a run
triggered without one) the last whole day (UTC) before it was triggered. The DAG runs daily just after
midnight UTC for the day that has ended (its data interval; the logical date is the interval's start),
from START_DATE on, catching up on every day it missed, one run at a time.

Settings: each is the run's param if given, else the Airflow Variable `dicom_etl_<name>`; `{ds}` in a
value is replaced by the run's day. Dead letters go to `{work_prefix}/{day}/dead_letter`.

On Dataflow each job is named `{dag_id}-{task_id}-{YYYYMMDD}` (underscores as hyphens) after its day.
A try that finds the day's job still running (an earlier try's, whose worker died while it waited)
waits for that job instead of launching a second one.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.hooks.dataflow import DataflowJobStatus
from airflow.providers.google.cloud.links.dataflow import DataflowJobLink
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
from airflow.providers.google.cloud.triggers.dataflow import TemplateJobStartTrigger
from jinja2 import pass_context

try:  # Airflow 3
    from airflow.sdk import DAG, CronDataIntervalTimetable, Param, task
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.exceptions import AirflowFailException, AirflowSkipException
    from airflow.models.param import Param
    from airflow.timetables.interval import CronDataIntervalTimetable

# The first day the DAGs import. Set it before unpausing them: the scheduler then runs every day from
# there to yesterday, one run at a time, and after an outage or a pause, every day it missed.
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")
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
DAY = Param(
    None,
    type=["null", "string"],
    format="date",
    pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    description="the day to import and archive, YYYY-MM-DD; default: the logical date's, else yesterday's",
)


@pass_context
def run_day(context: Any) -> str:
    """The run's day, YYYY-MM-DD: its `day` param, else its logical date's day (`ds`: for a scheduled or
    backfill run, the start of its data interval), else the last whole day (UTC) before it was
    triggered: a run triggered without a logical date has neither `ds` nor a data interval.

    A manual run's data interval is not used: Airflow infers it from the time of the trigger (CLI) or
    from the logical date (REST API), so the day would depend on how the run was made."""
    day = context["params"].get("day") or context.get("ds")
    if day:
        return day
    triggered = pendulum.instance(context["dag_run"].run_after).in_timezone("UTC")
    return triggered.start_of("day").subtract(days=1).strftime("%Y-%m-%d")


def setting(name: str) -> str:
    """Jinja for a setting: the run's param, else the Variable dicom_etl_<name>; {ds} is the run's day."""
    return "{{ (params." + name + " or var.value.dicom_etl_" + name + ") | replace('{ds}', run_day()) }}"


ROWS = setting("work_prefix") + "/{{ run_day() }}/rows"
FILTER_FILE = setting("work_prefix") + "/{{ run_day() }}/studies.txt"
DEAD_LETTER = setting("work_prefix") + "/{{ run_day() }}/dead_letter"


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


@task(trigger_rule="one_failed", retries=0)
def watcher() -> None:
    """Fail the run when a task failed: make_filter_file runs after a failed import, and a run whose last
    tasks succeeded would otherwise read as a success."""
    raise AirflowFailException("a task of this run failed (see its log): the run is failed")


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


def job_name(dag_id: str, task_id: str) -> str:
    """Jinja for the Dataflow job of a task's day: `{dag_id}-{task_id}-{YYYYMMDD}`, `_` as `-`."""
    return f"{dag_id}-{task_id}".replace("_", "-").lower() + "-{{ run_day() | replace('-', '') }}"


def active_jobs(service: Any, project_id: str, location: str) -> list[dict]:
    """The region's jobs that are not finished (Dataflow's ACTIVE filter), from a Dataflow API client
    (`DataflowHook.get_conn()`), every page."""
    jobs = service.projects().locations().jobs()
    request = jobs.list(projectId=project_id, location=location, filter="ACTIVE")
    found: list[dict] = []
    while request is not None:
        response = request.execute(num_retries=3)
        found += response.get("jobs", [])
        request = jobs.list_next(previous_request=request, previous_response=response)
    return found


def running_job(jobs: Iterable[dict], name: str) -> dict | None:
    """The job named `name` that has not finished, the newest if there are several, else None."""
    running = [
        job
        for job in jobs
        if job.get("name") == name and job.get("currentState") not in DataflowJobStatus.TERMINAL_STATES
    ]
    return max(running, key=lambda job: job.get("createTime", ""), default=None)


class DayFlexTemplateJob(DataflowStartFlexTemplateOperator):
    """Launch a flex template as the day's job, named by `job_name`, and wait for it (deferred when the
    deployment defers by default: `[operators] default_deferrable`).

    A try that finds the day's job still running, an earlier try's whose Airflow worker died while
    waiting, waits for that job (its end is this try's) instead of launching a second one that would
    import the same files at the same time. (Dataflow, too, keeps one active job of a name in a region.)"""

    def __init__(self, *, task_id: str, dag_id: str, parameters: dict[str, str], **kwargs: Any) -> None:
        super().__init__(
            task_id=task_id,
            project_id=setting("project"),
            location=setting("region"),
            gcp_conn_id=GCP_CONN_ID,
            body={
                "launchParameter": {
                    "jobName": job_name(dag_id, task_id),
                    "containerSpecGcsPath": setting("templates") + f"/{task_id}.json",
                    "parameters": parameters,
                    "environment": {
                        "tempLocation": setting("temp_location"),
                        "sdkContainerImage": setting("image"),
                    },
                }
            },
            append_job_name=False,  # the day's name, the same in every try
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        name = self.body["launchParameter"]["jobName"]
        job = running_job(active_jobs(self.hook.get_conn(), self.project_id, self.location), name)
        if job is None:
            return super().execute(context)
        job_id = job["id"]
        self.log.info("The day's job %s (%s) is running already: waiting for it", name, job_id)
        self.job = job  # on_kill cancels it, as it would a job this try launched
        DataflowJobLink.persist(
            context=context, project_id=self.project_id, region=self.location, job_id=job_id
        )
        if self.deferrable:
            self.defer(
                trigger=TemplateJobStartTrigger(
                    project_id=self.project_id,
                    job_id=job_id,
                    location=self.location,
                    gcp_conn_id=self.gcp_conn_id,
                    poll_sleep=self.poll_sleep,
                    impersonation_chain=self.impersonation_chain,
                    cancel_timeout=self.cancel_timeout,
                    drain_pipeline=self.drain_pipeline,
                    cancel_on_kill=self.cancel_on_kill,
                ),
                method_name="execute_complete",
            )
        self.hook.wait_for_done(
            job_name=name, location=self.location, project_id=self.project_id, job_id=job_id
        )
        context["task_instance"].xcom_push(key="job_id", value=job_id)
        self.job = self.hook.get_job(job_id=job_id, project_id=self.project_id, location=self.location)
        return self.job


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
            # Never deferred: a deferred DirectRunner pipeline would run in the triggerer.
            deferrable=False,
            **kwargs,
        )


def make_dag(dag_id: str, on_dataflow: bool) -> DAG:
    settings = SETTINGS | (DATAFLOW_SETTINGS if on_dataflow else LOCAL_SETTINGS)
    where = "on Dataflow (flex templates)" if on_dataflow else "on the Airflow worker (DirectRunner)"
    with DAG(
        dag_id=dag_id,
        description=f"Import the day's DICOM files and archive the day's studies, {where}",
        # A run per day, once the day is over: its data interval is that day (Airflow 3's "@daily"
        # would give the day the run starts on, whose landing folder is still empty).
        schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
        start_date=START_DATE,
        catchup=True,
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
        params={"day": DAY}
        | {name: Param(None, type=["null", "string"], description=text) for name, text in settings.items()},
        user_defined_macros={"run_day": run_day},
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
            import_dicom = DayFlexTemplateJob(
                task_id="import_dicom",
                dag_id=dag_id,
                parameters=imported | {"metadata_destination": setting("metadata_destination") + "," + ROWS},
            )
            export_dicom = DayFlexTemplateJob(
                task_id="export_dicom", dag_id=dag_id, parameters=exported | {"filter_file": FILTER_FILE}
            )
        else:
            import_dicom = LocalPipeline(
                task_id="import_dicom",
                pipeline_options=imported | {"metadata_destination": [setting("metadata_destination"), ROWS]},
            )
            export_dicom = LocalPipeline(
                task_id="export_dicom", pipeline_options=exported | {"filter_file": FILTER_FILE}
            )
        filter_file = make_filter_file(ROWS, FILTER_FILE)
        import_dicom >> filter_file >> export_dicom
        [import_dicom, filter_file, export_dicom] >> watcher()
    return dag


dicom_etl_daily = make_dag("dicom_etl_daily", on_dataflow=True)
dicom_etl_daily_local = make_dag("dicom_etl_daily_local", on_dataflow=False)
