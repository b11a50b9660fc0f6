"""Write metadata rows to up to five destinations: Parquet tables (local or gs://) and BigQuery.

Every destination gets the same rows under the same rules: the table's schema only widens (the
existing schema merged with this run's columns, as far as `--max_columns` allows), columns past the
limit go to DroppedTags, and the view of the store's current state is written next to the table
(`view.sql` run by DuckDB, or the BigQuery view `{table}_view`).

A BigQuery table is created, or widened by a schema patch (tables.patch), before its rows are
loaded, so that no load job needs schemaUpdateOptions: BigQuery accepts those only with WRITE_APPEND
(or WRITE_TRUNCATE on a partition), and a large load, which Beam splits into loads into temporary
tables and copies, meets Beam issue 21105 with them. Each load then carries exactly the table's
schema, whatever the disposition and the size.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import re
import uuid
from collections.abc import Collection, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from dicomlib import NAMESPACE
from dicomlib.failures import RunFailed
from schemas.bigquery import (
    EVENT_FIELDS,
    SchemaConflict,
    allowed_schema,
    merge,
    same_schema,
    to_arrow,
    to_bigquery,
)
from schemas.rows import Flat, restrict
from storage.objects import (
    Lister,
    MatchedFile,
    clean_staging,
    delete_tree,
    is_gcs,
    join,
    open_ranged,
    read_bytes,
    size_of,
    split_gcs,
    write_bytes,
)

BIGQUERY_TABLE = re.compile(
    r"bq://((?:[a-z0-9.-]+:)?[a-z][a-z0-9-]*[a-z0-9])\.([A-Za-z0-9_]+)\.([A-Za-z0-9_$-]+)"
)
WRITE_DISPOSITIONS = ("WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND")
MAX_DESTINATIONS = 5
ROWS_PER_FILE = 5000
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
UIDS = ", ".join(UID_COLUMNS)
PARQUET_VIEW = f"""SELECT * EXCLUDE (row_rank) FROM (
  SELECT *, row_number() OVER (
    PARTITION BY {UIDS} ORDER BY LastUpdated DESC NULLS LAST) AS row_rank
  FROM read_parquet('*.parquet', union_by_name = true))
WHERE row_rank = 1 AND (Type IS NULL OR Type <> 'DELETE')
"""
BIGQUERY_VIEW = """SELECT * EXCEPT (row_rank) FROM (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY {uids} ORDER BY LastUpdated DESC) AS row_rank
  FROM `{table}`)
WHERE row_rank = 1 AND IFNULL(Type, '') != 'DELETE'
"""


class DestinationRefused(RunFailed):
    """The destination cannot take this run's rows (not empty under WRITE_EMPTY, a column retyped)."""


class Destination(NamedTuple):
    location: str  # bq://project.dataset.table, a local directory or gs:// prefix

    @property
    def is_bigquery(self) -> bool:
        return self.location.startswith("bq://")

    @property
    def table(self) -> str:
        """project.dataset.table, for a BigQuery destination."""
        return self.location[len("bq://") :]

    @property
    def parts(self) -> tuple[str, str, str]:
        """(project, dataset, table) of a BigQuery destination; the project may be domain:name."""
        project, dataset, table = BIGQUERY_TABLE.fullmatch(self.location).groups()  # checked with the options
        return project, dataset, table


class WriteMetadata(beam.PTransform):
    """Flat rows -> every destination; counts rows written and drops only the logger could record."""

    def __init__(
        self, destinations: Iterable[str], write_disposition: str, max_columns: int, run_name: str
    ) -> None:
        super().__init__()
        self.destinations = [Destination(text) for text in destinations]
        self.write_disposition = write_disposition
        self.max_columns = max_columns
        self.run_name = run_name

    def expand(self, flats: beam.PCollection[Flat]) -> beam.pvalue.PDone:
        candidate = (
            flats
            | "Schemas" >> beam.Map(lambda flat: flat.schema)
            | "MergeSchemas" >> beam.CombineGlobally(MergeSchemas())
        )
        for number, destination in enumerate(self.destinations, start=1):
            label = f"Destination{number}"
            schema = candidate | f"{label}Schema" >> beam.Map(
                table_schema, destination, self.write_disposition, self.max_columns
            )
            rows = flats | f"{label}Restrict" >> beam.ParDo(Restrict(), beam.pvalue.AsSingleton(schema))
            if destination.is_bigquery:
                _write_bigquery(rows, schema, destination, self.write_disposition, label)
            else:
                files = rows | f"{label}Parquet" >> beam.ParDo(
                    WriteParquet(destination.location, self.run_name), beam.pvalue.AsSingleton(schema)
                )
                (
                    files
                    | f"{label}Files" >> beam.combiners.ToList()
                    | f"{label}Finish"
                    >> beam.Map(
                        finish_parquet,
                        destination.location,
                        self.write_disposition,
                        beam.pvalue.AsSingleton(schema),
                    )
                )
        return beam.pvalue.PDone(flats.pipeline)


