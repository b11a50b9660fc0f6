"""The metadata table on a Parquet destination, queried with DuckDB running view.sql: the seed 002
scenario, export_metadata from every kind of store, filters, dispositions and the column limit."""

from __future__ import annotations

import datetime
import glob
import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from storage.file_store import FileLayoutStore
from storage.parquet_table import PARQUET_VIEW
from storage.staging import HOST, SPOOL_ROOT, STAGING
from tests.conftest import Run, run_export, run_import, run_pipeline
from tests.orthanc_server import Orthanc
from tests.test_export import a_filter, exported

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
CT = SAMPLE / "ct" / "CT_small.dcm"


def run_delete(*args: str, dead_letter: Path) -> Run:
    from pipelines import delete_dicom

    return run_pipeline(delete_dicom.main, *args, dead_letter=dead_letter)


def run_export_metadata(*args: str, dead_letter: Path) -> Run:
    from pipelines import export_metadata

    return run_pipeline(export_metadata.main, *args, dead_letter=dead_letter)


def this_process_spools() -> list[str]:
    """The spool directories of rows that runs in this process left."""
    return glob.glob(os.path.join(SPOOL_ROOT, STAGING, f"{HOST}.{os.getpid()}.*-rows"))


def view(directory: Path, columns: str = "SOPInstanceUID, Type") -> list[tuple]:
    """What view.sql returns, run by DuckDB with the table's directory as working directory."""
    previous = os.getcwd()
    os.chdir(directory)
    try:
        query = (directory / "view.sql").read_text()
        return sorted(duckdb.sql(f"SELECT {columns} FROM ({query})").fetchall(), key=repr)
    finally:
        os.chdir(previous)


def table(directory: Path, columns: str) -> list[tuple]:
    """Every row of the table, whatever the view says."""
    files = str(directory / "*.parquet")
    return sorted(
        duckdb.sql(f"SELECT {columns} FROM read_parquet('{files}', union_by_name=true)").fetchall(), key=repr
    )


