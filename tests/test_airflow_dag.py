"""The Airflow DAGs in templates/airflow, in a real Airflow (.venv-airflow, made by `make test`).

Airflow runs in its own virtual environment, so these tests drive it in subprocesses: one loads the
DAG folder with DagBag and prints each DAG's tasks as JSON; another runs the local DAG end to end with
`airflow dags test` on the sample files, the pipelines running in this interpreter's environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import export_dicom, import_dicom

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "templates" / "airflow"
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin"
CHAIN = {"import_dicom": "make_filter_file", "make_filter_file": "export_dicom"}
SETTINGS = {
    "project": "my-project",
    "region": "europe-west4",
    "templates": "gs://my-bucket/templates",
    "image": "europe-west4-docker.pkg.dev/my-project/dicom-etl/dicom-etl:latest",
    "temp_location": "gs://my-bucket/tmp",
    "landing_pattern": "gs://landing/{ds}/**.dcm",
    "store": "projects/my-project/locations/europe-west4/datasets/imaging/dicomStores/main",
    "metadata_destination": "bq://my-project.imaging.instances",
    "archive": "gs://archive/{ds}",
    "work_prefix": "gs://archive/work",
}
LOAD = """
import json, sys, time
start = time.monotonic()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.monotonic() - start

def describe(task):
    facts = {"type": type(task).__name__, "upstream": sorted(task.upstream_task_ids),
             "downstream": sorted(task.downstream_task_ids),
             "trigger_rule": str(getattr(task.trigger_rule, "value", task.trigger_rule))}
    if hasattr(task, "body"):
        launch = task.body["launchParameter"]
        facts.update(template=launch["containerSpecGcsPath"], parameters=launch["parameters"],
                     environment=launch["environment"], wait=task.wait_until_finished)
    if hasattr(task, "py_file"):
        facts.update(command=[task.py_interpreter, *task.py_options, task.py_file], runner=task.runner,
                     options=task.pipeline_options)
    return facts

def rendered(dag):  # the launches' bodies, rendered as a run of 2026-11-20 with SETTINGS as params
    context = {"params": json.loads(sys.argv[2]), "ds": "2026-11-20", "ds_nodash": "20261120"}
    return {task.task_id: task.render_template(task.body, context, dag.get_template_env())
            for task in dag.tasks if hasattr(task, "body")}

