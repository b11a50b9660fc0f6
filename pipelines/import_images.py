"""Import JPEG and PNG images, with metadata from JSON files, into a store as DICOM instances.

    python -m pipelines.import_images --input 'photos/**.jpg' --metadata patient.json --store ./store

Each image becomes a Secondary Capture instance (or, with --sop_class=vl_photographic, a VL
Photographic one): a JPEG Baseline image kept as it is (encapsulated, no re-encoding), a PNG's
pixels stored losslessly. Its attributes come from --metadata and from its
sidecar `<image>.json`; its UIDs are derived from the image and the metadata, so importing it again
finds it already present. Instances are stored as import_dicom stores files, into any store.
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.wildcard import parse_pattern
from pipelines.import_dicom import write_rows
from pipelines.options.base import EtlOptions
from pipelines.options.groups import (
    DeadLetter,
    DicomwebWrites,
    ImageMetadata,
    Input,
    RowsOfRun,
    StoreToImport,
)
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.expand import ExpandPatterns
from transforms.import_images import ConvertImages, RowsOfStoredImages, WriteImages
from transforms.progress import Count, count_failures

GROUPS = (Input, ImageMetadata, StoreToImport, DicomwebWrites, RowsOfRun, DeadLetter)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the import; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    patterns = [parse_pattern(text) for text in values.input]
    expanded = (
        pipeline
        | "Patterns" >> beam.Create(patterns)
        | "Expand" >> beam.ParDo(ExpandPatterns()).with_outputs(DEAD_LETTER, main="files")
    )
    converted = (
        expanded.files
        | "CountMatched" >> Count("matched")
        | "SpreadFiles" >> beam.Reshuffle()
        | "Convert"
        >> beam.ParDo(ConvertImages(values.metadata, values.sop_class)).with_outputs(
            DEAD_LETTER, main="converted"
        )
    )
    stored = (
        converted.converted
        | "CountParsed" >> Count("parsed")  # the progress line's stage: decoded and made
        | "BySopInstanceUid" >> beam.GroupByKey()
        | "Store"
        >> beam.ParDo(
            WriteImages(
                values.store, values.storage_class, values.verify_stored, values.max_requests_in_flight
            )
        ).with_outputs(DEAD_LETTER, main="stored")
    )
    failures = [expanded[DEAD_LETTER], converted[DEAD_LETTER], stored[DEAD_LETTER]]
    name = run_name("import_images")
    if values.metadata_destination:
        failures += write_rows(stored.stored, values, name, RowsOfStoredImages)
    _ = (
        count_failures(failures)
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, name)
    )


# matched = sidecars + success + already_present + failure; a pattern that matched nothing or a row
# that could not be made also fails the run (exit 3)
SUMMARY = (
    "matched",
    "sidecars",
    "success",
    "already_present",
    "failure",
    "unmatched_patterns",
    "bytes_read",
    "bytes_stored",
    "metadata_rows",
    "metadata_rows_restored",
    "metadata_failures",
)
PIPELINE = Pipeline("import_images", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
