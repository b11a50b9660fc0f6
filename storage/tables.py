"""What the pipelines ask of a metadata destination, whatever its kind: its schema after this run,
and which instances already have a current row there."""

from __future__ import annotations

import json
from collections.abc import Collection

from schemas.bigquery import EVENT_FIELDS, SchemaConflict, allowed_schema, merge
from storage.bigquery_table import bigquery_client, bigquery_current_keys, bigquery_table, schema_of
from storage.destination import Destination, DestinationRefused
from storage.objects import join, read_bytes
from storage.parquet_table import parquet_current_keys, parquet_files


def table_schema(
    candidate: list[dict], destination: Destination, write_disposition: str, max_columns: int
) -> list[dict]:
    """The destination's schema after this run: its existing columns (none when truncating) widened
    by this run's, within `max_columns`. Refuses a non-empty destination under WRITE_EMPTY."""
    existing = existing_schema(destination)
    if write_disposition == "WRITE_EMPTY" and existing is not None and has_rows(destination):
        raise DestinationRefused(f"{destination.location} is not empty (--write_disposition=WRITE_EMPTY)")
    if existing is None or write_disposition == "WRITE_TRUNCATE":
        existing = []
    try:
        return allowed_schema(existing, merge(EVENT_FIELDS, candidate), max_columns)
    except SchemaConflict as error:
        raise DestinationRefused(f"{destination.location}: {error}") from None


def existing_schema(destination: Destination) -> list[dict] | None:
    if destination.is_bigquery:
        table = bigquery_table(bigquery_client(destination), destination)
        return None if table is None else schema_of(table)
    try:
        return json.loads(read_bytes(join(destination.location, "schema.json")))
    except FileNotFoundError:
        return None


def has_rows(destination: Destination) -> bool:
    if destination.is_bigquery:
        table = bigquery_table(bigquery_client(destination), destination)
        return bool(table and table.num_rows)
    return bool(parquet_files(destination.location))


def current_keys(location: str, sops: Collection[str]) -> set[tuple[str, str, str]]:
    """Which of these SOP Instance UIDs have a current row at a destination: the (Study, Series,
    SOP Instance UID) keys its view shows (latest row by LastUpdated, NULL lowest, not DELETE)."""
    destination = Destination(location)
    if destination.is_bigquery:
        return bigquery_current_keys(destination, sops)
    return parquet_current_keys(destination.location, sops)
