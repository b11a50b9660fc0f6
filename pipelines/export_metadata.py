"""Flatten a store's metadata into tables: BigQuery and/or Parquet (local or gs://).

    python -m pipelines.export_metadata --store gs://bucket/store --destination ./metadata \\
        --destination bq://my-project.imaging.instances --write_disposition WRITE_APPEND

Instances are selected as export_dicom selects them (a filter file applies here too), their
attributes read without pixels (WADO-RS metadata from DICOMweb stores), flattened into one CREATE row
each, and written to every destination with the schema widened as needed, plus the view.
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options.base import EtlOptions, spool_root
from pipelines.options.groups import DeadLetter, Selection, StoreToRead, Tables, WriteDisposition
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.metadata_rows import RowsFromStore
from transforms.progress import count_failures
from transforms.select import ListInstances, SelectTargets
from transforms.write_metadata import WriteMetadata

GROUPS = (StoreToRead, Tables, WriteDisposition, Selection, DeadLetter)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the export; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    selected = (
        pipeline
        | "Select" >> SelectTargets(values.store, values.filter_file)
        | "ListInstances"
        >> beam.ParDo(ListInstances(values.store)).with_outputs(DEAD_LETTER, main="instances")
    )
    rows = (
        selected.instances
        | "SpreadInstances" >> beam.Reshuffle()
        | "Rows"
        >> beam.ParDo(RowsFromStore(values.store, values.exclude_vr)).with_outputs(DEAD_LETTER, main="rows")
    )
    name = run_name("export_metadata")
    _ = rows.rows | "Write" >> WriteMetadata(
        values.destination, values.write_disposition, values.max_columns, name, spool_root(options)
    )
    (
        count_failures([selected[DEAD_LETTER], rows[DEAD_LETTER]])
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, name)
    )


# selected = success + failure; metadata_rows is what each destination received; a filter line that
# matched nothing also fails the run (exit 3)
SUMMARY = (
    "selected",
    "success",
    "failure",
    "unmatched_targets",
    "metadata_rows",
    "objects_listed",
    "dicom_stream_warnings",
)
PIPELINE = Pipeline("export_metadata", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
