"""Flatten a store's metadata into tables: BigQuery and/or Parquet (local or gs://).

    python -m pipelines.export_metadata --store gs://bucket/store --destination ./metadata \\
        --destination bq://my-project.imaging.instances --write_disposition WRITE_APPEND

Instances are selected as export_dicom selects them (a filter file applies here too), their
attributes read without pixels (WADO-RS metadata from DICOMweb stores), flattened into one CREATE row
each, and written to every destination with the schema widened as needed, plus the view.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import (
    OptionError,
    SharedOptions,
    check_destinations,
    check_filter_file,
    check_metadata_options,
    check_store,
    dead_letter_location,
    parse_options,
)
from pipelines.run import execute, failure_reasons, run_name
from storage.destination import WRITE_DISPOSITIONS
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.metadata_rows import RowsFromStore
from transforms.progress import count_failures
from transforms.select import ListInstances, SelectTargets
from transforms.write_metadata import WriteMetadata


class ExportMetadataOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--destination",
            action="append",
            help="Up to 5 tables: bq://project.dataset.table, or a local or gs:// directory (Parquet).",
        )
        parser.add_argument(
            "--write_disposition",
            default="WRITE_EMPTY",
            help="WRITE_EMPTY (default: refuse a table with rows), WRITE_TRUNCATE or WRITE_APPEND.",
        )


# The options this pipeline takes, for its Dataflow template: name -> required. The template's metadata.json
# must list exactly these (tests/test_templates.py checks both against the parser).
OPTIONS: dict[str, bool] = {
    "store": True,
    "destination": True,
    "write_disposition": False,
    "filter_file": False,
    "max_columns": False,
    "exclude_vr": False,
    "dead_letter": False,
}


def parse(argv: Sequence[str]) -> PipelineOptions:
    """Check every option, and every line of the filter file, before any work."""
    options = parse_options(argv, ExportMetadataOptions, OPTIONS)
    mine, shared = options.view_as(ExportMetadataOptions), options.view_as(SharedOptions)
    shared.store = check_store("store", shared.store, options, must_exist=True)
    mine.destination = check_destinations("destination", mine.destination, options)
    if not mine.destination:
        raise OptionError("destination", "required: bq://project.dataset.table or a directory")
    mine.write_disposition = (mine.write_disposition or "").upper()
    if mine.write_disposition not in WRITE_DISPOSITIONS:
        raise OptionError("write_disposition", f"must be one of {', '.join(WRITE_DISPOSITIONS)}")
    check_metadata_options(options)
    if shared.filter_file:
        shared.filter_file = check_filter_file(shared.filter_file)
    shared.dead_letter = dead_letter_location(options, shared.dead_letter)
    return options


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the export; no listing or other I/O happens here."""
    mine, shared = options.view_as(ExportMetadataOptions), options.view_as(SharedOptions)
    selected = (
        pipeline
        | "Select" >> SelectTargets(shared.store, shared.filter_file)
        | "ListInstances"
        >> beam.ParDo(ListInstances(shared.store)).with_outputs(DEAD_LETTER, main="instances")
    )
    rows = (
        selected.instances
        | "SpreadInstances" >> beam.Reshuffle()
        | "Rows"
        >> beam.ParDo(RowsFromStore(shared.store, shared.exclude_vr)).with_outputs(DEAD_LETTER, main="rows")
    )
    name = run_name("export_metadata")
    _ = rows.rows | "Write" >> WriteMetadata(
        mine.destination, mine.write_disposition, shared.max_columns, name
    )
    (
        count_failures([selected[DEAD_LETTER], rows[DEAD_LETTER]])
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(shared.dead_letter, name)
    )


def summarize(counts: dict[str, int]) -> tuple[dict[str, object], bool]:
    """selected = success + failure; rows is what each destination received."""
    keys = ("selected", "success", "failure", "unmatched_targets", "metadata_rows", "objects_listed")
    summary: dict[str, object] = {key: counts.get(key, 0) for key in keys}
    summary["dicom_stream_warnings"] = counts.get("dicom_stream_warnings", 0)
    summary["failure_reasons"] = failure_reasons(counts)
    return summary, bool(summary["failure"] or summary["unmatched_targets"])


def main(argv: Sequence[str] | None = None) -> int:
    return execute("export_metadata", sys.argv[1:] if argv is None else argv, parse, build, summarize)


if __name__ == "__main__":
    sys.exit(main())
