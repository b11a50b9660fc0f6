"""Import DICOM files matched by wildcard patterns into a store.

    python -m pipelines.import_dicom --input 'gs://bucket/dir/**.dcm' --store gs://bucket/store

Patterns are expanded inside the pipeline (never on the launcher), the matches reshuffled so that
parsing spreads over workers, each file's header parsed and validated, and the files grouped by SOP
Instance UID and stored in batches: in a file-layout store, a DICOMweb server (STOW-RS) or a Cloud
Healthcare API store.
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.wildcard import parse_pattern
from pipelines.options.base import EtlOptions, spool_root
from pipelines.options.groups import DeadLetter, DicomwebWrites, Input, RowsOfRun, StoreToImport
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from storage.store import ALREADY_PRESENT, SUCCESS
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.expand import ExpandPatterns
from transforms.metadata_rows import RowsOfImported, WithoutCurrentRow
from transforms.progress import Count, count_failures
from transforms.store_instances import ParseInstances, WriteInstances
from transforms.write_metadata import WriteMetadata

GROUPS = (Input, StoreToImport, DicomwebWrites, RowsOfRun, DeadLetter)
ROWS_CHECKED = 10_000  # already-present instances whose rows one look at a destination checks


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the import; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    patterns = [parse_pattern(text) for text in values.input]
    expanded = (
        pipeline
        | "Patterns" >> beam.Create(patterns)
        | "Expand" >> beam.ParDo(ExpandPatterns()).with_outputs(DEAD_LETTER, main="files")
    )
    parsed = (
        expanded.files
        | "CountMatched" >> Count("matched")
        | "SpreadFiles" >> beam.Reshuffle()
        | "Parse" >> beam.ParDo(ParseInstances()).with_outputs(DEAD_LETTER, main="parsed")
    )
    stored = (
        parsed.parsed
        | "CountParsed" >> Count("parsed")
        | "BySopInstanceUid" >> beam.GroupByKey()
        | "Store"
        >> beam.ParDo(
            WriteInstances(
                values.store, values.storage_class, values.verify_stored, values.max_requests_in_flight
            )
        ).with_outputs(DEAD_LETTER, main="stored")
    )
    failures = [expanded[DEAD_LETTER], parsed[DEAD_LETTER], stored[DEAD_LETTER]]
    name = run_name("import_dicom")
    if values.metadata_destination:
        failures += write_rows(stored.stored, values, name)
    _ = (
        count_failures(failures)
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, name)
    )


def write_rows(
    stored: beam.PCollection[dict],
    values: EtlOptions,
    name: str,
    rows: type[RowsOfImported] = RowsOfImported,
) -> list[beam.PCollection]:
    """One CREATE row per newly stored instance, as the Healthcare API's streaming does, to every
    destination; and, to each destination, rows for the already-present instances it has no
    current row for (a run stopped between storing and writing rows): the dead letters. `rows`
    makes them (import_images reads the stored instance, not the imported file)."""
    rows_of = rows(values.store, values.exclude_vr, values.storage_class, values.max_requests_in_flight)
    new = (
        stored
        | "NewlyStored" >> beam.Filter(lambda record: record["outcome"] == SUCCESS)
        | "Rows" >> beam.ParDo(rows_of).with_outputs(DEAD_LETTER, main="rows")
    )
    present = (
        stored
        | "AlreadyPresent"
        >> beam.Filter(lambda record: record["outcome"] == ALREADY_PRESENT and not record["repeated"])
        | "PresentBatches" >> beam.BatchElements(min_batch_size=ROWS_CHECKED, max_batch_size=ROWS_CHECKED)
    )
    failures = [new[DEAD_LETTER]]
    for number, destination in enumerate(values.metadata_destination, start=1):
        label = f"Destination{number}"
        restored = (
            present
            | f"{label}WithoutRow" >> beam.ParDo(WithoutCurrentRow(destination))
            | f"{label}RestoredRows" >> beam.ParDo(rows_of).with_outputs(DEAD_LETTER, main="rows")
        )
        failures.append(restored[DEAD_LETTER])
        _ = (
            (new.rows, restored.rows)
            | f"{label}AllRows" >> beam.Flatten()
            | f"{label}Write"
            >> WriteMetadata([destination], "WRITE_APPEND", values.max_columns, name, spool_root(values))
        )
    return failures


# matched = success + already_present + failure; a pattern that matched nothing or a row that could not
# be made also fails the run (exit 3)
SUMMARY = (
    "matched",
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
PIPELINE = Pipeline("import_dicom", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
