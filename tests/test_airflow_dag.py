"""The Airflow DAGs in templates/airflow, in a real Airflow (.venv-airflow, made by `make test`).

Airflow runs in its own virtual environment, so these tests drive it in subprocesses:
- one loads the DAG folder with DagBag, as Airflow's DAG processor does, with `[operators]
  default_deferrable` True and False, and prints each DAG's tasks as JSON;
- one triggers runs without a logical date (as `airflow dags trigger` does) in a fresh Airflow
  database and renders every task of them (as `airflow tasks render` does);
- the others run a DAG with `DAG.test` (what `airflow dags test` runs): the local DAG end to end on
  the sample files, the pipelines running in this interpreter's environment; and the Dataflow DAG's
  import against a stand-in for the Dataflow API (below), the other tasks marked successful.

The Airflow installations are throwaway ones in temporary directories. Their task policy
(`airflow_local_settings.py`) retries a failed task at once instead of after the DAG's 10 minutes.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipelines import export_dicom, import_dicom

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "templates" / "airflow"
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin"
CHAIN = {"import_dicom": "make_filter_file", "make_filter_file": "export_dicom"}
DAG_IDS = ("dicom_etl_daily", "dicom_etl_daily_local")
# The Dataflow API's rule for job names.
JOB_NAME = re.compile(r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?")
SETTINGS = {
    "project": "my-project",
    "region": "europe-west4",
    "templates": "gs://my-bucket/templates",
    "image": "europe-west4-docker.pkg.dev/my-project/dicom-etl/dicom-etl:0123456789ab",
    "temp_location": "gs://my-bucket/tmp",
    "landing_pattern": "gs://landing/{ds}/**.dcm",
    "store": "projects/my-project/locations/europe-west4/datasets/imaging/dicomStores/main",
    "metadata_destination": "bq://my-project.imaging.instances",
    "archive": "gs://archive/{ds}",
    "work_prefix": "gs://archive/work",
    "python": "/opt/dicom-etl/.venv/bin/python",
}
TASK_POLICY = """
from datetime import timedelta


def task_policy(task):
    task.retry_delay = timedelta(0)
"""
LOAD = """
import json, sys, time
start = time.monotonic()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.monotonic() - start

def describe(task):
    facts = {"type": type(task).__name__, "upstream": sorted(task.upstream_task_ids),
             "downstream": sorted(task.downstream_task_ids), "retries": task.retries,
             "trigger_rule": str(getattr(task.trigger_rule, "value", task.trigger_rule)),
             "deferrable": getattr(task, "deferrable", None)}
    if hasattr(task, "body"):
        launch = task.body["launchParameter"]
        facts.update(template=launch["containerSpecGcsPath"], parameters=launch["parameters"],
                     environment=launch["environment"], job_name=launch["jobName"],
                     append_job_name=task.append_job_name, wait=task.wait_until_finished)
    if hasattr(task, "py_file"):
        facts.update(command=[task.py_interpreter, *task.py_options, task.py_file], runner=task.runner,
                     options=task.pipeline_options)
    return facts

print(json.dumps({
    "seconds": seconds,
    "import_errors": {str(path): str(error) for path, error in bag.import_errors.items()},
    "dags": {dag_id: {"schedule": [type(dag.timetable).__name__, dag.timetable.expression],
                      "catchup": dag.catchup, "start_date": dag.start_date.isoformat(),
                      "max_active_runs": dag.max_active_runs,
                      "params": {name: dag.params.get_param(name).schema for name in dag.params},
                      "tasks": {task.task_id: describe(task) for task in dag.tasks}}
             for dag_id, dag in bag.dags.items()},
}))
"""
# Runs triggered as `airflow dags trigger` makes them, with or without a logical date, each task
# rendered as `airflow tasks render` renders it; a `day` that is not a date is refused when triggering.
RENDER = """
import json, sys
import pendulum
from airflow.api.common.trigger_dag import trigger_dag
from airflow.cli.commands.task_command import _get_template_context, _get_ti
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
from airflow.serialization.serialized_objects import DagSerialization
from airflow.utils.session import create_session
from airflow.utils.types import DagRunTriggeredByType

