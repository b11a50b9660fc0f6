"""A Parquet table: a directory (local or gs://) of Parquet files with its schema.json and view.sql
(the store's current state, for DuckDB)."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import uuid
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.bigquery import to_arrow
from storage.destination import UID_COLUMNS, UIDS
from storage.listing import NOT_A_FILE, lister_for
from storage.objects import (
    MatchedFile,
    delete_tree,
    is_gcs,
    join,
    open_ranged,
    size_of,
    write_bytes,
)
from storage.staging import clean_staging

ROWS_PER_FILE = 5000
PARQUET_VIEW = f"""SELECT * EXCLUDE (row_rank) FROM (
  SELECT *, row_number() OVER (
    PARTITION BY {UIDS} ORDER BY LastUpdated DESC NULLS LAST) AS row_rank
  FROM read_parquet('*.parquet', union_by_name = true))
WHERE row_rank = 1 AND (Type IS NULL OR Type <> 'DELETE')
"""


def parquet_files(directory: str) -> list[str]:
    lister, prefix = lister_for(directory.rstrip("/") + "/")
    files, _ = lister.children(prefix)
    return [
        lister.uri(file.uri) for file in files if file.uri.endswith(".parquet") and file.size != NOT_A_FILE
    ]


def finish_parquet(written: list[str], directory: str, write_disposition: str, schema: list[dict]) -> None:
    """After the files: schema.json and view.sql; under WRITE_TRUNCATE, the older files removed."""
    if write_disposition == "WRITE_TRUNCATE":
        for path in set(parquet_files(directory)) - set(written):
            delete_tree(path)
    write_bytes(join(directory, "schema.json"), json.dumps(schema, indent=1).encode(), root=directory)
    write_bytes(join(directory, "view.sql"), PARQUET_VIEW.encode(), root=directory)
    clean_staging(directory)  # the staging directory, now empty


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


def write_parquet_file(rows: list[dict[str, Any]], schema: list[dict], directory: str, run_name: str) -> str:
    """One Parquet file of `rows` with the table's `schema`, named for the run; its path."""
    table = pa.Table.from_pylist(rows, schema=to_arrow(schema))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = join(directory, f"{run_name}-{uuid.uuid4().hex[:12]}.parquet")
    write_bytes(path, buffer.getvalue(), root=directory)
    return path


def parquet_current_keys(directory: str, sops: Collection[str]) -> set[tuple[str, str, str]]:
    """The (Study, Series, SOP Instance UID) keys of these SOP Instance UIDs that the directory's
    view shows: latest row by LastUpdated (NULL lowest), not DELETE. Reads only the key columns."""
    latest: dict[tuple[str, str, str], tuple[datetime.datetime | None, str | None]] = {}
    wanted = pa.array(sorted(sops), pa.string())
    for path in parquet_files(directory):
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
