"""The BigQuery path, checked offline (there is no BigQuery emulator): the pipeline builds without
any network, the load configuration carries the table's schema and lets it widen, rows are in the
JSON form loads take, and the view's SQL picks the rows view.sql picks."""

from __future__ import annotations

import datetime
from pathlib import Path

import apache_beam as beam
import duckdb
import pydicom

from pipelines import export_metadata
from schemas.bigquery import EVENT_FIELDS, merge
from transforms.flatten import flatten
from transforms.metadata_sink import BIGQUERY_VIEW, PARQUET_VIEW, UIDS, json_row, load_job_config

CT = Path(__file__).resolve().parents[1] / "sample" / "ct" / "CT_small.dcm"


def test_a_bigquery_destination_builds_without_network_or_credentials() -> None:
    options = export_metadata.parse(
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
    assert any("Destination1Load" in name for name in names)
    assert any("Destination1View" in name for name in names)


def test_the_load_job_carries_the_schema_and_may_widen_the_table() -> None:
    schema = merge(EVENT_FIELDS, flatten(pydicom.dcmread(CT, stop_before_pixels=True)).schema)

    load = load_job_config(schema, "WRITE_APPEND").to_api_repr()["load"]

    fields = {field["name"]: field for field in load["schema"]["fields"]}
    assert load["schemaUpdateOptions"] == ["ALLOW_FIELD_ADDITION"]
    assert load["writeDisposition"] == "WRITE_APPEND"
    assert load["sourceFormat"] == "NEWLINE_DELIMITED_JSON"
    assert fields["StudyDate"]["type"] == "DATE" and fields["LastUpdated"]["type"] == "TIMESTAMP"
    assert fields["PatientName"]["type"] == "RECORD"
    assert {f["name"] for f in fields["PatientName"]["fields"]} == {"Alphabetic", "Ideographic", "Phonetic"}
    assert fields["ImageType"]["mode"] == "REPEATED"


def test_rows_take_the_json_form_of_loads() -> None:
    when = datetime.datetime(2026, 11, 23, 9, 30, 1, 250000, tzinfo=datetime.UTC)
    row = {
        "StudyDate": datetime.date(2004, 1, 19),
        "StudyTime": datetime.time(7, 27, 30, 500000),
        "LastUpdated": when,
        "ReferencedImageSequence": [{"ReferencedFrameNumber": [1, 2]}],
    }
    assert json_row(row) == {
        "StudyDate": "2004-01-19",
        "StudyTime": "07:27:30.500000",
        "LastUpdated": "2026-11-23 09:30:01.250000 UTC",
        "ReferencedImageSequence": [{"ReferencedFrameNumber": [1, 2]}],
    }


def test_the_bigquery_view_picks_the_rows_view_sql_picks() -> None:
    duckdb.sql(
        """CREATE OR REPLACE TABLE events AS SELECT * FROM (VALUES
        ('1', '1.1', '1.1.1', NULL, NULL::TIMESTAMP, 'legacy'),
        ('1', '1.1', '1.1.2', NULL, NULL::TIMESTAMP, 'legacy'),
        ('1', '1.1', '1.1.2', 'CREATE', TIMESTAMP '2026-01-01 10:00:00', 'created'),
        ('1', '1.1', '1.1.3', 'CREATE', TIMESTAMP '2026-01-01 10:00:00', 'created'),
        ('1', '1.1', '1.1.3', 'DELETE', TIMESTAMP '2026-01-02 10:00:00', 'deleted'),
        ('1', '1.1', '1.1.4', 'DELETE', TIMESTAMP '2026-01-02 10:00:00', 'deleted'),
        ('1', '1.1', '1.1.4', 'CREATE', TIMESTAMP '2026-01-03 10:00:00', 'reinserted'))
        AS t(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, Type, LastUpdated, Note)"""
    )
    bigquery = BIGQUERY_VIEW.format(uids=UIDS, table="events").replace("`", '"')
    parquet = PARQUET_VIEW.replace("read_parquet('*.parquet', union_by_name = true)", "events")

    expected = [("1.1.1", "legacy"), ("1.1.2", "created"), ("1.1.4", "reinserted")]
    for query in (bigquery, parquet):
        assert sorted(duckdb.sql(f"SELECT SOPInstanceUID, Note FROM ({query})").fetchall()) == expected