manager = DagBundlesManager()
manager.sync_bundles_to_db()
bundle = manager.get_bundle("dags-folder")
bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
sync_bag_to_db(bag, bundle.name, None)
result = {"runs": [], "refused": {}}
for conf, logical_date in json.loads(sys.argv[1]):
    # the DAGs parsed again for each run, as each task runs in a process of its own: rendering changes
    # a task, and the params keep the run's conf
    fresh = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name).dags
    for dag_id, dag in fresh.items():
        with create_session() as session:
            run = trigger_dag(dag_id, conf=conf, logical_date=logical_date and pendulum.parse(logical_date),
                              triggered_by=DagRunTriggeredByType.TEST, session=session)
            facts = {"dag_id": dag_id, "conf": conf, "logical_date": run.logical_date,
                     "data_interval_start": run.data_interval_start, "run_after": run.run_after.isoformat()}
            run_id = run.run_id
        scheduler_dag = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        facts["tasks"] = {}
        for task in dag.tasks:
            ti, _ = _get_ti(scheduler_dag.get_task(task.task_id), -1, logical_date_or_run_id=run_id,
                            create_if_necessary="memory")
            task.render_template_fields(_get_template_context(ti, task))
            facts["tasks"][task.task_id] = {field: getattr(task, field) for field in task.template_fields}
        result["runs"].append(facts)
for day in json.loads(sys.argv[2]):
    try:
        with create_session() as session:
            trigger_dag("dicom_etl_daily", conf={"day": day}, triggered_by=DagRunTriggeredByType.TEST,
                        session=session)
    except Exception as error:
        result["refused"][day] = f"{type(error).__name__}: {error}"
print(json.dumps(result, default=str))
"""
# One run of a DAG, as `airflow dags test DAG_ID --conf CONF` makes it but without a logical date;
# the tasks named by the pattern are marked successful instead of run.
RUN = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags[sys.argv[2]]
run = dag.test(logical_date=None, run_conf=json.loads(sys.argv[3]), mark_success_pattern=sys.argv[4] or None)
print(json.dumps({"state": str(run.state), "logical_date": str(run.logical_date),
                  "tasks": {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number}
                            for ti in run.get_task_instances()}}))
"""


def airflow_env(home: Path) -> dict[str, str]:
    """Airflow's settings for a throwaway installation in `home`, reading only our DAG folder."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    return env


def airflow(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    if not (AIRFLOW_BIN / "python").exists():
        pytest.fail("no .venv-airflow: `make test` makes it (or `make .venv-airflow/.installed`)")
    return subprocess.run(
        [str(AIRFLOW_BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout
    )


def last_json(output: str) -> object:
    """The last line of an Airflow command's stdout (warnings go before it)."""
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow installation with its database made, copied by `installation` for each test."""
    home = tmp_path_factory.mktemp("airflow") / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "airflow_local_settings.py").write_text(TASK_POLICY)
    done = airflow("airflow", "db", "migrate", env=airflow_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    return home


@pytest.fixture
def installation(migrated: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh copy of the migrated installation."""
    home = tmp_path / "airflow"
    shutil.copytree(migrated, home, ignore=shutil.ignore_patterns("logs"))
    return airflow_env(home)


def run_dag(dag_id: str, conf: dict, env: dict[str, str], mark_success: str = "") -> dict:
    start = time.monotonic()
    done = airflow("python", "-c", RUN, str(DAGS), dag_id, json.dumps(conf), mark_success, env=env)
    print(f"{dag_id} run: {time.monotonic() - start:.1f} s")
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    result = last_json(done.stdout)
    assert result["logical_date"] == "None"
    result["log"] = done.stdout + done.stderr
    return result


