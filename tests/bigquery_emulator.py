"""bqemulator (PyPI: a DuckDB-backed server of BigQuery's REST API) on loopback, for the bq:// tests.

Its load jobs read `gs://bucket/object` as the file `{gcs_root}/bucket/object`: run fake-gcs-server
with the same root (tests/gcs_emulator.py) and Beam's load files reach it. Clients are pointed at it
the way each library allows, in this process only: google-cloud-bigquery by its own
BIGQUERY_EMULATOR_HOST, Beam's apitools client by its class's BASE_URL. Both also want Application
Default Credentials: a user credential whose token never expires, so nothing asks Google for one.

The server runs in its own process (`python -m tests.bigquery_emulator start ...`). DuckDB's spatial
extension, which it would download at start-up, is not loaded (no GEOGRAPHY here); and where
bqemulator 1.4 does not do what BigQuery documents, it is changed to:
- a table's schema widened by tables.patch or tables.update widens the stored table too (bqemulator
  changes only its catalog, so the new columns' values would be dropped on load);
- a load or copy job with WRITE_TRUNCATE replaces the table's schema with the job's (the load's
  schema, the copy's source table's), as BigQuery does; bqemulator kept the old one;
- and, stricter: a load or copy into an existing table, without schemaUpdateOptions and other than
  WRITE_TRUNCATE, is refused unless its schema is the table's ("Provided Schema does not match
  Table"), as BigQuery refuses it; bqemulator dropped the values of the columns the table lacked;
- a copy job updates the table's numRows, as a load job does.
Like every emulator it is still more lenient than BigQuery: it takes load jobs whose
schemaUpdateOptions BigQuery refuses, so the tests check every job's configuration from jobs.list.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from google.cloud import bigquery

from tests.gcs_emulator import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]

CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "bqemulator",
    "client_secret": "bqemulator",
    "refresh_token": "bqemulator",
    "token": "bqemulator",
    "expiry": "2999-01-01T00:00:00Z",
}


@contextlib.contextmanager
def running_bigquery(gcs_root: Path, project: str, scratch: Path) -> Iterator[bigquery.Client]:
    """Start the emulator; until it stops, every BigQuery client of this process talks to it."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp.internal.clients.bigquery import BigqueryV2

    rest, grpc = free_port(), free_port()
    url = f"http://127.0.0.1:{rest}"
    credentials = scratch / "adc.json"
    credentials.write_text(json.dumps(CREDENTIALS))
    environment = dict(
        os.environ,
        BQEMU_GCS_LOCAL_ROOT=str(gcs_root),
        BQEMU_ENABLE_FORMAT_EXTENSIONS="false",  # Avro, also a download; loads here are JSON
        BQEMU_LOG_LEVEL="warning",
    )
    with open(scratch / "bqemulator.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.bigquery_emulator", "start", "--rest-port", str(rest),
             "--grpc-port", str(grpc), "--project", project],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
        )  # fmt: skip
    settings = {
        "BIGQUERY_EMULATOR_HOST": url,
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
        "GOOGLE_CLOUD_PROJECT": project,
    }
    previous = {name: os.environ.get(name) for name in settings}
    base_url, beam_credentials = (
        BigqueryV2.BASE_URL,
        (auth._Credentials._credentials, auth._Credentials._credentials_init),
    )
    try:
        wait_until_up(server, f"{url}/bigquery/v2/projects/{project}/datasets", seconds=60)
        os.environ.update(settings)
        BigqueryV2.BASE_URL = f"{url}/bigquery/v2/"
        auth._Credentials._credentials_init = False  # Beam reads the credentials above when next asked
        yield bigquery.Client(project=project)
    finally:
        BigqueryV2.BASE_URL = base_url
        auth._Credentials._credentials, auth._Credentials._credentials_init = beam_credentials
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(20)


