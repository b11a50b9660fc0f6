"""Delete studies, series or instances from a store, writing a DELETE row for each deleted instance.

    python -m pipelines.delete_dicom --store projects/p/locations/l/datasets/d/dicomStores/s \\
        --target /studies/1.2.3 --metadata_destination bq://my-project.imaging.instances

The targets are a filter file's lines or `--target` options (the same lines). Each is listed first,
so that the rows name every instance deleted, then deleted in one request (a study or series) or by
file. Deleting never removes rows: the view then shows the store's current state.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.filters import FilterError, parse_line
from pipelines.options import (
    OptionError,
    SharedOptions,
    check_destinations,
    check_filter_file,
    check_metadata_options,
    check_store,
    dead_letter_location,
    parse_options,
    repeated,
)
from pipelines.run import execute, failure_reasons, run_name
from schemas.rows import delete_row
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.metadata_rows import now
from transforms.progress import CountFailures
from transforms.select import DeleteTargets, SelectTargets
from transforms.write_metadata import WriteMetadata


class DeleteDicomOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--target",
            action="append",
            help="What to delete, as a filter line: /studies/UID[/series/UID[/instances/UID]] (repeatable).",
        )


# The options this pipeline takes, for its Dataflow template: name -> required. --target and --filter_file
# are each optional, but exactly one of them must be given (parse() says so). The template's metadata.json
# must list exactly these (tests/test_templates.py checks both against the parser).
OPTIONS: dict[str, bool] = {
    "store": True,
    "target": False,
    "filter_file": False,
    "metadata_destination": False,
    "max_columns": False,
    "exclude_vr": False,
    "dead_letter": False,
}


def parse(argv: Sequence[str]) -> PipelineOptions:
    """Check every option, and every target or filter line, before anything is deleted."""
    options = parse_options(argv, DeleteDicomOptions, OPTIONS)
    mine, shared = options.view_as(DeleteDicomOptions), options.view_as(SharedOptions)
    shared.store = check_store("store", shared.store, options, must_exist=True)
    mine.target = repeated(mine.target)
    if bool(mine.target) == bool(shared.filter_file):
        raise OptionError("target", "give either --target lines or --filter_file (one of them)")
    for text in mine.target:
        try:
            parse_line(text)
        except FilterError as error:
            raise OptionError("target", str(error).replace("filter file line 1: ", "")) from None
    if shared.filter_file:
        shared.filter_file = check_filter_file(shared.filter_file)
    shared.metadata_destination = check_destinations(
        "metadata_destination", shared.metadata_destination, options
    )
    check_metadata_options(options)
    shared.dead_letter = dead_letter_location(options, shared.dead_letter)
    return options


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the deletion; no listing or other I/O happens here."""
    mine, shared = options.view_as(DeleteDicomOptions), options.view_as(SharedOptions)
    name = run_name("delete_dicom")
    deleted = (
        pipeline
        | "Select" >> SelectTargets(shared.store, shared.filter_file, mine.target)
        | "Delete" >> beam.ParDo(DeleteTargets(shared.store)).with_outputs(DEAD_LETTER, main="deleted")
    )
    if shared.metadata_destination:
        _ = (
            deleted.deleted
            | "DeleteRows" >> beam.Map(lambda ref: delete_row(*ref, now()))
            | "WriteRows"
            >> WriteMetadata(shared.metadata_destination, "WRITE_APPEND", shared.max_columns, name)
        )
    _ = (
        deleted[DEAD_LETTER]
        | "CountFailures" >> CountFailures()
        | "DeadLetter" >> WriteDeadLetters(shared.dead_letter, name)
    )


def summarize(counts: dict[str, int]) -> tuple[dict[str, object], bool]:
    """selected = success (deleted) + failure; a target that matched nothing fails the run."""
    keys = ("selected", "success", "failure", "unmatched_targets", "metadata_rows")
    summary: dict[str, object] = {key: counts.get(key, 0) for key in keys}
    summary["failure_reasons"] = failure_reasons(counts)
    return summary, bool(summary["failure"] or summary["unmatched_targets"])


def main(argv: Sequence[str] | None = None) -> int:
    return execute("delete_dicom", sys.argv[1:] if argv is None else argv, parse, build, summarize)


if __name__ == "__main__":
    sys.exit(main())
