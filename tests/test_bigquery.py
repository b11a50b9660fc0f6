"""The bq:// destination, end to end against a BigQuery API server (bqemulator, with fake-gcs-server
for Beam's load files; see tests/bigquery_emulator.py): the pipelines' rows read back as the Parquet
destination holds them, the three write dispositions, a table widened by a later run (also when
Beam splits the load into several jobs through temporary tables), the view, the seed 002 scenario,
and every job the runs made is one that BigQuery accepts."""

from __future__ import annotations

import datetime
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pydicom.data
import pytest
from apache_beam.io.gcp import bigquery_file_loads
from google.cloud import bigquery, storage

from pipelines import export_metadata
from storage.destination import UIDS
from storage.parquet_table import PARQUET_VIEW
from tests.bigquery_emulator import running_bigquery
from tests.conftest import Run, run_import, run_pipeline
from tests.gcs_emulator import running_emulator
from tests.orthanc_server import Orthanc
from tests.test_metadata import view as parquet_view

PROJECT = "dicom-etl-test"
TEMP = "gs://beam-temp/tmp"
SAMPLE = Path(__file__).resolve().parents[1] / "sample"
CT = SAMPLE / "ct" / "CT_small.dcm"
JAPANESE = Path(pydicom.data.get_charset_files("chrH31.dcm")[0])  # PN with Ideographic and Phonetic


@dataclass
class BigQuery:
    client: bigquery.Client
    gcs: storage.Client


@dataclass
class Dataset:
    server: BigQuery
    name: str

    @property
    def client(self) -> bigquery.Client:
        return self.server.client

    def table(self, name: str = "instances") -> str:
        return f"{PROJECT}.{self.name}.{name}"

    def rows(self, table: str, columns: str = "*", where: str = "TRUE") -> list[dict[str, Any]]:
        query = f"SELECT {columns} FROM `{table}` WHERE {where}"
        return sorted((dict(row.items()) for row in self.client.query(query).result()), key=repr)

    def fields(self, table: str) -> dict[str, dict]:
        return {field.name: field.to_api_repr() for field in self.client.get_table(table).schema}

    def jobs(self) -> list[dict[str, Any]]:
        """The configuration of every job this dataset's runs made (jobs.list), oldest first."""
        found = []
        for job in self.client.list_jobs(all_users=True):
            config = job.to_api_repr()["configuration"]
            kind = next(k for k in ("load", "copy", "query", "extract") if k in config)
            target = config[kind].get("destinationTable", {}).get("datasetId")
            query = config[kind].get("query", "")
            if target == self.name or (f".{self.name}." in query and not query.startswith("SELECT")):
                found.append((job.created, kind, config[kind]))
        return [{"kind": kind, **config} for _, kind, config in sorted(found, key=lambda j: j[0])]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQuery]:
    """fake-gcs-server and bqemulator sharing one directory, both on loopback, for this module."""
    root = tmp_path_factory.mktemp("bigquery")
    (root / "gcs").mkdir()
    with running_emulator(root / "gcs") as gcs, running_bigquery(root / "gcs", PROJECT, root) as client:
        gcs.create_bucket("beam-temp")
        yield BigQuery(client, gcs)


@pytest.fixture
def bq(server: BigQuery, request: pytest.FixtureRequest) -> Iterator[Dataset]:
    """A dataset of the test's own, so that its jobs can be told from other tests' jobs; after the
    test, every job its runs made must be one that BigQuery accepts."""
    name = re.sub(r"\W+", "_", request.node.name).strip("_")[:1000]
    server.client.create_dataset(f"{PROJECT}.{name}")
    dataset = Dataset(server, name)
    yield dataset
    jobs = dataset.jobs()
    print(f"jobs of {request.node.name}:", *summary(jobs), sep="\n  ")  # pytest -rP shows them
    for job in jobs:
        assert_bigquery_accepts(job)