@pytest.fixture(
    scope="module", params=[False, True], ids=["default_deferrable=False", "default_deferrable=True"]
)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The DAG folder as a DAG processor loads it, where operators do not defer by default and where
    they do (`[operators] default_deferrable`, e.g. AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE=True)."""
    start = time.monotonic()
    env = airflow_env(tmp_path_factory.mktemp("airflow"))
    env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = str(request.param)
    done = airflow("python", "-c", LOAD, str(DAGS), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    print(f"DagBag: {result['seconds']:.1f} s; with interpreter start {time.monotonic() - start:.1f} s")
    result["default_deferrable"] = request.param
    return result


def test_dags_load_without_errors(loaded: dict) -> None:
    assert loaded["import_errors"] == {}
    assert set(loaded["dags"]) == set(DAG_IDS)


def test_the_dataflow_tasks_defer_as_the_deployment_does_the_local_ones_never(loaded: dict) -> None:
    """A deferred launch waits for its job in the triggerer; a deferred DirectRunner pipeline would
    run in the triggerer, so the local DAG's pipelines never defer."""
    for name in ("import_dicom", "export_dicom"):
        launch = loaded["dags"]["dicom_etl_daily"]["tasks"][name]
        assert launch["deferrable"] is loaded["default_deferrable"]
        # waiting: in the task while not deferred (None waits for a batch job's end), else the trigger
        assert launch["wait"] is (False if loaded["default_deferrable"] else None)
        assert loaded["dags"]["dicom_etl_daily_local"]["tasks"][name]["deferrable"] is False


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_daily_import_then_filter_then_export(loaded: dict, dag_id: str) -> None:
    dag = loaded["dags"][dag_id]
    assert dag["schedule"] == ["CronDataIntervalTimetable", "0 0 * * *"]  # the interval: the day just ended
    tasks = dag["tasks"]
    assert set(tasks) == {"import_dicom", "make_filter_file", "export_dicom", "watcher"}
    for upstream, downstream in CHAIN.items():
        assert tasks[upstream]["downstream"] == sorted([downstream, "watcher"])
        assert tasks[downstream]["upstream"] == [upstream]
    assert tasks["import_dicom"]["upstream"] == [] and tasks["export_dicom"]["downstream"] == ["watcher"]
    assert tasks["make_filter_file"]["trigger_rule"] == "all_done"  # exit 3 still archives
    # ... and then the watcher fails the run: the run's state is its last tasks'
    assert tasks["watcher"]["upstream"] == sorted(CHAIN.keys() | CHAIN.values())
    assert tasks["watcher"]["downstream"] == []
    assert tasks["watcher"]["trigger_rule"] == "one_failed" and tasks["watcher"]["retries"] == 0
    assert tasks["import_dicom"]["retries"] == tasks["export_dicom"]["retries"] == 1


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_day_since_the_start_date_one_run_at_a_time(loaded: dict, dag_id: str) -> None:
    dag = loaded["dags"][dag_id]
    assert dag["catchup"] is True and dag["max_active_runs"] == 1
    assert dag["start_date"] == "2026-01-01T00:00:00+00:00"
    assert dag["params"]["day"]["type"] == ["null", "string"] and dag["params"]["day"]["format"] == "date"


def test_dataflow_dag_launches_the_templates(loaded: dict) -> None:
    """The flex template parameters a launch sends are the ones the template's metadata.json lists,
    and each job is named after its DAG, task and day, in every try."""
    tasks = loaded["dags"]["dicom_etl_daily"]["tasks"]
    for name in ("import_dicom", "export_dicom"):
        task = tasks[name]
        assert task["type"] == "DayFlexTemplateJob"
        assert (
            task["job_name"]
            == f"dicom-etl-daily-{name.replace('_', '-')}-{{{{ run_day() | replace('-', '') }}}}"
        )
        assert task["append_job_name"] is False
        assert task["template"].endswith(f"/{name}.json")
        meta = json.loads((ROOT / "templates" / name / "metadata.json").read_text())["parameters"]
        listed = {parameter["name"] for parameter in meta}
        required = {parameter["name"] for parameter in meta if not parameter["isOptional"]}
        assert required <= set(task["parameters"]) <= listed
        assert all(isinstance(value, str) for value in task["parameters"].values())
        assert set(task["environment"]) == {"tempLocation", "sdkContainerImage"}
    assert "metadata_destination" in tasks["import_dicom"]["parameters"]
    assert "filter_file" in tasks["export_dicom"]["parameters"]


