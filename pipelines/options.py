"""The command line of every pipeline: its options, `--help`, and the checks made before any work.

A command line is checked whole before anything runs (CONTRACT.md: exit 2, one line on stderr): an
argument that is neither one of the pipeline's own options nor a known Beam or Dataflow option is
refused, naming it (and the option it most resembles); so is a stray value, such as the second file
of an unquoted pattern that the shell expanded; so is a value of the wrong type. Then each pipeline
checks its values: the form of every location, and local paths (a store that must exist, a file where
a directory must be); never anything that needs the network, such as listing a bucket.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from dicomlib.filters import FilterError
from storage.destination import BIGQUERY_TABLE, MAX_DESTINATIONS
from storage.objects import is_gcs, read_filter, split_gcs
from storage.stores import HEALTHCARE_STORE, store_kind

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
# A location that starts like a URL but is not one, e.g. `gs:/bucket/x`: as a local path it would
# quietly become a directory named `gs:`.
URL_LIKE = re.compile(r"(?i)(gs|bq|https?):")
PASS_THROUGH = (
    "All Apache Beam and Dataflow options pass through, e.g. --runner, --project, --region,\n"
    "--temp_location, --setup_file, --direct_num_workers, --direct_running_mode, --sdk_container_image;\n"
    "any other argument is refused (exit 2).\n\n"
    "Exit status: 0 every item succeeded; 3 the run finished but some items failed (one line on stderr,\n"
    "the items in the dead letters); 2 bad options, nothing done; 1 the run failed (one line on\n"
    "stderr, details in the log file it names). The last line on stdout is the run's JSON summary\n"
    '(also after exit 1, with an "error"); a progress line goes to stderr every 10 seconds.'
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
            help="Up to 5 metadata tables (bq://project.dataset.table, or a local or gs:// directory "
            "of Parquet files) that get one row per stored or deleted instance (repeatable).",
        )
        parser.add_argument(
            "--max_columns",
            type=int,
            default=10_000,
            help="Metadata tables: the most columns a table may have, nested fields counted; default 10000.",
        )
        parser.add_argument(
            "--exclude_vr",
            action="append",
            help="Metadata tables: VRs left out of rows, besides OB OD OF OL OV OW UN (repeatable).",
        )


class RunOptions(PipelineOptions):
    """Options of the command line itself, for every pipeline; not template parameters."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="Show the logs of every library (warnings, tracebacks) on stderr as they come, besides "
            "the run's log file (kept, and named in the summary, only when the run fails).",
        )


class OptionError(ValueError):
    """A bad command line; the message names the option (when there is one) and the reason."""

    def __init__(self, option: str | None, reason: str) -> None:
        super().__init__(f"--{option}: {reason}" if option else reason)


class HelpRequested(Exception):
    """`--help` or `-h`: the text to print instead of running."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Refusing(argparse.ArgumentParser):
    """A parser whose errors are OptionErrors (one line), not a usage block and SystemExit."""

    def error(self, message: str) -> NoReturn:
        match = re.fullmatch(r"argument (-[^\s:/]+)(?:/\S+)?: (.*)", message, flags=re.DOTALL)
        if not match:
            raise OptionError(None, message)
        reason = re.sub(r"^invalid int value: (.*)$", r"\1 is not a whole number", match[2])
        raise OptionError(match[1].lstrip("-"), reason)


class _Recorder:
    """Collects an options class's arguments, so a pipeline can take only the ones it uses."""

    def __init__(self) -> None:
        self.arguments: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        self.arguments[flags[0].lstrip("-")] = (flags, kwargs)


def parse_options(
    argv: Sequence[str], own: type[PipelineOptions], names: Mapping[str, bool]
) -> PipelineOptions:
    """The pipeline's options from the command line, refusing anything that is neither one of its
    own (`names`, defined by `own` or SharedOptions; True if required) nor a Beam or Dataflow option.

    HelpRequested for `--help`; OptionError for an unknown option, a stray value or a value of the
    wrong type."""
    argv = list(argv)
    recorder = _Recorder()
    SharedOptions._add_argparse_args(recorder)
    own._add_argparse_args(recorder)
    arguments = {name: recorder.arguments[name] for name in names}
    if {"-h", "--help"} & set(argv):
        raise HelpRequested(_help(own, names, arguments))
    parser = _Refusing(allow_abbrev=False, add_help=False)
    for options_class in PipelineOptions.__subclasses__():
        if options_class.__module__.startswith("apache_beam."):
            options_class._add_argparse_args(parser)
    RunOptions._add_argparse_args(parser)
    ours = [flags[0] for flags, _ in arguments.values()] + ["--verbose", "--help"]
    for flags, kwargs in arguments.values():
        parser.add_argument(*flags, **kwargs)
    _, unknown = parser.parse_known_args(argv)
    others = [f"--{name}" for name in recorder.arguments if name not in names]
    _refuse(unknown, ours, [flag for action in parser._actions for flag in action.option_strings], others)
    return PipelineOptions(argv)


