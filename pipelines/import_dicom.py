"""Import DICOM files matched by wildcard patterns into a store.

    python -m pipelines.import_dicom --input 'gs://bucket/dir/**.dcm' --store gs://bucket/store

Patterns are expanded inside the pipeline (never on the launcher), the matches reshuffled so that
parsing spreads over workers, each file's header parsed and validated, and the files grouped by SOP
Instance UID and stored in batches: in a file-layout store, a DICOMweb server (STOW-RS) or a Cloud
Healthcare API store.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.wildcard import Pattern, PatternError, parse_pattern
from pipelines.options import (
    OptionError,
    SharedOptions,
    check_destinations,
    check_metadata_options,
    check_not_url_like,
    check_store,
    dead_letter_location,
    parse_options,
    repeated,
)
from pipelines.run import execute, failure_reasons, run_name
from storage.store import ALREADY_PRESENT, STORAGE_CLASSES, SUCCESS
from storage.stores import store_kind
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.expand import ExpandPatterns
from transforms.metadata_rows import RowsOfImported, WithoutCurrentRow
from transforms.progress import Count, count_failures
from transforms.store_instances import ParseInstances, WriteInstances
from transforms.write_metadata import WriteMetadata

ROWS_CHECKED = 10_000  # already-present instances whose rows one look at a destination checks


class ImportDicomOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--input",
            action="append",
            help="A local or gs:// pattern with the wildcards *, ? and a final ** (repeatable).",
        )
        parser.add_argument(
            "--storage_class",
            help="STANDARD, NEARLINE, COLDLINE or ARCHIVE: the Storage-Class header sent on STOW-RS.",
        )
        parser.add_argument(
            "--verify_stored",
            nargs="?",
            const=True,
            default=False,
            type=_flag,
            help="DICOMweb stores: after each STOW-RS, check with QIDO-RS that every instance the "
            "server acknowledged is there (for servers that may drop what they acknowledge).",
        )
        parser.add_argument(
            "--max_requests_in_flight",
            type=int,
            help="DICOMweb stores: the most requests each worker process has out at once, to keep "
            "within a per-minute quota (default: no cap beyond the writers' own).",
        )


# The options this pipeline takes, for its Dataflow template: name -> required. The template's metadata.json
# must list exactly these (tests/test_templates.py checks both against the parser).
OPTIONS: dict[str, bool] = {
    "input": True,
    "store": True,
    "storage_class": False,
    "verify_stored": False,
    "max_requests_in_flight": False,
    "dead_letter": False,
    "metadata_destination": False,
    "max_columns": False,
    "exclude_vr": False,
}


def _flag(text: str) -> bool:
    """`--verify_stored`, or `--verify_stored=true|false` as a template launch passes it."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


def parse(argv: Sequence[str]) -> PipelineOptions:
    """Parse and check every option before any work; OptionError names the bad one."""
    options = parse_options(argv, ImportDicomOptions, OPTIONS)
    mine = options.view_as(ImportDicomOptions)
    shared = options.view_as(SharedOptions)
    if not repeated(mine.input):
        raise OptionError("input", "required: at least one file pattern")
    mine.input = [_pattern(text).text for text in repeated(mine.input)]
    shared.store = check_store("store", shared.store, options, must_exist=False)
    if mine.storage_class is not None:
        mine.storage_class = mine.storage_class.upper()
        if mine.storage_class not in STORAGE_CLASSES:
            raise OptionError("storage_class", f"must be one of {', '.join(STORAGE_CLASSES)}")
        if store_kind(shared.store) == "files":
            raise OptionError("storage_class", "applies to DICOMweb and Cloud Healthcare API stores only")
    if mine.verify_stored and store_kind(shared.store) == "files":
        raise OptionError("verify_stored", "applies to DICOMweb and Cloud Healthcare API stores only")
    if mine.max_requests_in_flight is not None:
        if mine.max_requests_in_flight < 1:
            raise OptionError("max_requests_in_flight", "must be a positive number")
        if store_kind(shared.store) == "files":
            raise OptionError(
                "max_requests_in_flight", "applies to DICOMweb and Cloud Healthcare API stores only"
            )
    shared.metadata_destination = check_destinations(
        "metadata_destination", shared.metadata_destination, options
    )
    check_metadata_options(options)
    shared.dead_letter = dead_letter_location(options, shared.dead_letter)
    return options


def _pattern(text: str) -> Pattern:
    """Validate a pattern; local ones are made absolute so every worker reads the same files."""
    check_not_url_like("input", text)
    try:
        pattern = parse_pattern(text)
    except PatternError as error:
        raise OptionError("input", str(error)) from None
    return pattern if pattern.is_gcs else parse_pattern(os.path.abspath(text))


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the import; no listing or other I/O happens here."""
    mine, shared = options.view_as(ImportDicomOptions), options.view_as(SharedOptions)
    patterns = [parse_pattern(text) for text in mine.input]
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
            WriteInstances(shared.store, mine.storage_class, mine.verify_stored, mine.max_requests_in_flight)
        ).with_outputs(DEAD_LETTER, main="stored")
    )
    failures = [expanded[DEAD_LETTER], parsed[DEAD_LETTER], stored[DEAD_LETTER]]
    name = run_name("import_dicom")
    if shared.metadata_destination:
        failures += _write_rows(stored.stored, shared, mine, name)
    _ = (
        count_failures(failures)
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(shared.dead_letter, name)
    )


def _write_rows(
    stored: beam.PCollection[dict], shared: SharedOptions, mine: ImportDicomOptions, name: str
) -> list[beam.PCollection]:
    """One CREATE row per newly stored instance, as the Healthcare API's streaming does, to every
    destination; and, to each destination, rows for the already-present instances it has no
    current row for (a run stopped between storing and writing rows): the dead letters."""
    rows_of = RowsOfImported(shared.store, shared.exclude_vr, mine.storage_class, mine.max_requests_in_flight)
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
    for number, destination in enumerate(shared.metadata_destination, start=1):
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
            | f"{label}Write" >> WriteMetadata([destination], "WRITE_APPEND", shared.max_columns, name)
        )
    return failures


def summarize(counts: dict[str, int]) -> tuple[dict[str, object], bool]:
    """matched = success + already_present + failure; unmatched patterns also fail the run."""
    keys = ("matched", "success", "already_present", "failure", "unmatched_patterns")
    summary: dict[str, object] = {key: counts.get(key, 0) for key in keys}
    summary["failure_reasons"] = failure_reasons(counts)
    summary["bytes_read"] = counts.get("bytes_read", 0)
    summary["bytes_stored"] = counts.get("bytes_stored", 0)
    summary["metadata_rows"] = counts.get("metadata_rows", 0)
    summary["metadata_rows_restored"] = counts.get("metadata_rows_restored", 0)
    summary["metadata_failures"] = counts.get("metadata_failures", 0)
    return summary, bool(summary["failure"] or summary["unmatched_patterns"] or summary["metadata_failures"])


def main(argv: Sequence[str] | None = None) -> int:
    return execute("import_dicom", sys.argv[1:] if argv is None else argv, parse, build, summarize)


if __name__ == "__main__":
    sys.exit(main())
