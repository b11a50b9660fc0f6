"""Delete studies, series or instances from a store, writing a DELETE row for each deleted instance.

    python -m pipelines.delete_dicom --store projects/p/locations/l/datasets/d/dicomStores/s \\
        --target /studies/1.2.3 --metadata_destination bq://my-project.imaging.instances

The targets are a filter file's lines or `--target` options (the same lines). Each is listed first,
so that the rows name every instance deleted, then deleted in one request (a study or series) or by
file. Deleting never removes rows: the view then shows the store's current state.
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options.base import EtlOptions, spool_root
from pipelines.options.groups import DeadLetter, RowsOfRun, StoreToRead, Targets
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from schemas.rows import delete_row
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.metadata_rows import now
from transforms.progress import CountFailures
from transforms.select import DeleteTargets, SelectTargets
from transforms.write_metadata import WriteMetadata

GROUPS = (StoreToRead, Targets, RowsOfRun, DeadLetter)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the deletion; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    name = run_name("delete_dicom")
    deleted = (
        pipeline
        | "Select" >> SelectTargets(values.store, values.filter_file, values.target)
        | "Delete" >> beam.ParDo(DeleteTargets(values.store)).with_outputs(DEAD_LETTER, main="deleted")
    )
    if values.metadata_destination:
        _ = (
            deleted.deleted
            | "DeleteRows" >> beam.Map(lambda ref: delete_row(ref.study, ref.series, ref.sop, now()))
            | "WriteRows"
            >> WriteMetadata(
                values.metadata_destination, "WRITE_APPEND", values.max_columns, name, spool_root(options)
            )
        )
    _ = (
        deleted[DEAD_LETTER]
        | "CountFailures" >> CountFailures()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, name)
    )


# selected = success (deleted) + failure; a target that matched nothing also fails the run (exit 3)
SUMMARY = ("selected", "success", "failure", "unmatched_targets", "metadata_rows")
PIPELINE = Pipeline("delete_dicom", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
