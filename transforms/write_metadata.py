"""Write metadata rows to up to five destinations: Parquet tables (local or gs://) and BigQuery.

Every destination gets the same rows under the same rules: the table's schema only widens (the
existing schema merged with this run's columns, as far as `--max_columns` allows), columns past the
limit go to DroppedTags, and the view of the store's current state is written next to the table
(`view.sql` run by DuckDB, or the BigQuery view `{table}_view`).

The rows are spooled to files (storage/row_spool.py) while their schemas are merged, and each
destination reads them back once the table's schema is known: no runner holds the run's rows in
memory waiting for the schema.

A BigQuery table is created, or widened by a schema patch (tables.patch), before its rows are
loaded, so that no load job needs schemaUpdateOptions: BigQuery accepts those only with WRITE_APPEND
(or WRITE_TRUNCATE on a partition), and a large load, which Beam splits into loads into temporary
tables and copies, meets Beam issue 21105 with them. Each load then carries exactly the table's
schema, whatever the disposition and the size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from dicomlib import NAMESPACE
from dicomlib.flatten.columns import in_tag_order
from schemas.bigquery import SchemaConflict, merge
from schemas.rows import Flat, restrict
from storage.bigquery_table import finish_table, json_row, prepare_table
from storage.destination import Destination, DestinationRefused
from storage.objects import delete_tree
from storage.parquet_table import ROWS_PER_FILE, finish_parquet, write_parquet_file
from storage.row_spool import Spooled, read_spool, spool_directory, write_spool
from storage.staging import clean_staging
from storage.tables import table_schema

SPOOL_ROWS = 1000  # rows a spool file holds: tens of MB in memory while it fills


class WriteMetadata(beam.PTransform):
    """Flat rows -> every destination; counts rows written and drops only the logger could record."""

    def __init__(
        self,
        destinations: Iterable[str],
        write_disposition: str,
        max_columns: int,
        run_name: str,
        spool_root: str,
    ) -> None:
        super().__init__()
        self.destinations = [Destination(text) for text in destinations]
        self.write_disposition = write_disposition
        self.max_columns = max_columns
        self.run_name = run_name
        self.spool = spool_directory(spool_root, run_name)
        self.spool_root = spool_root

    def expand(self, flats: beam.PCollection[Flat]) -> beam.pvalue.PDone:
        spooled = flats | "Spool" >> beam.ParDo(SpoolRows(self.spool_root, self.spool))
        candidate = (
            spooled
            | "Schemas" >> beam.Map(lambda spooled: spooled.schema)
            | "MergeSchemas" >> beam.CombineGlobally(MergeSchemas())
        )
        spooled = spooled | "SpreadSpools" >> beam.Reshuffle()
        finished = []
        for number, destination in enumerate(self.destinations, start=1):
            label = f"Destination{number}"
            schema = candidate | f"{label}Schema" >> beam.Map(
                table_schema, destination, self.write_disposition, self.max_columns
            )
            rows = spooled | f"{label}Restrict" >> beam.ParDo(Restrict(), beam.pvalue.AsSingleton(schema))
            if destination.is_bigquery:
                finished.append(_write_bigquery(rows, schema, destination, self.write_disposition, label))
            else:
                files = (
                    rows
                    | f"{label}Batch"
                    >> beam.BatchElements(min_batch_size=ROWS_PER_FILE, max_batch_size=ROWS_PER_FILE)
                    | f"{label}Parquet"
                    >> beam.ParDo(
                        WriteParquet(destination.location, self.run_name), beam.pvalue.AsSingleton(schema)
                    )
                )
                finished.append(
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
        _ = (
            finished
            | "AllFinished" >> beam.Flatten()
            | "CountFinished" >> beam.combiners.Count.Globally()
            | "RemoveSpool" >> beam.Map(lambda _, spool: delete_tree(spool), self.spool)
        )
        return beam.pvalue.PDone(flats.pipeline)


class SpoolRows(beam.DoFn):
    """Flat rows -> spool files of up to SPOOL_ROWS rows each, with the schema of their rows."""

    def __init__(self, root: str, directory: str) -> None:
        self.root = root
        self.directory = directory
        self.flats: list[Flat] = []

    def setup(self) -> None:
        clean_staging(self.root)  # what failed or killed runs spooled

    def start_bundle(self) -> None:
        self.flats = []

    def process(self, flat: Flat) -> Iterator[Spooled]:
        self.flats.append(flat)
        if len(self.flats) >= SPOOL_ROWS:
            yield self._spool()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self.flats:
            yield GlobalWindows.windowed_value(self._spool())

    def _spool(self) -> Spooled:
        schema: list[dict] = []
        for flat in self.flats:
            schema = _merge(schema, flat.schema)
        spooled = Spooled(write_spool(self.directory, self.flats), schema)
        self.flats = []
        return spooled


class MergeSchemas(beam.CombineFn):
    """Every row's schema merged into this run's columns (widening only), in tag order: the order
    of merging depends on how the run was split."""

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
        return in_tag_order(accumulator)


def _merge(existing: list[dict], new: list[dict]) -> list[dict]:
    try:
        return merge(existing, new)
    except SchemaConflict as error:
        raise DestinationRefused(f"rows of this run disagree on a column: {error}") from None


class Restrict(beam.DoFn):
    """A spool file -> its rows cut to their destination's schema; drops that not even DroppedTags
    can hold are counted."""

    def __init__(self) -> None:
        self.rows = Metrics.counter(NAMESPACE, "metadata_rows")
        self.unrecorded = Metrics.counter(NAMESPACE, "dicom_stream_warnings")

    def process(self, spooled: Spooled, schema: list[dict]) -> Iterator[dict[str, Any]]:
        for flat in read_spool(spooled.path):
            cut, unrecorded = restrict(flat, schema)
            self.unrecorded.inc(unrecorded)
            self.rows.inc()
            yield cut.row


class WriteParquet(beam.DoFn):
    """Batches of rows (at most ROWS_PER_FILE) -> a Parquet file each, named for the run; their paths."""

    def __init__(self, directory: str, run_name: str) -> None:
        self.directory = directory
        self.run_name = run_name

    def setup(self) -> None:
        clean_staging(self.directory)

    def teardown(self) -> None:
        clean_staging(self.directory)  # the staging directory, once empty

    def process(self, rows: list[dict[str, Any]], schema: list[dict]) -> Iterator[str]:
        yield write_parquet_file(rows, schema, self.directory, self.run_name)


def _write_bigquery(
    rows: beam.PCollection[dict],
    schema: beam.PCollection[list[dict]],
    destination: Destination,
    disposition: str,
    label: str,
) -> beam.PCollection:
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
    return (
        (loaded.destination_load_jobid_pairs, loaded.destination_copy_jobid_pairs)
        | f"{label}Jobs" >> beam.Flatten()
        | f"{label}Loaded" >> beam.combiners.Count.Globally()
        | f"{label}Finish" >> beam.Map(finish_table, destination, disposition, plan)
    )
