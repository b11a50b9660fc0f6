"""schemas.bigquery: merging (widen only), BigQuery's limits, the column limit, and the schema as
BigQuery SchemaFields and as pyarrow (written to Parquet and read back with DuckDB)."""

from __future__ import annotations

import datetime
import functools
import logging
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from google.cloud import bigquery
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomlib.flatten import flatten
from schemas.bigquery import (
    DROPPED_TAGS_FIELD,
    EVENT_FIELDS,
    MAX_COLUMNS,
    MAX_NESTING,
    SchemaConflict,
    allowed_schema,
    column_count,
    merge,
    to_arrow,
    to_bigquery,
)
from schemas.rows import Flat, restrict
from tests.schema_rules import nesting_depth

pytestmark = pytest.mark.filterwarnings("ignore")


def f(name: str, type_: str = "STRING", mode: str = "NULLABLE", fields: list[dict] | None = None) -> dict:
    out = {"name": name, "type": type_, "mode": mode}
    if fields is not None:
        out["fields"] = fields
    return out


SEQ = f("Seq", "RECORD", "REPEATED", [f("A"), f("B", "INTEGER")])


def test_merge_widens_keeps_order_and_is_idempotent() -> None:
    existing = [f("PatientID"), SEQ, f("StudyDate", "DATE")]
    new = [
        f("Modality"),
        f("StudyDate", "DATE"),
        f("Seq", "RECORD", "REPEATED", [f("C", "FLOAT"), f("A")]),
        f("Rows", "INTEGER"),
    ]
    merged = merge(existing, new)
    assert [x["name"] for x in merged] == ["PatientID", "Seq", "StudyDate", "Modality", "Rows"]
    assert [x["name"] for x in merged[1]["fields"]] == ["A", "B", "C"]
    assert merged[1]["fields"][2] == f("C", "FLOAT")
    assert merge(merged, new) == merged
    assert merge(merged, merged) == merged
    assert merge(merged, existing) == merged
    assert existing == [f("PatientID"), SEQ, f("StudyDate", "DATE")]  # arguments untouched
    assert SEQ["fields"] == [f("A"), f("B", "INTEGER")]
    assert merge([], new) == new
    # unchanged columns are the existing objects; BigQuery's names compare case-insensitively
    assert merge(existing, [f("patientid")])[0] is existing[0]
    assert merge([f("Tag", "STRING", "REQUIRED")], [f("Tag")]) == [f("Tag")]  # relaxation


@pytest.mark.parametrize(
    ("new", "named"),
    [
        ([f("PatientID", "INTEGER")], "PatientID"),
        ([f("PatientID", "STRING", "REPEATED")], "PatientID"),
        ([f("Seq", "STRING", "REPEATED")], "Seq"),
        ([f("Seq", "RECORD", "NULLABLE", [f("A")])], "Seq"),
        ([f("Seq", "RECORD", "REPEATED", [f("B", "STRING")])], "Seq.B"),
        ([f("Seq", "RECORD", "REPEATED", [f("A", "STRING", "REPEATED")])], "Seq.A"),
    ],
)
def test_merge_never_retypes(new: list[dict], named: str) -> None:
    with pytest.raises(SchemaConflict, match=rf"column {named} is \w+ \w+ in the existing schema, \w+ \w+"):
        merge([f("PatientID"), SEQ], new)


def test_count_and_depth() -> None:
    assert column_count([f("A"), SEQ]) == 4
    assert nesting_depth([f("A")]) == 0
    assert nesting_depth([SEQ]) == 1
    assert nesting_depth([f("X", "RECORD", "NULLABLE", [SEQ, f("B")])]) == 2
    assert column_count(EVENT_FIELDS) == 7


def test_allowed_schema_and_restrict_with_a_tiny_column_limit(caplog: pytest.LogCaptureFixture) -> None:
    ds = Dataset()
    ds.PatientID = "1"
    ds.StudyDate = "20010101"
    ds.PatientName = "A^B"  # 19 columns with its groups and components
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2"
    ds.ReferencedImageSequence[0].ReferencedFrameNumber = "1"
    ds.add_new(0x00091001, "LO", "private")
    ds.add_new(0x00091002, "LO", "other")
    flat = flatten(ds)
    candidate = merge(EVENT_FIELDS, flat.schema)

    schema = allowed_schema([], candidate, max_columns=10)
    # event columns and DroppedTags first (7), then by tag: the sequence (3) and PatientName (19) do
    # not fit, PatientID does, OtherElements (3) does not
    assert [x["name"] for x in schema] == [
        "Type", "LastUpdated", "StorageClass", "BlobStorageSize", "DroppedTags", "StudyDate", "PatientID",
    ]  # fmt: skip
    assert column_count(schema) == 9
    cut, unrecorded = restrict(flat, schema)
    assert unrecorded == 0
    assert cut.row == {
        "StudyDate": datetime.date(2001, 1, 1),
        "PatientID": "1",
        "DroppedTags": [
            {"TagName": "ReferencedImageSequence", "Reason": "column_limit"},
            {"TagName": "PatientName", "Reason": "column_limit"},
            {"TagName": "Tag_00091001", "Reason": "column_limit"},
            {"TagName": "Tag_00091002", "Reason": "column_limit"},
        ],
    }
    assert [x["name"] for x in cut.schema] == ["StudyDate", "PatientID", "DroppedTags"]

    # nested fields are added with their column's other new fields, only when they all fit
    narrow = [*schema, f("ReferencedImageSequence", "RECORD", "REPEATED", [f("ReferencedSOPInstanceUID")])]
    assert allowed_schema(narrow, candidate, max_columns=11) == narrow
    assert allowed_schema(narrow, candidate, max_columns=5) == narrow  # existing columns always stay
    widened = allowed_schema(narrow, candidate, max_columns=12)
    assert column_count(widened) == 12
    assert [x["name"] for x in widened[-1]["fields"]] == ["ReferencedSOPInstanceUID", "ReferencedFrameNumber"]
    cut, _ = restrict(flat, narrow)
    assert cut.row["ReferencedImageSequence"] == [{"ReferencedSOPInstanceUID": "1.2"}]
    assert {"TagName": "ReferencedImageSequence.ReferencedFrameNumber", "Reason": "column_limit"} in cut.row[
        "DroppedTags"
    ]
    cut_fields = {x["name"]: x for x in cut.schema}["ReferencedImageSequence"]["fields"]
    assert cut_fields == [f("ReferencedSOPInstanceUID")]

    # without DroppedTags in the table, the drops are warnings on dicom_stream, and counted
    bare = [f("PatientID")]
    with caplog.at_level(logging.WARNING, logger="dicom_stream"):
        cut, unrecorded = restrict(flat, bare)
    assert cut.row == {"PatientID": "1"}
    assert unrecorded == 5 == len([r for r in caplog.records if r.name == "dicom_stream"])


def test_restrict_keeps_a_row_the_schema_covers() -> None:
    ds = Dataset()
    ds.PatientName = "A^B"
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2"
    flat = flatten(ds)
    cut, unrecorded = restrict(flat, merge(EVENT_FIELDS, flat.schema))
    assert cut == flat and unrecorded == 0


# --- the corpus ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def flats(corpus: list[Path]) -> list[Flat]:
    out = []
    for path in corpus:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if len(ds):
            out.append(flatten(ds))
    assert len(out) > 230
    return out


@pytest.fixture(scope="session")
def merged(flats: list[Flat]) -> list[dict]:
    return functools.reduce(merge, (flat.schema for flat in flats), EVENT_FIELDS)


def test_the_corpus_schema_is_within_bigquerys_limits(merged: list[dict]) -> None:
    assert column_count(merged) <= MAX_COLUMNS
    assert nesting_depth(merged) <= MAX_NESTING
    assert [x["name"] for x in merged[: len(EVENT_FIELDS)]] == [x["name"] for x in EVENT_FIELDS]

    fields = {x.name: x for x in to_bigquery(merged)}
    assert all(isinstance(x, bigquery.SchemaField) for x in fields.values())
    patient_name = fields["PatientName"]
    assert (patient_name.field_type, patient_name.mode) == ("RECORD", "NULLABLE")
    alphabetic = {x.name: x for x in patient_name.fields}["Alphabetic"]
    assert alphabetic.field_type == "RECORD"
    assert [x.name for x in alphabetic.fields] == [
        "FamilyName",
        "GivenName",
        "MiddleName",
        "NamePrefix",
        "NameSuffix",
    ]
    assert (fields["StudyDate"].field_type, fields["StudyDate"].mode) == ("DATE", "NULLABLE")
    assert (fields["StudyTime"].field_type, fields["ContentTime"].field_type) == ("TIME", "TIME")
    assert (fields["ImageType"].field_type, fields["ImageType"].mode) == ("STRING", "REPEATED")
    assert (fields["Rows"].field_type, fields["PixelSpacing"].field_type) == ("INTEGER", "STRING")
    sequence = fields["ReferencedImageSequence"]
    assert (sequence.field_type, sequence.mode) == ("RECORD", "REPEATED")
    assert "ReferencedSOPInstanceUID" in {x.name for x in sequence.fields}
    assert (fields["OverlayRows"].field_type, fields["OverlayRows"].mode) == ("RECORD", "REPEATED")
    assert (fields["LastUpdated"].field_type, fields["DroppedTags"].mode) == ("TIMESTAMP", "REPEATED")

    for source_format in (bigquery.SourceFormat.PARQUET, bigquery.SourceFormat.NEWLINE_DELIMITED_JSON):
        config = bigquery.LoadJobConfig(
            schema=to_bigquery(merged),
            source_format=source_format,
            schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION],
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        )
        load = config.to_api_repr()["load"]
        assert load["sourceFormat"] == source_format
        assert load["schemaUpdateOptions"] == ["ALLOW_FIELD_ADDITION"]
        assert load["writeDisposition"] == "WRITE_APPEND"
        api_fields = {x["name"]: x for x in load["schema"]["fields"]}
        assert len(api_fields) == len(merged)
        assert api_fields["PatientName"]["type"] == "RECORD"
        assert api_fields["StudyDate"] == {"name": "StudyDate", "type": "DATE", "mode": "NULLABLE"}
        assert api_fields["DroppedTags"]["fields"] == [
            {"name": "TagName", "type": "STRING", "mode": "NULLABLE"},
            {"name": "Reason", "type": "STRING", "mode": "NULLABLE"},
        ]