print(json.dumps({
    "seconds": seconds,
    "rendered": rendered(bag.dags["dicom_etl_daily"]),
    "import_errors": {str(path): str(error) for path, error in bag.import_errors.items()},
    "dags": {dag_id: {"schedule": [type(dag.timetable).__name__, dag.timetable.expression],
                      "params": sorted(dag.params),
                      "tasks": {task.task_id: describe(task) for task in dag.tasks}}
             for dag_id, dag in bag.dags.items()},
}))
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
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    start = time.monotonic()
    home = tmp_path_factory.mktemp("airflow")
    done = airflow("python", "-c", LOAD, str(DAGS), json.dumps(SETTINGS), env=airflow_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    print(f"DagBag: {result['seconds']:.1f} s; with interpreter start {time.monotonic() - start:.1f} s")
    return result


def test_dags_load_without_errors(loaded: dict) -> None:
    assert loaded["import_errors"] == {}
    assert set(loaded["dags"]) == {"dicom_etl_daily", "dicom_etl_daily_local"}


@pytest.mark.parametrize("dag_id", ["dicom_etl_daily", "dicom_etl_daily_local"])
def test_daily_import_then_filter_then_export(loaded: dict, dag_id: str) -> None:
    dag = loaded["dags"][dag_id]
    assert dag["schedule"] == ["CronDataIntervalTimetable", "0 0 * * *"]  # {{ ds }}: the day just ended
    tasks = dag["tasks"]
    assert set(tasks) == {"import_dicom", "make_filter_file", "export_dicom"}
    for upstream, downstream in CHAIN.items():
        assert tasks[upstream]["downstream"] == [downstream]
        assert tasks[downstream]["upstream"] == [upstream]
    assert tasks["import_dicom"]["upstream"] == [] and tasks["export_dicom"]["downstream"] == []
    assert tasks["make_filter_file"]["trigger_rule"] == "all_done"  # exit 3 still archives


def test_dataflow_dag_launches_the_templates(loaded: dict) -> None:
    """The flex template parameters a launch sends are the ones the template's metadata.json lists."""
    tasks = loaded["dags"]["dicom_etl_daily"]["tasks"]
    for name in ("import_dicom", "export_dicom"):
        task = tasks[name]
        assert task["type"] == "DataflowStartFlexTemplateOperator" and task["wait"] is True
        assert task["template"].endswith(f"/{name}.json")
        meta = json.loads((ROOT / "templates" / name / "metadata.json").read_text())["parameters"]
        listed = {parameter["name"] for parameter in meta}
        required = {parameter["name"] for parameter in meta if not parameter["isOptional"]}
        assert required <= set(task["parameters"]) <= listed
        assert all(isinstance(value, str) for value in task["parameters"].values())
        assert set(task["environment"]) == {"tempLocation", "sdkContainerImage"}
    assert "metadata_destination" in tasks["import_dicom"]["parameters"]
    assert "filter_file" in tasks["export_dicom"]["parameters"]


def test_dataflow_launches_pass_the_templates_checks(loaded: dict) -> None:
    """Rendered for a day, every parameter a launch sends passes its template's regex, as Dataflow
    checks them before it starts the job."""
    for name, body in loaded["rendered"].items():
        launch = body["launchParameter"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", launch["jobName"])
        assert launch["jobName"].endswith("-20261120")
        assert launch["containerSpecGcsPath"] == f"gs://my-bucket/templates/{name}.json"
        environment = {"tempLocation": SETTINGS["temp_location"], "sdkContainerImage": SETTINGS["image"]}
        assert launch["environment"] == environment
        meta = json.loads((ROOT / "templates" / name / "metadata.json").read_text())["parameters"]
        regexes = {parameter["name"]: parameter["regexes"][0] for parameter in meta}
        for parameter, value in launch["parameters"].items():
            assert re.fullmatch(regexes[parameter], value), (name, parameter, value)
    imported = loaded["rendered"]["import_dicom"]["launchParameter"]["parameters"]
    assert imported["input"] == "gs://landing/2026-11-20/**.dcm"
    rows = "gs://archive/work/2026-11-20/rows"
    assert imported["metadata_destination"] == "bq://my-project.imaging.instances," + rows
    exported = loaded["rendered"]["export_dicom"]["launchParameter"]["parameters"]
    assert exported == {
        "store": SETTINGS["store"],
        "output": "gs://archive/2026-11-20",
        "filter_file": "gs://archive/work/2026-11-20/studies.txt",
        "dead_letter": "gs://archive/work/2026-11-20/dead_letter",
    }


def test_local_dag_runs_the_modules(loaded: dict) -> None:
    tasks = loaded["dags"]["dicom_etl_daily_local"]["tasks"]
    for name, module in (("import_dicom", import_dicom), ("export_dicom", export_dicom)):
        task = tasks[name]
        assert task["type"] == "LocalPipeline" and task["runner"] == "DirectRunner"
        assert task["command"][1:] == ["-m", f"pipelines.{name}"]
        required = {option for option, needed in module.PIPELINE.options.items() if needed}
        assert required <= set(task["options"]) <= set(module.PIPELINE.options)


def test_local_dag_imports_and_archives_the_days_studies(tmp_path: Path) -> None:
    """The whole local DAG on the sample files: what the import stored that day is archived."""
    day = "2026-11-20"
    shutil.copytree(ROOT / "sample", tmp_path / "landing" / day, ignore=shutil.ignore_patterns("*.md"))
    conf = {
        "python": sys.executable,
        "landing_pattern": f"{tmp_path}/landing/{{ds}}/**.dcm",
        "store": f"{tmp_path}/store",
        "metadata_destination": f"{tmp_path}/metadata",
        "archive": f"{tmp_path}/archive/{{ds}}",
        "work_prefix": f"{tmp_path}/work",
    }
    env = airflow_env(tmp_path / "airflow")
    migrated = airflow("airflow", "db", "migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    start = time.monotonic()
    run = airflow(
        "airflow", "dags", "test", "dicom_etl_daily_local", day, "--conf", json.dumps(conf), env=env
    )
    print(f"airflow dags test: {time.monotonic() - start:.1f} s")
    runs = airflow("airflow", "dags", "list-runs", "dicom_etl_daily_local", "-o", "json", env=env)
    [dag_run] = last_json(runs.stdout)
    assert dag_run["state"] == "success", (run.stdout + run.stderr)[-5000:]

    stored = sorted(p.relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*.dcm"))
    archived = sorted((tmp_path / "archive" / day).rglob("*.dcm"))
    assert len(stored) == len(archived) == len(list((ROOT / "sample").rglob("*.dcm")))
    studies = {path.parts[1] for path in stored}  # studies/{study}/series/...
    lines = (tmp_path / "work" / day / "studies.txt").read_text().splitlines()
    assert sorted(lines) == sorted(f"/studies/{study}" for study in studies)
    assert {path.relative_to(tmp_path / "archive" / day).parts[0] for path in archived} == studies
    assert list((tmp_path / "work" / day / "rows").glob("*.parquet"))
    assert list((tmp_path / "metadata").glob("*.parquet"))
