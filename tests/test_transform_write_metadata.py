"""WriteMetadata alone in a TestPipeline, on Parquet destinations: the files, schema.json and
view.sql it writes, each write disposition, a schema that only widens, the column limit, and the
destinations and rows it refuses."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import apache_beam as beam
import duckdb
import pyarrow.parquet as pq
import pytest

from schemas.rows import Flat, with_event
from storage.parquet_table import PARQUET_VIEW
from storage.staging import SPOOL_ROOT, STAGING
from tests.beam_support import counters, new_pipeline, run
from transforms.write_metadata import SPOOL_ROWS, WriteMetadata

WHEN = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)
STUDY, SERIES = "1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.1.1"


def row(sop: str, when: datetime.datetime = WHEN, **columns: str | int) -> Flat:
    """A CREATE row of an instance with a few attributes (strings or integers)."""
    values = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES, "SOPInstanceUID": sop, **columns}
    schema = [
        {"name": name, "type": "INTEGER" if isinstance(value, int) else "STRING", "mode": "NULLABLE"}
        for name, value in values.items()
    ]
    return with_event(Flat(row=values, schema=schema), "CREATE", when, None, 1000)


def write(
    flats: list[Flat], destinations: list[Path], disposition: str = "WRITE_APPEND", **options: int
) -> dict:
    """Run WriteMetadata over `flats`; its counters."""
    pipeline = new_pipeline()
    _ = (
        pipeline
        | beam.Create(flats)
        | WriteMetadata(
            [str(d) for d in destinations], disposition, options.get("max_columns", 1000), "run1", SPOOL_ROOT
        )
    )
    return counters(run(pipeline))


def view(table: Path, columns: str) -> list[tuple]:
    """What the table's view.sql shows, run by DuckDB in the table's directory."""
    previous = os.getcwd()
    os.chdir(table)
    try:
        query = (table / "view.sql").read_text()
        return sorted(duckdb.sql(f"SELECT {columns} FROM ({query})").fetchall())
    finally:
        os.chdir(previous)


def schema_names(table: Path) -> list[str]:
    return [field["name"] for field in json.loads((table / "schema.json").read_text())]


def test_write_metadata_writes_parquet_a_schema_and_the_view_to_every_destination(tmp_path: Path) -> None:
    tables = [tmp_path / "one", tmp_path / "two"]

    found = write([row("1.1", Modality="CT"), row("1.2", Modality="MR"), row("1.3")], tables)

    assert found == {"metadata_rows": 6}  # three rows, to each of two destinations
    for table in tables:
        assert [p.name.split("-")[0] for p in table.glob("*.parquet")] == ["run1"]
        assert (table / "view.sql").read_text() == PARQUET_VIEW
        assert {"SOPInstanceUID", "Modality", "Type", "LastUpdated", "BlobStorageSize"} <= set(
            schema_names(table)
        )
        assert view(table, "SOPInstanceUID, Modality, Type") == [
            ("1.1", "CT", "CREATE"),
            ("1.2", "MR", "CREATE"),
            ("1.3", None, "CREATE"),
        ]
        assert sorted(p.name for p in table.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_rows_wait_for_the_schema_in_spool_files_that_go_when_every_destination_is_written(
    tmp_path: Path,
) -> None:
    """The schema is known only after the last row, so the rows wait on disk (SPOOL_ROWS to a file),
    not in memory; a column that only the last row has still reaches both tables."""
    tables, spool_root = [tmp_path / "one", tmp_path / "two"], tmp_path / "spool"
    count = 2 * SPOOL_ROWS + 500
    flats = [row(f"1.{n}", Modality="CT") for n in range(count - 1)] + [row(f"1.{count}", Late="x")]
    pipeline = new_pipeline()
    _ = (
        pipeline
        | beam.Create(flats)
        | WriteMetadata([str(t) for t in tables], "WRITE_APPEND", 1000, "r", str(spool_root))
    )

    assert counters(run(pipeline)) == {"metadata_rows": 2 * count}
    for table in tables:
        assert len(view(table, "SOPInstanceUID")) == count
        assert [r for r in view(table, "SOPInstanceUID, Late") if r[1]] == [(f"1.{count}", "x")]
    assert list((spool_root / STAGING).iterdir()) == []


def test_each_write_of_a_run_spools_apart(tmp_path: Path) -> None:
    """An import writes each metadata destination with a WriteMetadata of its own, and each removes
    its spool when its destination is written: a shared one would go while another still reads it."""
    first, second = (
        WriteMetadata([str(tmp_path / n)], "WRITE_APPEND", 1000, "run1", SPOOL_ROOT) for n in "ab"
    )

    assert first.spool != second.spool


def test_write_metadata_appends_and_widens_the_schema_under_write_append(tmp_path: Path) -> None:
    table = tmp_path / "table"
    write([row("1.1", Modality="CT")], [table])

    write([row("1.1", WHEN + datetime.timedelta(hours=1), Modality="CT", BodyPartExamined="HEAD")], [table])

    assert len(list(table.glob("*.parquet"))) == 2
    assert {"Modality", "BodyPartExamined"} <= set(schema_names(table))
    assert view(table, "SOPInstanceUID, BodyPartExamined") == [("1.1", "HEAD")]  # the later row is current


def test_write_metadata_under_write_truncate_replaces_what_the_table_held(tmp_path: Path) -> None:
    table = tmp_path / "table"
    write([row("1.1", Modality="CT"), row("1.2", Modality="MR")], [table])

    write([row("1.3", PatientID="P3")], [table], "WRITE_TRUNCATE")

    assert len(list(table.glob("*.parquet"))) == 1
    assert "Modality" not in schema_names(table)  # the schema starts again from this run's
    assert view(table, "SOPInstanceUID, PatientID") == [("1.3", "P3")]


def test_write_metadata_refuses_a_destination_that_is_not_empty_under_write_empty(tmp_path: Path) -> None:
    table = tmp_path / "table"
    write([row("1.1")], [table])
    before = sorted(table.iterdir())

    with pytest.raises(Exception, match=f"{table} is not empty \\(--write_disposition=WRITE_EMPTY\\)"):
        write([row("1.2")], [table], "WRITE_EMPTY")
    assert sorted(table.iterdir()) == before


def test_write_metadata_refuses_to_retype_a_column_and_writes_nothing(tmp_path: Path) -> None:
    table = tmp_path / "table"
    write([row("1.1", PatientAge="045Y")], [table])
    before = sorted(table.iterdir())

    with pytest.raises(Exception, match=f"{table}: .*PatientAge"):
        write([row("1.2", PatientAge=45)], [table])
    assert sorted(table.iterdir()) == before


def test_write_metadata_refuses_rows_of_one_run_that_disagree_on_a_column(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="rows of this run disagree on a column: .*PatientAge"):
        write([row("1.1", PatientAge="045Y"), row("1.2", PatientAge=45)], [tmp_path / "table"])
    assert not (tmp_path / "table" / "schema.json").exists()


def test_write_metadata_names_the_columns_past_max_columns_in_dropped_tags(tmp_path: Path) -> None:
    """The event columns (DroppedTags with its two fields included) and the UIDs make ten; with
    room for eleven, the first new column by tag fits, whichever row came first (the order rows meet
    depends on how a run is split between workers), and the other is named in DroppedTags."""
    table = tmp_path / "table"

    write([row("1.1", ImageComments="first"), row("1.2", Laterality="L")], [table], max_columns=11)

    assert "Laterality" in schema_names(table) and "ImageComments" not in schema_names(table)
    records = {r["SOPInstanceUID"]: r for r in pq.read_table(next(table.glob("*.parquet"))).to_pylist()}
    assert records["1.2"]["Laterality"] == "L"
    assert {"TagName": "ImageComments", "Reason": "column_limit"} in records["1.1"]["DroppedTags"]
