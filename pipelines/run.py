"""What makes a pipeline, and running one: parse, then a local run or a distributed launch; the exit
status. A pipeline module is its docstring (the first line for `dicom-etl --help`, the whole for its
own `--help`), the option groups it takes, `build`, and the counters of its summary: a `Pipeline`.

Exit codes (CONTRACT.md): 2 bad options, before any work (one line on stderr, nothing on stdout); 1
the run failed; 3 the run finished with failed items; 0 everything succeeded. Exits 1 and 3 print one
line on stderr saying why. The last stdout line is a JSON summary: the counters of a local run (after
exit 1, what was counted before the failure, with its "error"), or the job's id and state when a
distributed runner's job is submitted (Dataflow, a flex template launch): the launcher does not wait
for the job.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import progress_lines
from pipelines.interrupt import exit_on_interrupt
from pipelines.options import command_line
from pipelines.options.base import EtlOptions, Group, HelpRequested, OptionError, is_local
from pipelines.run_log import LOGGER, RunLog
from pipelines.summary import counters, failure_line, launched, so_far, summarize
from storage.row_spool import remove_local_spools


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


def execute(pipeline: Pipeline, argv: Sequence[str]) -> int:
    """Parse and check options, build and run the pipeline, print the summary; the exit status."""
    with RunLog(pipeline.name) as log:
        try:
            try:
                options = pipeline.parse(argv)
            except HelpRequested as help:
                print(help.text, end="")
                return 0
            except OptionError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            if options.view_as(EtlOptions).verbose:
                log.show_on_stderr()
            if not is_local(options):
                return _launch(pipeline, options, log)
            return _run(pipeline, options, log)
        except KeyboardInterrupt:
            return _failed("interrupted (Ctrl-C)", {}, pipeline, log)
        except Exception as error:  # anything else before the run, e.g. a refused gs:// filter file
            return _failed(f"the pipeline failed: {_last_line(error)}", {}, pipeline, log, error)


def _run(pipeline: Pipeline, options: PipelineOptions, log: RunLog) -> int:
    """A local run, with progress lines; exit 0, 3 or 1."""
    reporter = progress_lines.Reporter(pipeline.name)

    def interrupted() -> int:
        status = _failed("interrupted (Ctrl-C)", reporter.counts(), pipeline, log)
        reporter.remove()
        remove_local_spools()
        return status

    with exit_on_interrupt(interrupted), log.stderr_to_file(), reporter:
        try:
            graph = beam.Pipeline(runner=_runner(), options=options)
            pipeline.build(graph, options)
            result = graph.run()
            result.wait_until_finish()
        except Exception as error:  # the pipeline itself failed: store unreachable, destination refused
            return _failed(
                f"the pipeline failed: {_last_line(error)}", reporter.counts(), pipeline, log, error
            )
        finally:
            remove_local_spools()
    summary, failed = summarize(pipeline.summary, counters(result))
    print(json.dumps(summary))
    if not failed:
        return 0
    print(failure_line(summary, options.view_as(EtlOptions).dead_letter), file=sys.stderr)
    return 3


def _launch(pipeline: Pipeline, options: PipelineOptions, log: RunLog) -> int:
    """A distributed run (Dataflow, a flex template launch): submitted, not awaited; exit 0 or 1."""
    try:
        graph = beam.Pipeline(options=options)
        pipeline.build(graph, options)
        result = graph.run()
    except Exception as error:
        return _failed(f"the launch failed: {_last_line(error)}", {}, pipeline, log, error)
    print(json.dumps(launched(result, options)))
    return 0


def _failed(
    reason: str, counts: dict[str, int], pipeline: Pipeline, log: RunLog, error: BaseException | None = None
) -> int:
    """Exit 1: one line on stderr, and the summary of what was counted before, with the error."""
    if error is not None:
        LOGGER.error("the run failed", exc_info=error)
    kept = {"log": log.path} if os.path.exists(log.path) and os.path.getsize(log.path) else {}
    log.keep = bool(kept)  # an empty log (Ctrl-C, say) tells nothing: it goes
    print(f"error: {reason}", file=sys.stderr)
    print(json.dumps(so_far(pipeline.summary, counts) | {"error": reason} | kept))
    return 1


def _runner() -> beam.runners.PipelineRunner:
    """The DirectRunner's in-process engine, used directly: Beam's DirectRunner would first try to
    download the Prism runner binary, which fails (slowly, or not at all) without internet."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _last_line(error: BaseException) -> str:
    """Beam wraps a worker's error in its traceback; the cause is the last line, less Beam's
    "[while running 'Step']" suffix. From a worker process (`--direct_running_mode=multi_processing`)
    the error arrives as the text of its traceback, whose last line starts with the exception's
    name (`storage.store.StoreUnavailable: ...`): that goes too, so the line is the one a run in
    one process gives."""
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(error).__name__
    if text.startswith("Traceback (most recent call last):"):
        last = re.sub(r"^[A-Za-z_][\w.]*: ", "", last)
    return re.sub(r"\s*\[while running '[^']*'\]$", "", last)