def _refuse(unknown: list[str], ours: list[str], known: list[str], others: list[str]) -> None:
    """An OptionError naming the unknown options, else the stray values, if there are any.
    `others` are options of other pipelines."""
    options, strays = [], []
    index = 0
    while index < len(unknown):
        argument = unknown[index]
        if argument.startswith("-") and argument != "-":
            options.append(argument.split("=", 1)[0])
            if "=" not in argument and index + 1 < len(unknown) and not unknown[index + 1].startswith("-"):
                index += 1  # the unknown option's value
        else:
            strays.append(argument)
        index += 1
    if options:
        first = options[0]
        if first in others:
            raise OptionError(None, f"{first}: not an option of this pipeline (see --help)")
        guess = difflib.get_close_matches(first, ours, n=1) or difflib.get_close_matches(first, known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        more = f"; also unknown: {', '.join(options[1:])}" if options[1:] else ""
        raise OptionError(None, f"{first}: unknown option{hint}{more}")
    if strays:
        shown = ", ".join(repr(stray) for stray in strays[:3]) + (
            f" and {len(strays) - 3} more" if strays[3:] else ""
        )
        raise OptionError(
            None,
            f"unexpected argument{'s' if strays[1:] else ''} {shown}: every value belongs to an option "
            "(--option=value); quote a value with wildcards, e.g. --input='dir/*.dcm', so that the shell "
            "does not expand it",
        )


def _help(own: type[PipelineOptions], names: Mapping[str, bool], arguments: Mapping[str, Any]) -> str:
    """The pipeline's own options with their help texts: its module's docstring, then the options."""
    module = sys.modules[own.__module__]  # `__main__` when run as python -m pipelines.<name>
    name = (module.__spec__.name if module.__spec__ else module.__name__).rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(
        prog=f"dicom-etl {name}",
        usage=f"dicom-etl {name} --option=value ...   (or: python -m pipelines.{name} --option=value ...)",
        description=inspect.cleandoc(module.__doc__ or ""),
        epilog=PASS_THROUGH,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=40, width=100
        ),
        add_help=False,
    )
    group = parser.add_argument_group(f"options of {name}")
    for option, (flags, kwargs) in arguments.items():
        text = kwargs.get("help", "") + (" Required." if names[option] else "")
        group.add_argument(*flags, **(kwargs | {"help": text}))
    command_line = parser.add_argument_group("options of the command line")
    RunOptions._add_argparse_args(command_line)
    command_line.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    return parser.format_help()


def repeated(values: Sequence[str] | None) -> list[str]:
    """A repeatable option, given several times and/or as comma-separated lists."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def check_local_or_gcs(option: str, location: str) -> str:
    """A local path (made absolute, so every worker agrees) or a gs://bucket[/prefix]."""
    if location.startswith("gs://"):
        if not location[len("gs://") :].split("/")[0]:
            raise OptionError(option, f"{location!r} has no bucket name")
        return location.rstrip("/")
    if "://" in location:
        raise OptionError(option, f"{location!r} is neither a local path nor gs://")
    check_not_url_like(option, location)
    return os.path.abspath(location)


def check_not_url_like(option: str, location: str) -> None:
    """`gs:/bucket/x` (one slash) or `gs:bucket` is a mistyped URL, not a local directory `gs:`."""
    scheme = URL_LIKE.match(location)
    if scheme and not location.startswith(f"{scheme[1].lower()}://"):
        raise OptionError(
            option, f"{location!r} is malformed: write {scheme[1].lower()}://... with two slashes"
        )


def check_directory(option: str, location: str, options: PipelineOptions, must_exist: bool = False) -> None:
    """A local directory of a local run: no file in its place or on its way; one that is read must
    exist. A gs:// location is not looked at (that would need the network on the launcher), nor a
    local path on a distributed runner (it names a worker's disk, not this one)."""
    if is_gcs(location) or not is_local(options) or os.path.isdir(location):
        return
    if os.path.exists(location):
        raise OptionError(option, f"{location} is a file, not a directory")
    if must_exist:
        raise OptionError(option, f"{location} does not exist")
    parent = os.path.dirname(location)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OptionError(option, f"{parent} is a file, so {location} cannot be made")


def check_store(option: str, location: str | None, options: PipelineOptions, must_exist: bool) -> str:
    """A file-layout store (local or gs://), a DICOMweb service root, or a Healthcare API store.

    A local store that is read (`must_exist`) must be a directory already; one imported into may be
    made by the run."""
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
    location = check_local_or_gcs(option, location)
    check_directory(option, location, options, must_exist)
    return location


def check_filter_file(uri: str) -> str:
    """Read a filter file once on the launcher, as the pipeline reads it: a malformed line must stop
    the run before it starts."""
    uri = check_local_or_gcs("filter_file", uri)
    if is_gcs(uri) and not split_gcs(uri)[1]:
        raise OptionError("filter_file", f"{uri!r} names a bucket, not a file")
    try:
        lines = sum(1 for _ in read_filter(uri))
    except FilterError as error:
        raise OptionError("filter_file", str(error)) from None
    except OSError as error:
        raise OptionError("filter_file", f"cannot read {uri}: {error.strerror or error}") from None
    if not lines:
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
            destination = check_local_or_gcs(option, text)
            check_directory(option, destination, options)
            destinations.append(destination)
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
        location = check_local_or_gcs("dead_letter", given)
    elif is_local(options):
        location = os.path.abspath("dead_letter")
    else:
        temp = options.view_as(GoogleCloudOptions).temp_location
        if not temp:
            raise OptionError("dead_letter", "required on a distributed runner without --temp_location")
        location = f"{temp.rstrip('/')}/dead_letter"
    check_directory("dead_letter", location, options)
    return location


def is_local(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS
