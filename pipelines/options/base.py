"""What an option and a group of options are, and the one Beam options class that defines them all.

Beam reads every `PipelineOptions` subclass into one parser, so an option may be defined only once in
the process: every group's options are defined on `EtlOptions`, whatever the pipeline, and a pipeline's
command line accepts only those of the groups it takes (command_line.py refuses the others).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from storage.staging import SPOOL_ROOT

LOCAL_RUNNERS = {None, "DirectRunner", "direct", "directrunner"}


class OptionError(ValueError):
    """A bad command line; the message names the option (when there is one) and the reason."""

    def __init__(self, option: str | None, reason: str) -> None:
        super().__init__(f"--{option}: {reason}" if option else reason)


class HelpRequested(Exception):
    """`--help` or `-h`: the text to print instead of running."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def true_or_false(text: str) -> bool:
    """A switch's value, as a template launch passes it: `--verify_stored=true`."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


@dataclass(frozen=True)
class Option:
    """One option: how it is read and its help text. A required one says what it wants (`required`),
    for the refusal when it is missing; a repeatable one may be given several times and/or as
    comma-separated lists; a switch is true when given alone."""

    name: str
    help: str
    required: str = ""
    repeatable: bool = False
    type: Callable[[str], Any] = str
    default: Any = None
    switch: bool = False

    def parses_like(self, other: Option) -> bool:
        """Two pipelines may give one option name different meanings (`--destination`: tables for
        export_metadata, a store for deidentify_dicom) with their own help and requirement, as long as
        Beam's one parser reads both alike."""
        return (self.repeatable, self.type, self.default, self.switch) == (
            other.repeatable,
            other.type,
            other.default,
            other.switch,
        )

    def add_to(self, parser: argparse._ActionsContainer, help: str | None = None) -> None:
        kwargs: dict[str, Any] = {"help": self.help if help is None else help}
        if self.switch:
            kwargs |= {"nargs": "?", "const": True, "default": False, "type": true_or_false}
            kwargs["metavar"] = "true|false"
        else:
            kwargs |= {"type": self.type, "default": self.default}
            if self.repeatable:
                kwargs["action"] = "append"
        parser.add_argument(f"--{self.name}", **kwargs)


class Group:
    """Options that belong together, and the check of their values.

        A subclass lists its `options` and, in `check`, refuses bad values (OptionError) and writes back
        their normal form (absolute paths, upper-case names). Required options and repeated values are
        handled before `check` (command_line.py). Defining a subclass registers its options in `EVERY`,
        which `EtlOptions` defines for Beam; an option is one object, shared by the groups that take it, or
    variants of one name that parse alike (Option.parses_like).
    """

    title: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    EVERY: ClassVar[dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for option in cls.options:
            known = Group.EVERY.setdefault(option.name, option)
            if known is not option and not known.parses_like(option):
                raise TypeError(f"--{option.name} is defined twice, parsed differently")

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        """Refuse bad values; write back normal forms. Nothing that needs the network."""


class EtlOptions(PipelineOptions):
    """Every group's options, for Beam: `options.view_as(EtlOptions).store`."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        for option in Group.EVERY.values():
            option.add_to(parser)


def repeated(values: Sequence[str] | None) -> list[str]:
    """A repeatable option, given several times and/or as comma-separated lists."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def is_local(options: PipelineOptions) -> bool:
    """A run on this machine, where local paths can be checked; not on a distributed runner's workers."""
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def spool_root(options: PipelineOptions) -> str:
    """Where a run keeps data between its stages: this machine's temporary directory on the direct
    runner, else `--temp_location` (or `--staging_location`, as Beam defaults it; empty if neither
    is given): a distributed runner's workers share no disk."""
    if is_local(options):
        return SPOOL_ROOT
    cloud = options.view_as(GoogleCloudOptions)
    return cloud.temp_location or cloud.staging_location or ""
