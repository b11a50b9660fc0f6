"""A BigQuery table: created or widened before loads, its view replaced after them, rows as JSON
loads take them, and the current keys read back through its view."""

from __future__ import annotations

import datetime
from collections.abc import Collection
from typing import Any, NamedTuple

from schemas.bigquery import same_schema, to_bigquery
from storage.destination import UIDS, Destination

BIGQUERY_VIEW = """SELECT * EXCEPT (row_rank) FROM (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY {uids} ORDER BY LastUpdated DESC) AS row_rank
  FROM `{table}`)
WHERE row_rank = 1 AND IFNULL(Type, '') != 'DELETE'
"""


class TablePlan(NamedTuple):
    """A BigQuery table made ready for this run's loads."""

    schema: list[dict]  # the table's schema after the run: every load job carries exactly this
    schema_changed: bool  # the table is new, widened, or (WRITE_TRUNCATE) given another schema


def prepare_table(schema: list[dict], destination: Destination, disposition: str) -> TablePlan:
    """Create the table with `schema`, or patch its schema to `schema` if it differs (widened).

    Under WRITE_TRUNCATE an existing table is left as it is: the load (or the first copy from the
    temporary tables) replaces its rows and its schema at once.
    """
    from google.cloud import bigquery

    client = bigquery_client(destination)
    table = bigquery_table(client, destination)
    if table is None:
        client.create_table(bigquery.Table(_table_reference(destination), schema=to_bigquery(schema)))
        return TablePlan(schema, True)
    if same_schema(schema_of(table), schema):
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

    client = bigquery_client(destination)
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


def bigquery_table(client: Any, destination: Destination) -> Any:
    """The destination's table, or None if there is none."""
    from google.api_core.exceptions import NotFound

    try:
        return client.get_table(_table_reference(destination))
    except NotFound:
        return None


def schema_of(table: Any) -> list[dict]:
    return [field.to_api_repr() for field in table.schema]


def _table_reference(destination: Destination, suffix: str = "") -> Any:
    """The table (or, with suffix `_view`, its view) as google-cloud-bigquery names it."""
    from google.cloud import bigquery

    project, dataset, table = destination.parts
    return bigquery.TableReference(bigquery.DatasetReference(project, dataset), table + suffix)


def bigquery_client(destination: Destination) -> Any:
    """A client whose jobs run in the table's project, as Beam's load jobs do. Its endpoint is
    BigQuery's, or BIGQUERY_EMULATOR_HOST's (google-cloud-bigquery reads it; the tests set it)."""
    from google.cloud import bigquery

    return bigquery.Client(project=destination.parts[0])


def bigquery_current_keys(destination: Destination, sops: Collection[str]) -> set[tuple[str, str, str]]:
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    view = f"{destination.table}_view"
    query = f"SELECT {UIDS} FROM `{view}` WHERE SOPInstanceUID IN UNNEST(@sops)"
    parameters = [bigquery.ArrayQueryParameter("sops", "STRING", sorted(sops))]
    config = bigquery.QueryJobConfig(query_parameters=parameters)
    try:
        rows = bigquery_client(destination).query(query, job_config=config).result()
    except NotFound:  # no table (or view) yet: no rows
        return set()
    return {(row[0], row[1], row[2]) for row in rows}