def serve() -> None:
    """bqemulator's command line, with the changes the module's docstring lists."""
    from bqemulator.api.routes import tables
    from bqemulator.catalog.memory_repository import MemoryCatalogRepository
    from bqemulator.catalog.models import TableSchema
    from bqemulator.cli import main
    from bqemulator.domain.errors import InvalidQueryError
    from bqemulator.jobs import executor
    from bqemulator.storage import engine
    from bqemulator.storage.sql_identifiers import quoted_table_ref
    from bqemulator.storage.type_map import bq_schema_to_duckdb_columns

    def rest(schema) -> list[dict]:
        return [tables._field_to_rest(f) for f in schema.fields]

    def widen_storage(update_table):  # the catalog of an ephemeral bqemulator
        def update(self, table):
            if table.table_type == "TABLE" and table.schema_.fields:
                ref = quoted_table_ref(table.project_id, table.dataset_id, table.table_id)
                stored = {row[0]: row[1] for row in self._engine.execute(f"DESCRIBE {ref}").fetchall()}
                for name, kind in bq_schema_to_duckdb_columns(rest(table.schema_)):
                    spelt = self._engine.execute(f"SELECT typeof(NULL::{kind})").fetchone()[0]
                    if name not in stored:
                        self._engine.execute(f'ALTER TABLE {ref} ADD COLUMN "{name}" {kind}')
                    elif stored[name] != spelt:  # a RECORD with new fields: DuckDB casts by name
                        self._engine.execute(f'ALTER TABLE {ref} ALTER COLUMN "{name}" TYPE {kind}')
            return update_table(self, table)

        return update

    def replace_schema(ctx, project: str, dataset: str, table_id: str, fields: list[dict]) -> None:
        ref = quoted_table_ref(project, dataset, table_id)
        columns = ", ".join(f'"{name}" {kind}' for name, kind in bq_schema_to_duckdb_columns(fields))
        ctx.engine.execute(f"CREATE OR REPLACE TABLE {ref} ({columns})")
        meta = ctx.catalog.get_table(project, dataset, table_id)
        schema = TableSchema(fields=tables._parse_schema_fields(fields))
        ctx.catalog.update_table(meta.model_copy(update={"schema_": schema}))

    def refuse_other_schema(kind: str, table, fields: list[dict]) -> None:
        """Without schemaUpdateOptions, BigQuery takes rows into an existing table only under the
        table's own schema (but for WRITE_TRUNCATE, which replaces it)."""
        if table is not None and _shape(fields) != _shape(rest(table.schema_)):
            raise InvalidQueryError(
                f"{kind}: Provided Schema does not match Table {table.dataset_id}.{table.table_id}"
            )

    def checked_load(apply_disposition):
        def apply(job, ctx):
            fields = (job.raw_config.get("schema") or {}).get("fields")
            if fields and job.write_disposition == "WRITE_TRUNCATE":
                replace_schema(ctx, job.project_id, job.dataset_id, job.table_id, fields)
                return None
            if fields and not job.raw_config.get("schemaUpdateOptions"):
                table = ctx.catalog.get_table(job.project_id, job.dataset_id, job.table_id)
                refuse_other_schema("load", table, fields)
            return apply_disposition(job, ctx)

        return apply

    def checked_copy(copy_into):
        async def copy(**job):
            ctx, target = job["ctx"], (job["dst_proj"], job["dst_ds"], job["dst_table_id"])
            source = ctx.catalog.get_table(job["src_proj"], job["src_ds"], job["src_table_id"])
            table = ctx.catalog.get_table(*target)
            if source is not None and table is not None:
                if job["write_disposition"] == "WRITE_TRUNCATE":
                    async with ctx.engine.write_lock():
                        replace_schema(ctx, *target, rest(source.schema_))
                else:
                    refuse_other_schema("copy", table, rest(source.schema_))
            await copy_into(**job)
            table = ctx.catalog.get_table(*target)
            (rows,) = ctx.engine.execute(f"SELECT count(*) FROM {quoted_table_ref(*target)}").fetchone()
            ctx.catalog.update_table(table.model_copy(update={"num_rows": rows}))

        return copy

    engine.DuckDBEngine._load_spatial = lambda self: None
    MemoryCatalogRepository.update_table = widen_storage(MemoryCatalogRepository.update_table)
    executor._apply_load_write_disposition = checked_load(executor._apply_load_write_disposition)
    executor._copy_table_into_destination = checked_copy(executor._copy_table_into_destination)
    main()


def _shape(fields: list[dict]) -> dict:
    """A schema by name (lower case, as BigQuery compares them): type, mode and nested fields."""
    aliases = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}
    return {
        f["name"].lower(): (
            aliases.get(f["type"].upper(), f["type"].upper()),
            (f.get("mode") or "NULLABLE").upper(),
            _shape(f.get("fields") or []),
        )
        for f in fields
    }


if __name__ == "__main__":
    serve()