class MergeSchemas(beam.CombineFn):
    """Every row's schema merged into this run's columns (widening only)."""

    def create_accumulator(self) -> list[dict]:
        return []

    def add_input(self, accumulator: list[dict], schema: list[dict]) -> list[dict]:
        return _merge(accumulator, schema)

    def merge_accumulators(self, accumulators: Iterable[list[dict]]) -> list[dict]:
        merged: list[dict] = []
        for accumulator in accumulators:
            merged = _merge(merged, accumulator)
        return merged

    def extract_output(self, accumulator: list[dict]) -> list[dict]:
        return accumulator


def _merge(existing: list[dict], new: list[dict]) -> list[dict]:
    try:
        return merge(existing, new)
    except SchemaConflict as error:
        raise DestinationRefused(f"rows of this run disagree on a column: {error}") from None


def table_schema(
    candidate: list[dict], destination: Destination, write_disposition: str, max_columns: int
) -> list[dict]:
    """The destination's schema after this run: its existing columns (none when truncating) widened
    by this run's, within `max_columns`. Refuses a non-empty destination under WRITE_EMPTY."""
    existing = _existing_schema(destination)
    if write_disposition == "WRITE_EMPTY" and existing is not None and _has_rows(destination):
        raise DestinationRefused(f"{destination.location} is not empty (--write_disposition=WRITE_EMPTY)")
    if existing is None or write_disposition == "WRITE_TRUNCATE":
        existing = []
    try:
        return allowed_schema(existing, merge(EVENT_FIELDS, candidate), max_columns)
    except SchemaConflict as error:
        raise DestinationRefused(f"{destination.location}: {error}") from None


def _existing_schema(destination: Destination) -> list[dict] | None:
    if destination.is_bigquery:
        table = _bigquery_table(_bigquery_client(destination), destination)
        return None if table is None else _schema_of(table)
    try:
        return json.loads(read_bytes(join(destination.location, "schema.json")))
    except FileNotFoundError:
        return None


def _has_rows(destination: Destination) -> bool:
    if destination.is_bigquery:
        table = _bigquery_table(_bigquery_client(destination), destination)
        return bool(table and table.num_rows)
    return bool(_parquet_files(destination.location))


def _parquet_files(directory: str) -> list[str]:
    if is_gcs(directory):
        bucket, name = split_gcs(directory.rstrip("/") + "/")
        files, _ = Lister(bucket).children(name)
        return [f"gs://{bucket}/{file.uri}" for file in files if file.uri.endswith(".parquet")]
    files, _ = Lister(None).children(directory.rstrip("/") + "/")
    return [file.uri for file in files if file.uri.endswith(".parquet")]


class Restrict(beam.DoFn):
    """A row cut to its destination's schema; drops that not even DroppedTags can hold are counted."""

    def __init__(self) -> None:
        self.rows = Metrics.counter(NAMESPACE, "metadata_rows")
        self.unrecorded = Metrics.counter(NAMESPACE, "dicom_stream_warnings")

    def process(self, flat: Flat, schema: list[dict]) -> Iterator[dict[str, Any]]:
        cut, unrecorded = restrict(flat, schema)
        self.unrecorded.inc(unrecorded)
        self.rows.inc()
        yield cut.row


