"""What every pipeline shares: option checks, the runner, the summary line and exit codes.

Exit codes (CONTRACT.md): 2 bad options, before any work; 1 the pipeline itself failed; 3 the run
finished with failed items; 0 everything succeeded. The last stdout line is a JSON summary: the
counters of a local run, or the job's id and state when a distributed runner's job is submitted
(Dataflow, a flex template launch): the launcher does not wait for the job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from transforms import NAMESPACE
from transforms.filters import FilterError, read_filter
from transforms.metadata_sink import BIGQUERY_TABLE, MAX_DESTINATIONS
from transforms.objects import is_gcs, split_gcs
from transforms.store import HEALTHCARE_STORE, store_kind

LOCAL_RUNNERS = {None, "DirectRunner", "direct", "directrunner"}
KNOWN_VRS = frozenset(
    [
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "PN",
        "SH",
        "SL",
        "SQ",
        "SS",
        "ST",
        "SV",
        "TM",
        "UC",
        "UI",
        "UL",
        "UN",
        "UR",
        "US",
        "UT",
        "UV",
    ]
)


class SharedOptions(PipelineOptions):
    """Options of several pipelines. Beam puts every options class into one parser, so each option
    is defined once, here, and each pipeline checks the ones it uses."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--store",
            help="A local directory or gs://bucket/prefix (file layout), a DICOMweb service root "
            "(http[s]://...), or projects/P/locations/L/datasets/D/dicomStores/S.",
        )
        parser.add_argument(
            "--filter_file",
            help="A local or gs:// file of /studies/UID[/series/UID[/instances/UID]] lines: only these.",
        )
        parser.add_argument(
            "--dead_letter",
            help="Directory (local or gs://) for failed items as JSON lines; default ./dead_letter.",
        )
        parser.add_argument(
            "--metadata_destination",
            action="append",
            help="import and delete: up to 5 metadata tables (bq://project.dataset.table, or a local "
            "or gs:// directory of Parquet files) that get one row per stored or deleted instance.",
        )
        parser.add_argument(
            "--max_columns",
            type=int,
            default=10_000,
            help="Metadata tables: the most columns a table may have, nested fields counted.",
        )
        parser.add_argument(
            "--exclude_vr",
            action="append",
            help="Metadata tables: VRs left out of rows, besides OB OD OF OL OV OW UN (repeatable).",
        )


class OptionError(ValueError):
    """A bad option value; the message names the option and the reason."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"--{option}: {reason}")


def repeated(values: Sequence[str] | None) -> list[str]:
    """A repeatable option, given several times and/or as comma-separated lists."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def check_local_or_gcs(option: str, location: str) -> str:
    """A local directory (made absolute, so every worker agrees) or a gs://bucket[/prefix]."""
    if location.startswith("gs://"):
        if not location[len("gs://") :].split("/")[0]:
            raise OptionError(option, f"{location!r} has no bucket name")
        return location.rstrip("/")
    if "://" in location:
        raise OptionError(option, f"{location!r} is neither a local path nor gs://")
    return os.path.abspath(location)


def check_store(option: str, location: str | None) -> str:
    """A file-layout store (local or gs://), a DICOMweb service root, or a Healthcare API store."""
    if not location:
        raise OptionError(option, "required: a directory, gs:// prefix, DICOMweb URL or Healthcare store")
    kind = store_kind(location)
    if kind == "healthcare":
        if not HEALTHCARE_STORE.fullmatch(location.rstrip("/")):
            raise OptionError(option, f"{location!r} is not projects/P/locations/L/datasets/D/dicomStores/S")
        return location.rstrip("/")
    if kind == "dicomweb":
        url = urllib.parse.urlsplit(location)
        if url.username or url.password:  # the location is logged and printed: no secrets in it
            raise OptionError(option, "credentials go in DICOMWEB_USERNAME/DICOMWEB_PASSWORD, not in the URL")
        if not url.hostname or url.query or url.fragment:
            raise OptionError(option, f"{location!r} is not a DICOMweb service root URL")
        return location.rstrip("/")
    return check_local_or_gcs(option, location)


def check_filter_file(uri: str) -> str:
    """Read a filter file once on the launcher: a malformed line must stop the run before it starts."""
    uri = check_local_or_gcs("filter_file", uri)
    if is_gcs(uri) and not split_gcs(uri)[1]:
        raise OptionError("filter_file", f"{uri!r} names a bucket, not a file")
    try:
        targets = read_filter(uri)
    except FilterError as error:
        raise OptionError("filter_file", str(error)) from None
    except OSError as error:
        raise OptionError("filter_file", f"cannot read {uri}: {error.strerror or error}") from None
    if not targets:
        raise OptionError("filter_file", f"{uri} names no study, series or instance")
    return uri