def test_local_dag_runs_the_modules(loaded: dict) -> None:
    tasks = loaded["dags"]["dicom_etl_daily_local"]["tasks"]
    for name, module in (("import_dicom", import_dicom), ("export_dicom", export_dicom)):
        task = tasks[name]
        assert task["type"] == "LocalPipeline" and task["runner"] == "DirectRunner"
        assert task["command"][1:] == ["-m", f"pipelines.{name}"]
        required = {option for option, needed in module.PIPELINE.options.items() if needed}
        assert required <= set(task["options"]) <= set(module.PIPELINE.options)


@pytest.fixture(scope="module")
def rendered(migrated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs of both DAGs triggered without a logical date, without and with a `day`, and with one,
    rendered."""
    home = tmp_path_factory.mktemp("airflow") / "home"
    shutil.copytree(migrated, home, ignore=shutil.ignore_patterns("logs"))
    confs = [
        (SETTINGS, None),
        (SETTINGS | {"day": "2026-11-20"}, None),
        (SETTINGS, "2026-11-21T00:00:00+00:00"),
        (SETTINGS | {"day": "2026-11-20"}, "2026-11-22T00:00:00+00:00"),
    ]
    bad_days = ["2026/11/20", "20261120", "2026-11-31", "yesterday"]
    start = time.monotonic()
    done = airflow("python", "-c", RENDER, json.dumps(confs), json.dumps(bad_days), env=airflow_env(home))
    print(f"trigger and render: {time.monotonic() - start:.1f} s")
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return last_json(done.stdout)


def test_a_run_without_logical_date_renders_every_task(rendered: dict) -> None:
    """`airflow dags trigger` without `--logical-date` makes a run with no logical date, data interval,
    `ds` or `ds_nodash`: its day is the last whole day before it was triggered, unless given. A run with
    a logical date does that date's day (Airflow infers a manual run's data interval from the time of
    the trigger, so that is not used)."""
    assert len(rendered["runs"]) == 8
    for run in rendered["runs"]:
        triggered = datetime.datetime.fromisoformat(run["run_after"]).astimezone(datetime.UTC)
        if run["logical_date"] is None:
            assert run["data_interval_start"] is None
            default = (triggered.date() - datetime.timedelta(days=1)).isoformat()
        else:
            default = run["logical_date"][:10]
        day = run["conf"].get("day") or default
        tasks = run["tasks"]
        assert set(tasks) == {"import_dicom", "make_filter_file", "export_dicom", "watcher"}
        assert tasks["make_filter_file"]["op_args"] == [
            f"gs://archive/work/{day}/rows",
            f"gs://archive/work/{day}/studies.txt",
        ]
        if run["dag_id"] == "dicom_etl_daily_local":
            imported = tasks["import_dicom"]["pipeline_options"]
            assert tasks["import_dicom"]["py_interpreter"] == SETTINGS["python"]
            assert imported["input"] == f"gs://landing/{day}/**.dcm"
            assert imported["metadata_destination"] == [
                SETTINGS["metadata_destination"],
                f"gs://archive/work/{day}/rows",
            ]
            assert tasks["export_dicom"]["pipeline_options"]["output"] == f"gs://archive/{day}"
            continue
        for name in ("import_dicom", "export_dicom"):
            launch = tasks[name]["body"]["launchParameter"]
            assert launch["jobName"] == f"dicom-etl-daily-{name.replace('_', '-')}-{day.replace('-', '')}"
            assert JOB_NAME.fullmatch(launch["jobName"])
            assert tasks[name]["project_id"] == SETTINGS["project"]
            assert tasks[name]["location"] == SETTINGS["region"]


def test_dataflow_launches_pass_the_templates_checks(rendered: dict) -> None:
    """Rendered for a day, every parameter a launch sends passes its template's regex, as Dataflow
    checks them before it starts the job."""
    [run] = [
        run
        for run in rendered["runs"]
        if run["dag_id"] == "dicom_etl_daily" and "day" in run["conf"] and run["logical_date"] is None
    ]
    bodies = {name: run["tasks"][name]["body"] for name in ("import_dicom", "export_dicom")}
    for name, body in bodies.items():
        launch = body["launchParameter"]
        assert launch["containerSpecGcsPath"] == f"gs://my-bucket/templates/{name}.json"
        environment = {"tempLocation": SETTINGS["temp_location"], "sdkContainerImage": SETTINGS["image"]}
        assert launch["environment"] == environment
        meta = json.loads((ROOT / "templates" / name / "metadata.json").read_text())["parameters"]
        regexes = {parameter["name"]: parameter["regexes"][0] for parameter in meta}
        for parameter, value in launch["parameters"].items():
            assert re.fullmatch(regexes[parameter], value), (name, parameter, value)
    imported = bodies["import_dicom"]["launchParameter"]["parameters"]
    assert imported["input"] == "gs://landing/2026-11-20/**.dcm"
    rows = "gs://archive/work/2026-11-20/rows"
    assert imported["metadata_destination"] == "bq://my-project.imaging.instances," + rows
    exported = bodies["export_dicom"]["launchParameter"]["parameters"]
    assert exported == {
        "store": SETTINGS["store"],
        "output": "gs://archive/2026-11-20",
        "filter_file": "gs://archive/work/2026-11-20/studies.txt",
        "dead_letter": "gs://archive/work/2026-11-20/dead_letter",
    }


def test_a_day_that_is_not_a_date_is_refused(rendered: dict) -> None:
    assert set(rendered["refused"]) == {"2026/11/20", "20261120", "2026-11-31", "yesterday"}
    for error in rendered["refused"].values():
        assert "day" in error, error


def landing(tmp_path: Path, day: str) -> dict[str, str]:
    """The sample files in the landing folder of `day`, and settings for the local DAG."""
    shutil.copytree(ROOT / "sample", tmp_path / "landing" / day, ignore=shutil.ignore_patterns("*.md"))
    return {
        "day": day,
        "python": sys.executable,
        "landing_pattern": f"{tmp_path}/landing/{{ds}}/**.dcm",
        "store": f"{tmp_path}/store",
        "metadata_destination": f"{tmp_path}/metadata",
        "archive": f"{tmp_path}/archive/{{ds}}",
        "work_prefix": f"{tmp_path}/work",
    }


def test_local_dag_imports_and_archives_the_days_studies(tmp_path: Path, installation: dict) -> None:
    """The whole local DAG on the sample files, in a run of a given day that has no logical date (a
    manual run): what the import stored that day is archived."""
    day = "2026-11-20"
    run = run_dag("dicom_etl_daily_local", landing(tmp_path, day), installation)
    assert run["state"] == "success", run["log"][-5000:]
    assert run["tasks"]["watcher"]["state"] == "skipped"

    stored = sorted(p.relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*.dcm"))
    archived = sorted((tmp_path / "archive" / day).rglob("*.dcm"))
    assert len(stored) == len(archived) == len(list((ROOT / "sample").rglob("*.dcm")))
    studies = {path.parts[1] for path in stored}  # studies/{study}/series/...
    lines = (tmp_path / "work" / day / "studies.txt").read_text().splitlines()
    assert sorted(lines) == sorted(f"/studies/{study}" for study in studies)
    assert {path.relative_to(tmp_path / "archive" / day).parts[0] for path in archived} == studies
    assert list((tmp_path / "work" / day / "rows").glob("*.parquet"))
    assert list((tmp_path / "metadata").glob("*.parquet"))


def test_a_failed_import_fails_the_run(tmp_path: Path, installation: dict) -> None:
    """A landing file that is not DICOM: the import stores the others and exits 3, in both tries;
    the day's studies are still archived, and the watcher fails the run."""
    day = "2026-11-21"
    conf = landing(tmp_path, day)
    (tmp_path / "landing" / day / "not-dicom.dcm").write_bytes(b"this is not a DICOM file\n")
    run = run_dag("dicom_etl_daily_local", conf, installation)
    assert run["state"] == "failed", run["log"][-5000:]
    tasks = {task_id: (task["state"], task["try_number"]) for task_id, task in run["tasks"].items()}
    assert tasks == {
        "import_dicom": ("failed", 2),
        "make_filter_file": ("success", 1),
        "export_dicom": ("success", 1),
        "watcher": ("failed", 1),
    }
    archived = list((tmp_path / "archive" / day).rglob("*.dcm"))
    assert len(archived) == len(list((ROOT / "sample").rglob("*.dcm")))
    letters = [
        json.loads(line)
        for path in (tmp_path / "work" / day / "dead_letter").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert letters and all(Path(letter["uri"]).name == "not-dicom.dcm" for letter in letters)


class Dataflow:
    """A stand-in for the Dataflow REST API (v1b3) calls the DAG makes, after Google's reference:
    `projects.locations.jobs.list` (`filter=ACTIVE`: the jobs not in a terminal state, oldest first,
    a page at a time with `nextPageToken`), `projects.locations.jobs.get`, and
    `projects.locations.flexTemplates.launch`, which gives the active job of the name if there is one
    ("only one active job with a given name can exist in a project within one region"). A job reaches
    the state `ends` gives it (default JOB_STATE_DONE) when it is first read by id after its listing
    or launch; every request is kept in `requests`."""

    TERMINAL = {"JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_UPDATED"}
    TERMINAL |= {"JOB_STATE_DRAINED"}
    PAGE = 2

    def __init__(self, jobs: list[dict], ends: dict[str, str]) -> None:
        self.jobs = {job["id"]: job for job in jobs}
        self.ends = ends
        self.requests: list[tuple[str, str, dict, object]] = []
        self.lock = threading.Lock()

    def answer(self, method: str, path: str, query: dict, body: object) -> tuple[int, dict]:
        with self.lock:
            self.requests.append((method, path, query, body))
            parts = path.split("/")  # ['', 'v1b3', 'projects', P, 'locations', L, ...]
            if parts[:3] != ["", "v1b3", "projects"] or len(parts) < 7 or parts[4] != "locations":
                return 404, error(404, f"no such method: {method} {path}")
            project, location, rest = parts[3], parts[5], parts[6:]
            here = [
                job
                for job in self.jobs.values()
                if (job["projectId"], job["location"]) == (project, location)
            ]
            if method == "GET" and rest == ["jobs"]:
                if query.get("filter") == ["ACTIVE"]:
                    here = [job for job in here if job["currentState"] not in self.TERMINAL]
                here.sort(key=lambda job: job["createTime"])
                start = int(query.get("pageToken", ["0"])[0])
                page: dict = {"jobs": here[start : start + self.PAGE]} if here[start:] else {}
                if start + self.PAGE < len(here):
                    page["nextPageToken"] = str(start + self.PAGE)
                return 200, page
            if method == "GET" and len(rest) == 2 and rest[0] == "jobs":
                job = self.jobs.get(rest[1])
                if job is None:
                    return 404, error(404, f"job {rest[1]} not found")
                job["currentState"] = self.ends.get(job["id"], "JOB_STATE_DONE")
                return 200, job
            if method == "POST" and rest == ["flexTemplates:launch"]:
                name = body["launchParameter"]["jobName"]  # type: ignore[index]
                active = [
                    job for job in here if job["name"] == name and job["currentState"] not in self.TERMINAL
                ]
                if active:
                    return 200, {"job": active[0]}
                job = {
                    "id": f"2026-12-01_00_00_00-{len(self.jobs)}",
                    "name": name,
                    "projectId": project,
                    "location": location,
                    "type": "JOB_TYPE_BATCH",
                    "currentState": "JOB_STATE_QUEUED",
                    "createTime": "2026-12-01T00:00:00Z",
                }
                self.jobs[job["id"]] = job
                return 200, {"job": job}
            return 404, error(404, f"no such method: {method} {path}")


def error(code: int, message: str) -> dict:  # Google's JSON error body
    return {"error": {"code": code, "message": message, "status": "NOT_FOUND"}}


def certificates(directory: Path, host: str) -> tuple[Path, Path]:
    """A CA and a server certificate for `host` signed by it: (ca.pem, server.pem with its key)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(hours=1),
        "not_valid_after": now + datetime.timedelta(days=1),
    }
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicom-etl test CA")])
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / "server.pem").write_bytes(server.public_bytes(pem) + private)
    return directory / "ca.pem", directory / "server.pem"


# Loaded by the Airflow interpreter (sitecustomize on its PYTHONPATH): connections to the Dataflow
# API's host go to the stand-in instead, as an /etc/hosts line would send them; TLS is still checked,
# against the stand-in's CA (HTTPLIB2_CA_CERTS). The provider's hook has no endpoint setting.
REDIRECT = """
import os
import socket

HOST = "dataflow.googleapis.com"
_host, _port = os.environ["DATAFLOW_STAND_IN"].rsplit(":", 1)
TO = (_host, int(_port))
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect


def getaddrinfo(host, port, *args, **kwargs):
    return _getaddrinfo(*(TO if host == HOST else (host, port)), *args, **kwargs)


def connect(sock, address):
    return _connect(sock, TO if isinstance(address, tuple) and address[0] == HOST else address)


socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


@pytest.fixture
def dataflow(tmp_path: Path, installation: dict) -> Iterator[tuple[Dataflow, dict[str, str]]]:
    """A Dataflow stand-in on loopback, and the environment in which Airflow's Google provider reaches
    it, with anonymous credentials for the connection google_cloud_default."""
    ca, server_pem = certificates(tmp_path, "dataflow.googleapis.com")
    api = Dataflow([], {})
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, answer = api.answer(self.command, url.path, urllib.parse.parse_qs(url.query), body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(REDIRECT)
    env = {name: value for name, value in installation.items() if "proxy" not in name.lower()}
    env.update(
        PYTHONPATH=str(tmp_path / "site"),
        DATAFLOW_STAND_IN=f"127.0.0.1:{server.server_address[1]}",
        HTTPLIB2_CA_CERTS=str(ca),
        AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True}}
        ),
    )
    env.update({f"AIRFLOW_VAR_DICOM_ETL_{name.upper()}": value for name, value in SETTINGS.items()})
    yield api, env
    server.shutdown()
    server.server_close()


