"""What makes a pipeline, and what every pipeline does with it: parse its command line, run it.

A pipeline module is its docstring (the first line for `dicom-etl --help`, the whole for its own
`--help`), the option groups it takes, `build`, and the counters of its summary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import command_line
from pipelines.options.base import Group
from pipelines.run import execute


@dataclass(frozen=True)
class Pipeline:
    """`build` constructs the pipeline from checked options and does no I/O (a template's launcher
    runs it). `summary` names the counters of the JSON summary, in order; the first is the total of
    success and failure."""

    name: str
    doc: str
    groups: tuple[type[Group], ...]
    build: Callable[[beam.Pipeline, PipelineOptions], None]
    summary: tuple[str, ...]

    @property
    def options(self) -> dict[str, bool]:
        """Its options, name: required; its template's metadata.json lists exactly these."""
        return {option.name: bool(option.required) for group in self.groups for option in group.options}

    def parse(self, argv: Sequence[str]) -> PipelineOptions:
        """Parse and check every option before any work; OptionError names the bad one."""
        return command_line.parse(self.name, self.doc, self.groups, argv)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse, build, run and summarise; the exit status."""
        return execute(self, sys.argv[1:] if argv is None else argv)