def check_destinations(option: str, values: Sequence[str] | None, options: PipelineOptions) -> list[str]:
    """Up to five metadata destinations: bq://project.dataset.table, or local or gs:// directories.

    BigQuery file loads stage their files in GCS: a bq:// destination needs a gs:// --temp_location.
    """
    destinations = []
    for text in repeated(values):
        if text.startswith("bq://"):
            if not BIGQUERY_TABLE.fullmatch(text):
                raise OptionError(option, f"{text!r} is not bq://project.dataset.table")
            destinations.append(text)
        else:
            destinations.append(check_local_or_gcs(option, text))
    if len(destinations) > MAX_DESTINATIONS:
        raise OptionError(option, f"{len(destinations)} destinations; at most {MAX_DESTINATIONS}")
    if len(set(destinations)) != len(destinations):
        raise OptionError(option, "a destination is given twice")
    temp = options.view_as(GoogleCloudOptions).temp_location or ""
    if any(d.startswith("bq://") for d in destinations) and not temp.startswith("gs://"):
        raise OptionError(option, "a bq:// destination needs --temp_location=gs://... for its load files")
    return destinations


def check_metadata_options(options: PipelineOptions) -> None:
    """--max_columns and --exclude_vr, used wherever rows are written."""
    shared = options.view_as(SharedOptions)
    if shared.max_columns < 1:
        raise OptionError("max_columns", "must be a positive number")
    shared.exclude_vr = [vr.upper() for vr in repeated(shared.exclude_vr)]
    unknown = [vr for vr in shared.exclude_vr if vr not in KNOWN_VRS]
    if unknown:
        raise OptionError("exclude_vr", f"{', '.join(unknown)} is not a DICOM VR")


def dead_letter_location(options: PipelineOptions, given: str | None) -> str:
    """`--dead_letter`, else ./dead_letter locally, else dead_letter/ under --temp_location."""
    if given:
        return check_local_or_gcs("dead_letter", given)
    if is_local(options):
        return os.path.abspath("dead_letter")
    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise OptionError("dead_letter", "required on a distributed runner without --temp_location")
    return f"{temp.rstrip('/')}/dead_letter"


def is_local(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def run_name(pipeline_name: str) -> str:
    """A name unique to this run, for files that must not overwrite an earlier run's."""
    return f"{pipeline_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def execute(
    argv: Sequence[str],
    parse: Callable[[Sequence[str]], PipelineOptions],
    build: Callable[[beam.Pipeline, PipelineOptions], None],
    summarize: Callable[[dict[str, int]], tuple[dict[str, object], bool]],
) -> int:
    """Parse and check options, build and run the pipeline, print the summary; the exit status.

    `summarize` turns the counters into the summary line and says whether any item failed.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(NAMESPACE).setLevel(logging.INFO)
    logging.getLogger("apache_beam.io.filebasedsink").setLevel(logging.ERROR)  # "no shards": no failures
    try:
        options = parse(argv)
    except OptionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        pipeline = beam.Pipeline(runner=_runner(options), options=options)
        build(pipeline, options)
        result = pipeline.run()
        if not is_local(options):  # a launch (Dataflow, a flex template): submitted, not awaited
            print(json.dumps(_launched(result, options)))
            return 0
        result.wait_until_finish()
    except Exception as error:  # the pipeline itself failed: store unreachable, destination refused
        print(f"error: the pipeline failed: {_last_line(error)}", file=sys.stderr)
        return 1
    summary, failed = summarize(counters(result))
    print(json.dumps(summary))
    return 3 if failed else 0


def _launched(result: beam.runners.runner.PipelineResult, options: PipelineOptions) -> dict[str, object]:
    """The job's id and state. A flex template launch (--template_location) only writes the job's
    description there and Dataflow creates the job, so its result has no job: the job is queued."""
    if getattr(result, "has_job", True):
        job_id = getattr(result, "job_id", None)
        return {"job_id": job_id() if callable(job_id) else job_id, "state": str(result.state)}
    template = options.view_as(GoogleCloudOptions).template_location or ""
    return {"job_id": None, "state": "JOB_STATE_QUEUED", "template_location": template}


def failure_reasons(counts: dict[str, int]) -> dict[str, int]:
    """The dead letters' reasons, as counted by WriteDeadLetters."""
    return {k[len("failure_") :]: v for k, v in sorted(counts.items()) if k.startswith("failure_")}


def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """This run's counters in our namespace, by name."""
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def _runner(options: PipelineOptions) -> beam.runners.PipelineRunner | None:
    """The DirectRunner's in-process engine, used directly: Beam's DirectRunner would first try to
    download the Prism runner binary, which fails (slowly, or not at all) without internet."""
    if not is_local(options):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _last_line(error: BaseException) -> str:
    """Beam wraps a worker's error in its traceback; the cause is the last line, less Beam's
    "[while running 'Step']" suffix."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(error).__name__
    return re.sub(r"\s*\[while running '[^']*'\]$", "", last)