def job(job_id: str, name: str, state: str, created: str) -> dict:
    return {
        "id": job_id,
        "name": name,
        "projectId": SETTINGS["project"],
        "location": SETTINGS["region"],
        "type": "JOB_TYPE_BATCH",
        "currentState": state,
        "createTime": created,
    }


DAYS_JOB = "dicom-etl-daily-import-dicom-20261120"
OTHER_JOBS = [  # active jobs of other names, and a failed earlier try of the day's
    job(
        "2026-11-20_00_01_00-1",
        "dicom-etl-daily-export-dicom-20261119",
        "JOB_STATE_RUNNING",
        "2026-11-20T00:01:00Z",
    ),
    job("2026-11-21_00_01_00-2", DAYS_JOB, "JOB_STATE_FAILED", "2026-11-21T00:01:00Z"),
    job("2026-11-21_00_02_00-3", DAYS_JOB + "-3f2a9c1e", "JOB_STATE_RUNNING", "2026-11-21T00:02:00Z"),
    job(
        "2026-11-21_00_03_00-4",
        "dicom-etl-daily-import-dicom-20261121",
        "JOB_STATE_PENDING",
        "2026-11-21T00:03:00Z",
    ),
]
RUNNING = job("2026-11-21_00_20_00-5", DAYS_JOB, "JOB_STATE_RUNNING", "2026-11-21T00:20:00Z")