class WriteParquet(beam.DoFn):
    """Rows -> Parquet files of at most ROWS_PER_FILE rows, named for the run; yields their paths."""

    def __init__(self, directory: str, run_name: str) -> None:
        self.directory = directory
        self.run_name = run_name

    def setup(self) -> None:
        clean_staging(self.directory)

    def teardown(self) -> None:
        clean_staging(self.directory)  # the staging directory, once empty

    def start_bundle(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def process(self, row: dict[str, Any], schema: list[dict]) -> Iterator[str]:
        self.schema = schema
        self.rows.append(row)
        if len(self.rows) >= ROWS_PER_FILE:
            yield self._write()

    def finish_bundle(self) -> Iterator[Any]:
        if self.rows:
            yield GlobalWindows.windowed_value(self._write())

    def _write(self) -> str:
        table = pa.Table.from_pylist(self.rows, schema=to_arrow(self.schema))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = join(self.directory, f"{self.run_name}-{uuid.uuid4().hex[:12]}.parquet")
        write_bytes(path, buffer.getvalue(), root=self.directory)
        self.rows = []
        return path


def finish_parquet(written: list[str], directory: str, write_disposition: str, schema: list[dict]) -> None:
    """After the files: schema.json and view.sql; under WRITE_TRUNCATE, the older files removed."""
    if write_disposition == "WRITE_TRUNCATE":
        for path in set(_parquet_files(directory)) - set(written):
            delete_tree(path)
    write_bytes(join(directory, "schema.json"), json.dumps(schema, indent=1).encode(), root=directory)
    write_bytes(join(directory, "view.sql"), PARQUET_VIEW.encode(), root=directory)
    clean_staging(directory)  # the staging directory, now empty


class TablePlan(NamedTuple):
    """A BigQuery table made ready for this run's loads."""

    schema: list[dict]  # the table's schema after the run: every load job carries exactly this
    schema_changed: bool  # the table is new, widened, or (WRITE_TRUNCATE) given another schema


def _write_bigquery(
    rows: beam.PCollection[dict],
    schema: beam.PCollection[list[dict]],
    destination: Destination,
    disposition: str,
    label: str,
) -> None:
    """The table created or widened first, then Beam's file loads with its schema and no schema
    update options (one load job, or for a large load several into temporary tables and copies),
    then the view."""
    from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery

    plan = beam.pvalue.AsSingleton(
        schema | f"{label}Prepare" >> beam.Map(prepare_table, destination, disposition)
    )
    project, dataset, table = destination.parts
    loaded = (
        rows
        | f"{label}Json" >> beam.Map(json_row)
        | f"{label}Load"
        >> WriteToBigQuery(
            f"{project}:{dataset}.{table}",
            schema=lambda _, plan: {"fields": plan.schema},
            schema_side_inputs=(plan,),  # so no load starts before the table is ready
            method=WriteToBigQuery.Method.FILE_LOADS,
            create_disposition=BigQueryDisposition.CREATE_NEVER,  # prepare_table made it
            write_disposition=disposition,
        )
    )
    (
        (loaded.destination_load_jobid_pairs, loaded.destination_copy_jobid_pairs)
        | f"{label}Jobs" >> beam.Flatten()
        | f"{label}Loaded" >> beam.combiners.Count.Globally()
        | f"{label}Finish" >> beam.Map(finish_table, destination, disposition, plan)
    )


def prepare_table(schema: list[dict], destination: Destination, disposition: str) -> TablePlan:
    """Create the table with `schema`, or patch its schema to `schema` if it differs (widened).

    Under WRITE_TRUNCATE an existing table is left as it is: the load (or the first copy from the
    temporary tables) replaces its rows and its schema at once.
    """
    from google.cloud import bigquery

    client = _bigquery_client(destination)
    table = _bigquery_table(client, destination)
    if table is None:
        client.create_table(bigquery.Table(_table_reference(destination), schema=to_bigquery(schema)))
        return TablePlan(schema, True)
    if same_schema(_schema_of(table), schema):
        return TablePlan(schema, False)
    if disposition != "WRITE_TRUNCATE":
        table.schema = to_bigquery(schema)
        client.update_table(table, ["schema"])  # a PATCH, refused if the table changed since read
    return TablePlan(schema, True)


def finish_table(load_jobs: int, destination: Destination, disposition: str, plan: TablePlan) -> None:
    """After the loads: a WRITE_TRUNCATE run without rows empties the table (no load job did, so its
    schema stays); the view is replaced, in one statement, when the table's schema changed, else
    created if missing."""
    from google.cloud import bigquery

    client = _bigquery_client(destination)
    emptied = disposition == "WRITE_TRUNCATE" and not load_jobs
    if emptied:
        client.query(f"TRUNCATE TABLE `{destination.table}`").result()
    query = BIGQUERY_VIEW.format(uids=UIDS, table=destination.table)
    if plan.schema_changed and not emptied:
        client.query(f"CREATE OR REPLACE VIEW `{destination.table}_view` AS\n{query}").result()
        return
    view = bigquery.Table(_table_reference(destination, "_view"))
    view.view_query = query
    client.create_table(view, exists_ok=True)


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as BigQuery's JSON loads take it: dates, times and timestamps as strings."""
    return {key: _json_value(value) for key, value in row.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return json_row(value)
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value


def _bigquery_table(client: Any, destination: Destination) -> Any:
    """The destination's table, or None if there is none."""
    from google.api_core.exceptions import NotFound

    try:
        return client.get_table(_table_reference(destination))
    except NotFound:
        return None


def _schema_of(table: Any) -> list[dict]:
    return [field.to_api_repr() for field in table.schema]


def _table_reference(destination: Destination, suffix: str = "") -> Any:
    """The table (or, with suffix `_view`, its view) as google-cloud-bigquery names it."""
    from google.cloud import bigquery

    project, dataset, table = destination.parts
    return bigquery.TableReference(bigquery.DatasetReference(project, dataset), table + suffix)


def _bigquery_client(destination: Destination) -> Any:
    """A client whose jobs run in the table's project, as Beam's load jobs do. Its endpoint is
    BigQuery's, or BIGQUERY_EMULATOR_HOST's (google-cloud-bigquery reads it; the tests set it)."""
    from google.cloud import bigquery

    return bigquery.Client(project=destination.parts[0])


def current_keys(location: str, sops: Collection[str]) -> set[tuple[str, str, str]]:
    """Which of these SOP Instance UIDs have a current row at a destination: the (Study, Series,
    SOP Instance UID) keys its view shows (latest row by LastUpdated, NULL lowest, not DELETE)."""
    destination = Destination(location)
    if destination.is_bigquery:
        return _bigquery_current_keys(destination, sops)
    latest: dict[tuple[str, str, str], tuple[datetime.datetime | None, str | None]] = {}
    wanted = pa.array(sorted(sops), pa.string())
    for path in _parquet_files(destination.location):
        with _parquet_source(path) as source:
            file = pq.ParquetFile(source)
            columns = [c for c in (*UID_COLUMNS, "Type", "LastUpdated") if c in file.schema_arrow.names]
            if not set(UID_COLUMNS) <= set(columns):
                continue
            for batch in file.iter_batches(columns=columns):
                batch = batch.filter(pc.is_in(batch["SOPInstanceUID"], value_set=wanted))
                for row in batch.to_pylist():
                    key = (row["StudyInstanceUID"], row["SeriesInstanceUID"], row["SOPInstanceUID"])
                    event = (row.get("LastUpdated"), row.get("Type"))
                    if key not in latest or _later(event[0], latest[key][0]):
                        latest[key] = event
    return {key for key, (_, kind) in latest.items() if kind != "DELETE"}


def _later(when: datetime.datetime | None, than: datetime.datetime | None) -> bool:
    return when is not None and (than is None or when > than)


@contextlib.contextmanager
def _parquet_source(path: str) -> Iterator[Any]:
    """A Parquet file to read a few columns of, by ranged reads where it is in GCS."""
    if not is_gcs(path):
        yield path
        return
    size = size_of(path)
    if size is None:
        raise FileNotFoundError(path)
    with open_ranged(MatchedFile(path, size)) as stream:
        yield stream


def _bigquery_current_keys(destination: Destination, sops: Collection[str]) -> set[tuple[str, str, str]]:
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    view = f"{destination.table}_view"
    query = f"SELECT {UIDS} FROM `{view}` WHERE SOPInstanceUID IN UNNEST(@sops)"
    parameters = [bigquery.ArrayQueryParameter("sops", "STRING", sorted(sops))]
    config = bigquery.QueryJobConfig(query_parameters=parameters)
    try:
        rows = _bigquery_client(destination).query(query, job_config=config).result()
    except NotFound:  # no table (or view) yet: no rows
        return set()
    return {(row[0], row[1], row[2]) for row in rows}
