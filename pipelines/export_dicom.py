"""Export a store's instances as files: DICOM (as stored or transcoded), octet-stream, JPEG or PNG.

    python -m pipelines.export_dicom --store gs://bucket/store --output gs://archive/2026-11-23 \\
        --filter_file gs://bucket/filters/today.txt

Instances are selected inside the pipeline (studies, then the instances of each; with a filter file,
only what its lines name), reshuffled, and written under `{output}/{study}/{series}/`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.convert import FILE_TYPES, TRANSFER_SYNTAXES
from pipelines.options import (
    OptionError,
    SharedOptions,
    check_directory,
    check_filter_file,
    check_local_or_gcs,
    check_store,
    dead_letter_location,
    parse_options,
)
from pipelines.run import execute, failure_reasons, run_name
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.export import ExportInstances
from transforms.progress import count_failures
from transforms.select import ListInstances, SelectTargets


class ExportDicomOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--output", help="A local directory or gs:// prefix; created when missing.")
        parser.add_argument(
            "--file_type", default="dicom", help=f"One of {', '.join(FILE_TYPES)}; default dicom."
        )
        parser.add_argument(
            "--transfer_syntax",
            help="With --file_type=dicom: a lossless transfer syntax UID to transcode to.",
        )


# The options this pipeline takes, for its Dataflow template: name -> required. The template's metadata.json
# must list exactly these (tests/test_templates.py checks both against the parser).
OPTIONS: dict[str, bool] = {
    "store": True,
    "output": True,
    "file_type": False,
    "transfer_syntax": False,
    "filter_file": False,
    "dead_letter": False,
}


def parse(argv: Sequence[str]) -> PipelineOptions:
    """Check every option, and every line of the filter file, before any work."""
    options = parse_options(argv, ExportDicomOptions, OPTIONS)
    mine, shared = options.view_as(ExportDicomOptions), options.view_as(SharedOptions)
    shared.store = check_store("store", shared.store, options, must_exist=True)
    if not mine.output:
        raise OptionError("output", "required: a local directory or gs:// prefix")
    mine.output = check_local_or_gcs("output", mine.output)
    check_directory("output", mine.output, options)
    if mine.file_type not in FILE_TYPES:
        raise OptionError("file_type", f"{mine.file_type!r} is not one of {', '.join(FILE_TYPES)}")
    if mine.transfer_syntax is not None:
        if mine.file_type != "dicom":
            raise OptionError("transfer_syntax", "applies to --file_type=dicom only")
        if mine.transfer_syntax not in TRANSFER_SYNTAXES:
            known = ", ".join(f"{uid} ({name})" for uid, name in TRANSFER_SYNTAXES.items())
            raise OptionError("transfer_syntax", f"{mine.transfer_syntax!r} is not one of {known}")
    if shared.filter_file:
        shared.filter_file = check_filter_file(shared.filter_file)
    shared.dead_letter = dead_letter_location(options, shared.dead_letter)
    return options


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the export; no listing or other I/O happens here."""
    mine, shared = options.view_as(ExportDicomOptions), options.view_as(SharedOptions)
    targets = pipeline | "Select" >> SelectTargets(shared.store, shared.filter_file)
    selected = targets | "ListInstances" >> beam.ParDo(ListInstances(shared.store)).with_outputs(
        DEAD_LETTER, main="instances"
    )
    exported = (
        selected.instances
        | "SpreadInstances" >> beam.Reshuffle()
        | "Export"
        >> beam.ParDo(
            ExportInstances(shared.store, mine.output, mine.file_type, mine.transfer_syntax)
        ).with_outputs(DEAD_LETTER, main="files")
    )
    (
        count_failures([selected[DEAD_LETTER], exported[DEAD_LETTER]])
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(shared.dead_letter, run_name("export_dicom"))
    )


def summarize(counts: dict[str, int]) -> tuple[dict[str, object], bool]:
    """selected = success + failure; a filter target that matched nothing also fails the run."""
    keys = ("selected", "success", "failure", "unmatched_targets", "files_written")
    keys += ("objects_listed", "bytes_through_worker")
    summary: dict[str, object] = {key: counts.get(key, 0) for key in keys}
    summary["failure_reasons"] = failure_reasons(counts)
    return summary, bool(summary["failure"] or summary["unmatched_targets"])


def main(argv: Sequence[str] | None = None) -> int:
    return execute("export_dicom", sys.argv[1:] if argv is None else argv, parse, build, summarize)


if __name__ == "__main__":
    sys.exit(main())