def dataflow_calls(api: Dataflow) -> list[tuple[str, str]]:
    """The stand-in's requests, as (method, what): a listing, a job read or a launch."""
    calls = []
    for method, path, query, body in api.requests:
        if path.endswith("/jobs"):
            calls.append(
                (method, f"list {query.get('filter', ['ALL'])[0]} {query.get('pageToken', ['0'])[0]}")
            )
        elif path.endswith(":launch"):
            calls.append((method, f"launch {body['launchParameter']['jobName']}"))  # type: ignore[index]
        else:
            calls.append((method, f"get {path.rsplit('/', 1)[1]}"))
    return calls


def test_a_retry_waits_for_the_days_running_job(dataflow: tuple[Dataflow, dict]) -> None:
    """The worker of an earlier try died while its job ran: this try finds the day's job, named after
    the day, among the region's active jobs, and waits for it instead of launching a second."""
    api, env = dataflow
    api.jobs = {job["id"]: dict(job) for job in [*OTHER_JOBS, RUNNING]}
    run = run_dag("dicom_etl_daily", {"day": "2026-11-20"}, env, mark_success="make_filter_file|export_dicom")
    assert run["tasks"]["import_dicom"] == {"state": "success", "try_number": 1}, run["log"][-5000:]
    assert run["state"] == "success"
    calls = dataflow_calls(api)
    assert calls[:3] == [("GET", "list ACTIVE 0"), ("GET", "list ACTIVE 2"), ("GET", f"get {RUNNING['id']}")]
    assert not [call for call in calls if call[0] == "POST"]
    assert "is running already: waiting for it" in run["log"]