def test_the_corpus_rows_round_trip_through_arrow_and_parquet(
    flats: list[Flat], merged: list[dict], tmp_path: Path
) -> None:
    rows = []
    for flat in flats:
        cut, unrecorded = restrict(flat, merged)
        assert unrecorded == 0 and cut.row.keys() == flat.row.keys()  # the merged schema holds every row
        rows.append(cut.row)
    arrow = to_arrow(merged)
    assert arrow.field("StudyDate").type == pa.date32()
    assert arrow.field("StudyTime").type == pa.time64("us")
    assert arrow.field("LastUpdated").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("ImageType").type == pa.list_(pa.string())
    assert pa.types.is_list(arrow.field("ReferencedImageSequence").type)
    assert pa.types.is_struct(arrow.field("PatientName").type)
    table = pa.Table.from_pylist(rows, schema=arrow)
    assert table.num_rows == len(flats)
    path = tmp_path / "metadata.parquet"
    pq.write_table(table, path)
    assert pq.read_schema(path).equals(arrow)

    query = (
        f"SELECT count(*), count(StudyDate), typeof(min(StudyDate)), max(Rows) FROM read_parquet('{path}')"
    )
    [(count, dated, date_type, max_rows)] = duckdb.sql(query).fetchall()
    assert count == len(flats)
    assert dated == sum(1 for row in rows if row.get("StudyDate") is not None) > 100
    assert date_type == "DATE"
    assert max_rows == max(row["Rows"] for row in rows if row.get("Rows") is not None)
    names = duckdb.sql(
        f"SELECT PatientName.Alphabetic.FamilyName FROM read_parquet('{path}') "
        "WHERE SOPInstanceUID = '1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322'"
    ).fetchall()
    assert names == [("CompressedSamples",)]
    [(uids,)] = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{path}'), unnest(ReferencedImageSequence) AS r(item) "
        "WHERE item.ReferencedSOPInstanceUID IS NOT NULL"
    ).fetchall()
    assert uids == sum(
        1
        for row in rows
        for item in row.get("ReferencedImageSequence") or []
        if item.get("ReferencedSOPInstanceUID")
    )
    dropped = duckdb.sql(
        f"SELECT d.TagName FROM read_parquet('{path}'), unnest(DroppedTags) AS t(d) "
        "WHERE d.Reason = 'excluded_vr'"
    ).fetchall()
    assert ("FileMetaInformationVersion",) in dropped


def test_a_restricted_corpus_under_a_small_limit(flats: list[Flat], merged: list[dict]) -> None:
    """The table grows a row at a time under --max_columns 300; every row fits what the table has."""
    schema = list(EVENT_FIELDS)
    limited = 0
    for flat in flats:
        schema = allowed_schema(schema, merge(EVENT_FIELDS, flat.schema), max_columns=300)
        cut, unrecorded = restrict(flat, schema)
        assert unrecorded == 0
        limited += sum(1 for d in cut.row.get("DroppedTags", []) if d["Reason"] == "column_limit")
        pa.Table.from_pylist([cut.row], schema=to_arrow(schema))
    assert column_count(schema) <= 300
    assert limited > 0
    assert [x["name"] for x in schema[:5]] == [x["name"] for x in EVENT_FIELDS]
    assert DROPPED_TAGS_FIELD in schema
