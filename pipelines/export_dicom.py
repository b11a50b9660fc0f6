"""Export a store's instances as files: DICOM (as stored, transcoded losslessly or lossy), octet-stream,
JPEG or PNG.

    python -m pipelines.export_dicom --store gs://bucket/store --output gs://archive/2026-11-23 \\
        --filter_file gs://bucket/filters/today.txt

Instances are selected inside the pipeline (studies, then the instances of each; with a filter file,
only what its lines name), reshuffled, and written under `{output}/{study}/{series}/`.
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options.base import EtlOptions
from pipelines.options.groups import DeadLetter, Output, Selection, StoreToRead
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.export import ExportInstances
from transforms.progress import count_failures
from transforms.select import ListInstances, SelectTargets

GROUPS = (StoreToRead, Output, Selection, DeadLetter)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the export; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    targets = pipeline | "Select" >> SelectTargets(values.store, values.filter_file)
    selected = targets | "ListInstances" >> beam.ParDo(ListInstances(values.store)).with_outputs(
        DEAD_LETTER, main="instances"
    )
    exported = (
        selected.instances
        | "SpreadInstances" >> beam.Reshuffle()
        | "Export"
        >> beam.ParDo(
            ExportInstances(
                values.store, values.output, values.file_type, values.transfer_syntax, values.quality
            )
        ).with_outputs(DEAD_LETTER, main="files")
    )
    (
        count_failures([selected[DEAD_LETTER], exported[DEAD_LETTER]])
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, run_name("export_dicom"))
    )


# selected = success + failure; a filter line that matched nothing also fails the run (exit 3)
SUMMARY = (
    "selected",
    "success",
    "failure",
    "unmatched_targets",
    "files_written",
    "objects_listed",
    "bytes_through_worker",
)
PIPELINE = Pipeline("export_dicom", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