@pytest.fixture(params=["one_load_job", "split_load"])
def split(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Either way of loading: one load job, or, as Beam does for loads past 15 TB or 10,000 files,
    several load jobs into temporary tables copied into the table (Beam's limits made tiny: files
    of one row each, one file a load job)."""
    if request.param == "split_load":
        monkeypatch.setattr(bigquery_file_loads, "_DEFAULT_MAX_FILE_SIZE", 1)
        monkeypatch.setattr(bigquery_file_loads, "_MAXIMUM_SOURCE_URIS", 1)
    return request.param == "split_load"


def assert_bigquery_accepts(job: dict[str, Any]) -> None:
    """BigQuery takes schemaUpdateOptions only on a load with WRITE_APPEND (its default), or with
    WRITE_TRUNCATE into a partition (`table$20260101`); copy jobs take none."""
    if job["kind"] == "copy":
        assert "schemaUpdateOptions" not in job, job
    if job["kind"] == "load" and job.get("schemaUpdateOptions"):
        disposition = job.get("writeDisposition", "WRITE_APPEND")
        partition = "$" in job["destinationTable"]["tableId"]
        assert disposition == "WRITE_APPEND" or (disposition == "WRITE_TRUNCATE" and partition), job


def summary(jobs: list[dict[str, Any]]) -> list[str]:
    """One line per job: kind, disposition, schema update options, and whether into a temporary table."""
    lines = []
    for job in jobs:
        if job["kind"] == "query":
            lines.append(f"query {job['query'].split(' AS')[0].split(chr(10))[0][:60]}")
            continue
        into = job["destinationTable"]["tableId"]
        lines.append(
            f"{job['kind']} {job.get('writeDisposition', '(default)')} "
            f"schemaUpdateOptions={job.get('schemaUpdateOptions', [])} "
            f"into {'a temporary table' if into.startswith('beam_bq_job_') else into}"
        )
    return lines


def run_export_metadata(*args: str, dead_letter: Path) -> Run:
    return run_pipeline(
        export_metadata.main,
        *args,
        f"--temp_location={TEMP}",
        f"--project={PROJECT}",
        dead_letter=dead_letter,
    )


def export_both(bq: Dataset, store: Path, tmp_path: Path, disposition: str, letter: str) -> Run:
    """export_metadata of `store` into the test's table and into the Parquet table `tmp_path/meta`."""
    return run_export_metadata(
        f"--store={store}", f"--destination=bq://{bq.table()}", f"--destination={tmp_path / 'meta'}",
        f"--write_disposition={disposition}", dead_letter=tmp_path / letter,
    )  # fmt: skip


def run_metadata(pipeline: str, *args: str, dead_letter: Path) -> Run:
    """import_dicom or delete_dicom with a BigQuery destination among its metadata destinations."""
    from pipelines import delete_dicom, import_dicom

    main = {"import": import_dicom.main, "delete": delete_dicom.main}[pipeline]
    return run_pipeline(
        main, *args, f"--temp_location={TEMP}", f"--project={PROJECT}", dead_letter=dead_letter
    )


def make_store(tmp_path: Path, name: str, *files: Path) -> Path:
    """A file-layout store holding `files`."""
    inbox = tmp_path / f"{name}-inbox"
    inbox.mkdir()
    for number, file in enumerate(files):
        shutil.copy(file, inbox / f"{number}.dcm")
    run = run_import(f"--input={inbox}/*.dcm", f"--store={tmp_path / name}", dead_letter=tmp_path / "dl")
    assert run.status == 0, run.stdout
    return tmp_path / name


def parquet_rows(directory: Path) -> list[dict[str, Any]]:
    return [row for file in sorted(directory.glob("*.parquet")) for row in pq.read_table(file).to_pylist()]


def same_rows(bigquery_rows: list[dict], parquet: list[dict]) -> None:
    """Row for row and column for column, by SOP Instance UID."""
    ours = {row["SOPInstanceUID"]: row for row in bigquery_rows}
    theirs = {row["SOPInstanceUID"]: row for row in parquet}
    assert ours.keys() == theirs.keys()
    for sop, row in theirs.items():
        for column, value in row.items():
            assert canonical(ours[sop][column]) == canonical(value), (sop, column)


def canonical(value: Any) -> Any:
    """A value as both destinations mean it: BigQuery answers an empty list for a NULL REPEATED
    value, where Parquet keeps the NULL."""
    if isinstance(value, list):
        return [canonical(item) for item in value] or None
    if isinstance(value, dict):  # a field that a record of an older, narrower row lacks is NULL
        return {key: canonical(item) for key, item in value.items() if canonical(item) is not None}
    return value


def test_rows_read_back_from_bigquery_equal_the_parquet_destinations_rows(
    bq: Dataset, tmp_path: Path
) -> None:
    files = sorted(SAMPLE.rglob("*.dcm")) + [JAPANESE]
    store = make_store(tmp_path, "store", *files)

    run = run_export_metadata(
        f"--store={store}", f"--destination=bq://{bq.table()}", f"--destination={tmp_path / 'meta'}",
        dead_letter=tmp_path / "dl",
    )  # fmt: skip

    assert run.status == 0 and run.summary["metadata_rows"] == 2 * len(files), run.stdout
    same_rows(bq.rows(bq.table()), parquet_rows(tmp_path / "meta"))
    fields = bq.fields(bq.table())
    assert [fields[name]["type"] for name in ("StudyDate", "StudyTime", "LastUpdated")] == [
        "DATE", "TIME", "TIMESTAMP",
    ]  # fmt: skip
    assert fields["ContentSequence"]["mode"] == "REPEATED"
    japanese = pydicom.dcmread(JAPANESE)
    (name,) = bq.rows(bq.table(), "PatientName", f"SOPInstanceUID = '{japanese.SOPInstanceUID}'")
    assert name["PatientName"]["Ideographic"]["FamilyName"] == "山田"
    assert name["PatientName"]["Phonetic"]["GivenName"] == "たろう"
    nested = bq.rows(bq.table(), "ContentSequence", "Modality = 'SR'")[0]["ContentSequence"]
    assert any(item.get("ContentSequence") for item in nested)  # a sequence in a sequence item
    sizes = sorted(row["BlobStorageSize"] for row in bq.rows(bq.table(), "BlobStorageSize"))
    assert sizes == sorted(file.stat().st_size for file in store.rglob("*.dcm"))
    assert bq.rows(bq.table(), "StorageClass", "StorageClass IS NOT NULL") == []  # a local file has none
    assert {row["SOPInstanceUID"] for row in bq.rows(f"{bq.table()}_view")} == {
        row["SOPInstanceUID"] for row in parquet_rows(tmp_path / "meta")
    }


def widened_ct(tmp_path: Path) -> Path:
    """CT_small as another instance with a new column (PatientComments) and a new field inside a
    sequence item (OtherPatientIDsSequence.IssuerOfPatientID)."""
    instance = pydicom.dcmread(CT)
    instance.SOPInstanceUID = instance.file_meta.MediaStorageSOPInstanceUID = instance.SOPInstanceUID + ".1"
    instance.PatientComments = "widened"
    instance.OtherPatientIDsSequence[0].IssuerOfPatientID = "widened"
    instance.save_as(tmp_path / "widened.dcm")
    return tmp_path / "widened.dcm"


def view_modified(bq: Dataset) -> datetime.datetime:
    return bq.client.get_table(f"{bq.table()}_view").modified


def test_write_append_widens_the_table_with_new_columns_and_nested_fields(
    bq: Dataset, tmp_path: Path, split: bool
) -> None:
    narrow = make_store(tmp_path, "narrow", CT, *sorted((SAMPLE / "ct").rglob("1*.dcm")))
    wide = make_store(tmp_path, "wide", widened_ct(tmp_path), *sorted((SAMPLE / "mr").rglob("*.dcm")))

    def append(store: Path, letter: str) -> Run:
        return export_both(bq, store, tmp_path, "WRITE_APPEND", letter)

    assert append(narrow, "a").status == 0
    created = view_modified(bq)
    widened = append(wide, "b")
    assert widened.status == 0, widened.stdout
    fields = bq.fields(bq.table())
    assert fields["PatientComments"]["type"] == "STRING"
    assert "IssuerOfPatientID" in {f["name"] for f in fields["OtherPatientIDsSequence"]["fields"]}
    same_rows(bq.rows(bq.table()), parquet_rows(tmp_path / "meta"))
    replaced = view_modified(bq)
    assert replaced > created  # the view was replaced, as the table widened
    assert bq.rows(f"{bq.table()}_view", "PatientComments", "PatientComments IS NOT NULL") == [
        {"PatientComments": "widened"}
    ]

    again = append(narrow, "c")  # nothing new: the same schema, the same view

    assert again.status == 0 and len(bq.rows(bq.table())) == 5 + 9 + 5
    assert view_modified(bq) == replaced
    bq.client.query(f"DROP VIEW `{bq.table()}_view`").result()  # bqemulator's tables.delete fails on a view
    assert append(narrow, "d").status == 0  # a missing view is made again
    assert len(bq.rows(f"{bq.table()}_view")) == 5 + 9
    jobs = bq.jobs()
    assert not any(job.get("schemaUpdateOptions") for job in jobs)
    assert any(job["kind"] == "copy" for job in jobs) == split


def test_write_truncate_replaces_the_rows_and_the_schema(bq: Dataset, tmp_path: Path, split: bool) -> None:
    everything = make_store(tmp_path, "all", *sorted(SAMPLE.rglob("*.dcm")))
    narrow = make_store(tmp_path, "narrow", *sorted((SAMPLE / "ct").rglob("*.dcm")))
    empty = tmp_path / "empty"
    (empty / "studies").mkdir(parents=True)

    def truncate(store: Path, letter: str) -> Run:
        return export_both(bq, store, tmp_path, "WRITE_TRUNCATE", letter)

    assert truncate(everything, "a").status == 0
    assert len(bq.rows(bq.table())) == 19 and "ContentSequence" in bq.fields(bq.table())
    assert truncate(narrow, "b").status == 0  # 5 CT instances

    same_rows(bq.rows(bq.table()), parquet_rows(tmp_path / "meta"))
    assert len(bq.rows(bq.table())) == 5 and "ContentSequence" not in bq.fields(bq.table())
    assert len(bq.rows(f"{bq.table()}_view")) == 5
    nothing = truncate(empty, "c")
    assert nothing.status == 0 and nothing.summary["selected"] == 0, nothing.stdout
    assert bq.rows(bq.table()) == [] and bq.rows(f"{bq.table()}_view") == []
    assert any(job["kind"] == "copy" for job in bq.jobs()) == split


def test_write_empty_fills_an_empty_table_and_refuses_one_with_rows(
    bq: Dataset, tmp_path: Path, split: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path, "store", *sorted(SAMPLE.rglob("*.dcm")))
    uid = bigquery.SchemaField("SOPInstanceUID", "STRING")
    bq.client.create_table(bigquery.Table(bq.table(), schema=[uid]))  # made by hand, still empty
    args = (f"--store={store}", f"--destination=bq://{bq.table()}", f"--destination={tmp_path / 'meta'}")

    filled = run_export_metadata(*args, dead_letter=tmp_path / "a")

    assert filled.status == 0, filled.stdout
    same_rows(bq.rows(bq.table()), parquet_rows(tmp_path / "meta"))
    capsys.readouterr()
    refused = run_export_metadata(
        f"--store={store}", f"--destination=bq://{bq.table()}", dead_letter=tmp_path / "b"
    )
    [line] = capsys.readouterr().err.strip().splitlines()
    assert refused.status == 1
    assert (
        line
        == f"error: the pipeline failed: bq://{bq.table()} is not empty (--write_disposition=WRITE_EMPTY)"
    )
    assert len(bq.rows(bq.table())) == 19
    assert any(job["kind"] == "copy" for job in bq.jobs()) == split


def test_import_and_delete_rows_keep_the_view_as_seed_002_describes(
    bq: Dataset, server: BigQuery, tmp_path: Path
) -> None:
    """A table with a legacy row (no Type, no LastUpdated), then insert, delete, modify and
    re-insert of the same UIDs, in a gs:// store: the BigQuery view always returns what view.sql
    returns from a Parquet table given the same rows."""
    original = pydicom.dcmread(CT)
    uids = {key: original[key].value for key in UIDS.split(", ")}
    legacy = {**uids, "PatientID": "legacy"}
    bq.client.create_table(bigquery.Table(bq.table(), [bigquery.SchemaField(k, "STRING") for k in legacy]))
    assert bq.client.insert_rows_json(bq.table(), [legacy]) == []
    meta = tmp_path / "meta"
    meta.mkdir()
    nulls = {
        "Type": pa.array([None], pa.string()),
        "LastUpdated": pa.array([None], pa.timestamp("us", "UTC")),
    }
    pq.write_table(pa.table({**{k: [v] for k, v in legacy.items()}, **nulls}), meta / "legacy.parquet")
    (meta / "view.sql").write_text(PARQUET_VIEW)
    store = f"gs://{server.gcs.create_bucket(bucket_name(bq)).name}/store"
    destinations = (f"--metadata_destination=bq://{bq.table()}", f"--metadata_destination={meta}")

    def run(pipeline: str, letter: str, *args: str) -> list[tuple]:
        """The run, then the view: BigQuery's, which must be view.sql's."""
        done = run_metadata(pipeline, f"--store={store}", *args, *destinations, dead_letter=tmp_path / letter)
        assert done.status == 0, done.stdout
        rows = [(row["PatientID"], row["Type"]) for row in bq.rows(f"{bq.table()}_view", "PatientID, Type")]
        assert rows == parquet_view(meta, "PatientID, Type")
        return rows

    assert run("import", "a", f"--input={CT}") == [(original.PatientID, "CREATE")]
    (created,) = bq.rows(bq.table(), "StorageClass, BlobStorageSize", "Type = 'CREATE'")
    assert created == {
        "StorageClass": "STANDARD",
        "BlobStorageSize": CT.stat().st_size,
    }  # the stored object's
    target = "/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}/instances/{SOPInstanceUID}".format(
        **uids
    )
    assert run("delete", "b", f"--target={target}") == []
    original.PatientID = "modified"
    original.save_as(tmp_path / "modified.dcm")
    assert run("import", "c", f"--input={tmp_path / 'modified.dcm'}") == [("modified", "CREATE")]
    types = sorted(row["Type"] or "NULL" for row in bq.rows(bq.table(), "Type"))
    assert types == ["CREATE", "CREATE", "DELETE", "NULL"]  # rows are never removed


def test_export_metadata_rows_carry_a_gcs_objects_size_and_storage_class(
    bq: Dataset, server: BigQuery, tmp_path: Path
) -> None:
    bucket = server.gcs.create_bucket(bucket_name(bq))
    instance = pydicom.dcmread(CT)
    layout = (
        "store/studies/{0.StudyInstanceUID}/series/{0.SeriesInstanceUID}/instances/{0.SOPInstanceUID}.dcm"
    )
    cold = bucket.blob(layout.format(instance))
    cold.storage_class = "COLDLINE"  # as a lifecycle rule may leave it
    cold.upload_from_filename(CT)

    run = run_export_metadata(
        f"--store=gs://{bucket.name}/store", f"--destination=bq://{bq.table()}", dead_letter=tmp_path / "dl"
    )

    assert run.status == 0, run.stdout
    assert bq.rows(bq.table(), "StorageClass, BlobStorageSize") == [
        {"StorageClass": "COLDLINE", "BlobStorageSize": CT.stat().st_size}
    ]


def bucket_name(bq: Dataset) -> str:
    return bq.name.replace("_", "-")[:63].strip("-")


def test_import_into_a_dicomweb_store_reports_the_storage_class_it_asked_for(
    bq: Dataset, orthanc: Orthanc, tmp_path: Path
) -> None:
    """A DICOMweb server tells nothing of its storage: the row keeps --storage_class and the size of
    the file stored."""
    run = run_metadata(
        "import", f"--input={CT}", f"--store={orthanc.dicomweb}", "--storage_class=NEARLINE",
        f"--metadata_destination=bq://{bq.table()}", dead_letter=tmp_path / "dl",
    )  # fmt: skip

    assert run.status == 0, run.stdout
    assert bq.rows(bq.table(), "StorageClass, BlobStorageSize") == [
        {"StorageClass": "NEARLINE", "BlobStorageSize": CT.stat().st_size}
    ]


def test_a_bigquery_destination_builds_without_network_or_credentials() -> None:
    options = export_metadata.PIPELINE.parse(
        [
            "--store=gs://no-such-bucket/store",
            "--destination=bq://my-project.imaging.instances",
            "--temp_location=gs://no-such-bucket/tmp",
            "--project=my-project",
        ]
    )
    pipeline = beam.Pipeline(options=options)

    export_metadata.build(pipeline, options)

    names = [t.unique_name for t in pipeline.to_runner_api().components.transforms.values()]
    assert any("Destination1Prepare" in name for name in names)
    assert any("Destination1Finish" in name for name in names)


def test_a_rerun_restores_the_rows_an_interrupted_import_did_not_write(bq: Dataset, tmp_path: Path) -> None:
    """Rows lost to an interruption (here removed from the table, as a run stopped between storing
    and loading leaves them missing): the same import run again writes exactly those, and a clean
    re-run writes none. tests/test_interrupted.py kills real runs with a Parquet destination."""
    inbox = tmp_path / "in"
    shutil.copytree(SAMPLE, inbox)
    arguments = (
        f"--input={inbox}/**.dcm",
        f"--store={tmp_path / 'store'}",
        f"--metadata_destination=bq://{bq.table()}",
    )
    first = run_metadata("import", *arguments, dead_letter=tmp_path / "a")
    stored = first.summary["success"]
    lost = [row["SOPInstanceUID"] for row in bq.rows(bq.table(), "SOPInstanceUID")][:7]
    bq.client.query(f"DELETE FROM `{bq.table()}` WHERE SOPInstanceUID IN UNNEST(@lost)", job_config=(
        bigquery.QueryJobConfig(query_parameters=[bigquery.ArrayQueryParameter("lost", "STRING", lost)])
    )).result()  # fmt: skip

    again = run_metadata("import", *arguments, dead_letter=tmp_path / "b")
    clean = run_metadata("import", *arguments, dead_letter=tmp_path / "c")

    assert (again.status, again.summary["metadata_rows_restored"], again.summary["metadata_rows"]) == (
        0,
        7,
        7,
    )
    view = [row["SOPInstanceUID"] for row in bq.rows(f"{bq.table()}_view", "SOPInstanceUID")]
    assert len(view) == len(set(view)) == stored
    assert (clean.summary["metadata_rows_restored"], clean.summary["metadata_rows"]) == (0, 0)
    assert len(bq.rows(bq.table(), "SOPInstanceUID")) == stored