def test_a_failed_job_is_the_tries_failure_and_the_retry_launches_the_day_again(
    dataflow: tuple[Dataflow, dict],
) -> None:
    """The day's running job fails: so does the try that waited for it; the retry finds no running
    job of the day and launches one, under the same name."""
    api, env = dataflow
    api.jobs = {job["id"]: dict(job) for job in [*OTHER_JOBS, RUNNING]}
    api.ends = {RUNNING["id"]: "JOB_STATE_FAILED"}
    run = run_dag("dicom_etl_daily", {"day": "2026-11-20"}, env, mark_success="make_filter_file|export_dicom")
    assert run["tasks"]["import_dicom"] == {"state": "success", "try_number": 2}, run["log"][-5000:]
    calls = dataflow_calls(api)
    first_try = [("GET", "list ACTIVE 0"), ("GET", "list ACTIVE 2"), ("GET", f"get {RUNNING['id']}")]
    assert calls[:3] == first_try
    retry = calls[3:]
    assert [call for call in calls if call[0] == "POST"] == [("POST", f"launch {DAYS_JOB}")]
    launch = retry.index(("POST", f"launch {DAYS_JOB}"))
    assert retry[:launch] == [("GET", "list ACTIVE 0"), ("GET", "list ACTIVE 2")]  # no running job of the day
    [launched] = [
        job for job in api.jobs.values() if job["id"] not in {j["id"] for j in [*OTHER_JOBS, RUNNING]}
    ]
    assert launched["name"] == DAYS_JOB and ("GET", f"get {launched['id']}") in retry[launch:]
    [body] = [body for method, _, _, body in api.requests if method == "POST"]
    assert body["launchParameter"]["containerSpecGcsPath"] == "gs://my-bucket/templates/import_dicom.json"
    assert body["launchParameter"]["parameters"]["input"] == "gs://landing/2026-11-20/**.dcm"