def test_the_view_follows_insert_delete_modify_and_reinsert_as_seed_002_describes(tmp_path: Path) -> None:
    meta, store = tmp_path / "metadata", tmp_path / "store"
    original = pydicom.dcmread(CT)
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    meta.mkdir()
    legacy = pa.table(
        {
            "StudyInstanceUID": [uids[0]],
            "SeriesInstanceUID": [uids[1]],
            "SOPInstanceUID": [uids[2]],
            "PatientID": ["legacy"],
            "Type": pa.array([None], pa.string()),
            "LastUpdated": pa.array([None], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(legacy, meta / "legacy.parquet")  # written before Type and LastUpdated existed
    (meta / "view.sql").write_text(PARQUET_VIEW)  # as our first write will leave it
    assert view(meta, "PatientID, Type") == [("legacy", None)]

    inserted = run_import(
        f"--input={CT}", f"--store={store}", f"--metadata_destination={meta}", dead_letter=tmp_path / "a"
    )
    assert inserted.status == 0 and inserted.summary["metadata_rows"] == 1
    assert view(meta, "PatientID, Type") == [(original.PatientID, "CREATE")]

    target = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    deleted = run_delete(
        f"--store={store}", f"--target={target}", f"--metadata_destination={meta}", dead_letter=tmp_path / "b"
    )
    assert (deleted.status, deleted.summary["success"]) == (0, 1)
    assert view(meta) == []
    assert not list(store.rglob("*.dcm"))

    modified = tmp_path / "modified.dcm"
    original.PatientID = "modified"
    original.save_as(modified)
    reinserted = run_import(
        f"--input={modified}",
        f"--store={store}",
        f"--metadata_destination={meta}",
        dead_letter=tmp_path / "c",
    )
    assert reinserted.status == 0
    assert view(meta, "PatientID, Type") == [("modified", "CREATE")]
    assert [row[0] for row in table(meta, "Type")] == [
        "CREATE",
        "CREATE",
        "DELETE",
        None,
    ]  # rows are never removed


def test_export_metadata_writes_one_row_per_instance_and_honours_the_disposition(tmp_path: Path) -> None:
    store, meta = tmp_path / "store", tmp_path / "metadata"
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={store}", dead_letter=tmp_path / "a")
    args = (f"--store={store}", f"--destination={meta}")

    first = run_export_metadata(*args, dead_letter=tmp_path / "b")
    refused = run_export_metadata(*args, dead_letter=tmp_path / "c")
    appended = run_export_metadata(*args, "--write_disposition=WRITE_APPEND", dead_letter=tmp_path / "d")

    assert (first.status, first.summary["success"], first.summary["metadata_rows"]) == (0, 19, 19)
    assert refused.status == 1
    assert not this_process_spools(), "a run, refused or not, leaves no spooled rows behind"
    assert appended.status == 0
    assert len(table(meta, "SOPInstanceUID")) == 38
    assert len(view(meta)) == 19
    truncated = run_export_metadata(*args, "--write_disposition=WRITE_TRUNCATE", dead_letter=tmp_path / "e")
    assert truncated.status == 0 and len(table(meta, "SOPInstanceUID")) == 19
    schema = json.loads((meta / "schema.json").read_text())
    fields = {field["name"]: field for field in schema}
    assert fields["StudyDate"]["type"] == "DATE" and fields["LastUpdated"]["type"] == "TIMESTAMP"
    assert fields["PatientName"]["type"] == "RECORD"
    dates = duckdb.sql(f"SELECT DISTINCT StudyDate FROM read_parquet('{meta}/*.parquet')").fetchall()
    assert all(d is None or isinstance(d, datetime.date) for (d,) in dates)


def test_an_import_writes_every_row_to_each_of_its_metadata_destinations(tmp_path: Path) -> None:
    """An import writes each destination on its own, each from spool files of its own."""
    tables = [tmp_path / name for name in ("one", "two", "three")]
    destinations = [f"--metadata_destination={t}" for t in tables]

    done = run_import(
        f"--input={SAMPLE}/**.dcm",
        f"--store={tmp_path / 'store'}",
        *destinations,
        dead_letter=tmp_path / "dl",
    )

    assert (done.status, done.summary["success"], done.summary["metadata_rows"]) == (0, 19, 3 * 19)
    for t in tables:
        assert len(view(t)) == 19
    assert not this_process_spools()


def test_a_filter_selects_rows_exactly_as_it_selects_files(tmp_path: Path) -> None:

    store = FileLayoutStore(str(tmp_path / "store"))
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={store.root}", dead_letter=tmp_path / "a")
    filter_file, selected = a_filter(store, tmp_path)
    run_export(
        f"--store={store.root}",
        f"--output={tmp_path / 'out'}",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "b",
    )
    run = run_export_metadata(
        f"--store={store.root}",
        f"--destination={tmp_path / 'meta'}",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "c",
    )

    rows = {
        tuple(row) for row in table(tmp_path / "meta", "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID")
    }
    assert run.status == 0
    assert rows == {tuple(ref) for ref in exported(tmp_path / "out")} == {tuple(ref) for ref in selected}


def test_a_dicomweb_store_gives_the_same_rows_from_wado_rs_metadata(orthanc: Orthanc, tmp_path: Path) -> None:
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={tmp_path / 'store'}", dead_letter=tmp_path / "a")
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "b")

    local = run_export_metadata(
        f"--store={tmp_path / 'store'}", f"--destination={tmp_path / 'm1'}", dead_letter=tmp_path / "c"
    )
    web = run_export_metadata(
        f"--store={orthanc.dicomweb}", f"--destination={tmp_path / 'm2'}", dead_letter=tmp_path / "d"
    )

    assert local.status == web.status == 0
    columns = "SOPInstanceUID, PatientName, StudyDate, Modality, Rows, ImageType"
    assert table(tmp_path / "m2", columns) == table(tmp_path / "m1", columns)


def test_a_tiny_column_limit_drops_columns_with_their_names(tmp_path: Path) -> None:
    run_import(f"--input={CT}", f"--store={tmp_path / 'store'}", dead_letter=tmp_path / "a")

    run = run_export_metadata(
        f"--store={tmp_path / 'store'}",
        f"--destination={tmp_path / 'meta'}",
        "--max_columns=40",
        dead_letter=tmp_path / "b",
    )

    assert run.status == 0
    schema = json.loads((tmp_path / "meta" / "schema.json").read_text())
    assert "DroppedTags" in {field["name"] for field in schema}
    (dropped,) = table(tmp_path / "meta", "DroppedTags")
    reasons = {entry["Reason"] for entry in dropped[0]}
    assert "column_limit" in reasons


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        ([], "--destination", "required"),
        (["--destination=bq://only-a-project"], "--destination", "bq://project.dataset.table"),
        ([f"--destination=d{n}" for n in range(6)], "--destination", "at most 5"),
        (["--destination=d", "--write_disposition=WRITE_SOMETIMES"], "--write_disposition", "one of"),
        (["--destination=d", "--exclude_vr=XX"], "--exclude_vr", "not a DICOM VR"),
        (["--destination=bq://my-project.d.t"], "--destination", "needs --temp_location=gs://"),
        (  # rows wait for the schema in spool files, where every worker can read them
            ["--destination=gs://bucket/table", "--runner=DataflowRunner", "--project=p", "--region=r"],
            "--temp_location",
            "must be gs://... on a distributed runner: metadata rows are spooled there",
        ),
    ],
)
def test_bad_metadata_options_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str, words: str
) -> None:
    run = run_export_metadata(f"--store={tmp_path}", *args, dead_letter=tmp_path / "dl")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert run.status == 2 and line.startswith(f"error: {option}: ") and words in line
