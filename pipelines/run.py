"""What every pipeline's run shares: the runner, the log file, progress, the summary line and exit codes.

Exit codes (CONTRACT.md): 2 bad options, before any work (one line on stderr, nothing on stdout); 1
the run failed; 3 the run finished with failed items; 0 everything succeeded. Exits 1 and 3 print one
line on stderr saying why. The last stdout line is a JSON summary: the counters of a local run (after
exit 1, what was counted before the failure, with its "error"), or the job's id and state when a
distributed runner's job is submitted (Dataflow, a flex template launch): the launcher does not wait
for the job.

Stderr holds only these lines and progress lines. What libraries log (warnings, codec tracebacks of
instances counted as failed, Beam's errors) and whatever else reaches the process's stderr during a
run goes to a log file in the temporary directory, kept only after exit 1 and named in its JSON line;
`--verbose` shows it all on stderr instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from dicomlib import NAMESPACE
from pipelines.options import HelpRequested, OptionError, RunOptions, SharedOptions, is_local
from transforms import progress

LOGGER = logging.getLogger(NAMESPACE)
Summarize = Callable[[dict[str, int]], tuple[dict[str, Any], bool]]


def run_name(pipeline_name: str) -> str:
    """A name unique to this run, for files that must not overwrite an earlier run's."""
    return f"{pipeline_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def execute(
    name: str,
    argv: Sequence[str],
    parse: Callable[[Sequence[str]], PipelineOptions],
    build: Callable[[beam.Pipeline, PipelineOptions], None],
    summarize: Summarize,
) -> int:
    """Parse and check options, build and run the pipeline, print the summary; the exit status.

    `summarize` turns the counters into the summary line and says whether any item failed.
    """
    with RunLog(name) as log:
        try:
            try:
                options = parse(argv)
            except HelpRequested as help:
                print(help.text, end="")
                return 0
            except OptionError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            if options.view_as(RunOptions).verbose:
                log.show_on_stderr()
            if not is_local(options):
                return _launch(options, build, summarize, log)
            return _run(name, options, build, summarize, log)
        except KeyboardInterrupt:
            return _failed("interrupted (Ctrl-C)", {}, summarize, log)
        except Exception as error:  # anything else before the run, e.g. a refused gs:// filter file
            return _failed(f"the pipeline failed: {_last_line(error)}", {}, summarize, log, error)


def _run(name: str, options: PipelineOptions, build: Callable, summarize: Summarize, log: RunLog) -> int:
    """A local run, with progress lines; exit 0, 3 or 1."""
    reporter = progress.Reporter(name)

    def interrupted() -> int:
        status = _failed("interrupted (Ctrl-C)", reporter.counts(), summarize, log)
        reporter.remove()
        return status

    with _exit_on_interrupt(interrupted), log.stderr_to_file(), reporter:
        try:
            pipeline = beam.Pipeline(runner=_runner(), options=options)
            build(pipeline, options)
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as error:  # the pipeline itself failed: store unreachable, destination refused
            return _failed(
                f"the pipeline failed: {_last_line(error)}", reporter.counts(), summarize, log, error
            )
    summary, failed = summarize(counters(result))
    print(json.dumps(summary))
    if not failed:
        return 0
    print(failure_line(summary, options.view_as(SharedOptions).dead_letter), file=sys.stderr)
    return 3


@contextlib.contextmanager
def _exit_on_interrupt(report: Callable[[], int]) -> Iterator[None]:
    """Ctrl-C during a run: report (exit 1's line and JSON), stop the worker processes and exit at
    once. Beam would turn a KeyboardInterrupt into tearing down every DoFn, which waits for their
    requests in flight (and their retries) to end.

    Python runs a signal handler in the main thread only, once that is back from what blocks it
    (possibly a long wait); so a watcher thread learns of SIGINT through the signal wake-up socket,
    whichever thread the signal reaches. Only the main thread can set this up: elsewhere (a run
    inside a bigger program) the run keeps Python's default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    once = threading.Lock()
    finished = threading.Event()

    def stop(*_: object) -> None:
        if once.acquire(blocking=False):
            status = report()
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (Beam's threads die loudly with their workers)
            _stop_worker_processes()
            os._exit(status)

    def watch() -> None:
        while not finished.is_set():
            if signal.SIGINT in receiver.recv(64) and not finished.is_set():
                stop()

    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    wakeup = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    handler = signal.signal(signal.SIGINT, stop)
    watcher = threading.Thread(target=watch, name="dicom-etl-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        sender.send(b"\0")  # ends the watcher's wait
        watcher.join()
        signal.signal(signal.SIGINT, handler)
        signal.set_wakeup_fd(wakeup)
        receiver.close()
        sender.close()


def _stop_worker_processes() -> None:
    """Kill the processes started during the run (the worker processes of
    `--direct_running_mode=multi_processing`), known by the environment they inherit. Linux (/proc)
    only; elsewhere they end when they notice that the launcher is gone."""
    marker = f"{progress.LAUNCHER}={os.getpid()}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(environ.parent.name)
            if pid != os.getpid() and marker in environ.read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)


def _launch(options: PipelineOptions, build: Callable, summarize: Summarize, log: RunLog) -> int:
    """A distributed run (Dataflow, a flex template launch): submitted, not awaited; exit 0 or 1."""
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, options)
        result = pipeline.run()
    except Exception as error:
        return _failed(f"the launch failed: {_last_line(error)}", {}, summarize, log, error)
    print(json.dumps(_launched(result, options)))
    return 0


def _failed(
    reason: str, counts: dict[str, int], summarize: Summarize, log: RunLog, error: BaseException | None = None
) -> int:
    """Exit 1: one line on stderr, and the summary of what was counted before, with the error."""
    if error is not None:
        LOGGER.error("the run failed", exc_info=error)
    kept = {"log": log.path} if os.path.exists(log.path) and os.path.getsize(log.path) else {}
    log.keep = bool(kept)  # an empty log (Ctrl-C, say) tells nothing: it goes
    print(f"error: {reason}", file=sys.stderr)
    print(json.dumps(so_far(counts, summarize) | {"error": reason} | kept))
    return 1


def so_far(counts: dict[str, int], summarize: Summarize) -> dict[str, Any]:
    """The summary of a run that did not finish: its keys that the progress counts know (and always
    success, failure and failure_reasons)."""
    unmatched = counts.get(progress.NOT_AN_ITEM, 0)
    failed = progress.done(counts) - sum(counts.get(key, 0) for key in progress.SUCCEEDED)
    metrics = counts | {"failure": failed, "unmatched_patterns": unmatched, "unmatched_targets": unmatched}
    summary, _ = summarize(metrics)
    return {
        key: value
        for key, value in summary.items()
        if key in metrics or key in ("success", "failure_reasons")
    }


def failure_line(summary: dict[str, Any], dead_letter: str) -> str:
    """Exit 3's line: how many failed of how many, the main reasons, and where the dead letters are."""
    parts = []
    failed = summary.get("failure", 0)
    if failed:
        kind = "files" if "matched" in summary else "instances"
        total = summary.get("matched", summary.get("selected", 0))
        parts.append(f"{failed:,} of {total:,} {kind} failed")
    rows = summary.get("metadata_failures", 0)
    if rows:
        parts.append(f"{rows:,} metadata row{'s' if rows > 1 else ''} could not be made")
    unmatched = summary.get("unmatched_patterns", summary.get("unmatched_targets", 0))
    if unmatched:
        what = "pattern" if "unmatched_patterns" in summary else "filter line"
        parts.append(f"{unmatched:,} {what}{'s' if unmatched > 1 else ''} matched nothing")
    reasons = sorted(summary["failure_reasons"].items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{reason} {count:,}" for reason, count in reasons[:3])
    shown += f", {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
    return f"error: {'; '.join(parts)} ({shown}); the dead letters are in {dead_letter}"


class RunLog:
    """Where the logs of a run go: a log file only its owner can read (logs may quote DICOM values),
    made on the first record and kept only if the run fails; with `show_on_stderr`, stderr too.
    Restores the logging set-up it found when the run ends, as a run may be part of a bigger
    program."""

    def __init__(self, name: str) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"dicom-etl-{run_name(name)}.log")
        self.keep = False  # only a failed run's log is kept: it is named in the failure's line
        self.verbose = False

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        self._saved = (root.handlers[:], root.level, LOGGER.level)
        self.handlers: list[logging.Handler] = [_PrivateFile(self.path, delay=True)]
        self._format(self.handlers[0])
        root.handlers = list(self.handlers)  # also makes Beam's logging.basicConfig() do nothing
        root.setLevel(logging.WARNING)
        LOGGER.setLevel(logging.INFO)
        logging.getLogger("apache_beam.io.filebasedsink").setLevel(logging.ERROR)  # "no shards": no failures
        logging.captureWarnings(True)
        return self

    @contextlib.contextmanager
    def stderr_to_file(self) -> Iterator[None]:
        """During a run, what is written to this process's stderr below Python's logging, by worker
        processes, C libraries or Python itself, goes to the log file too; our own lines still
        reach stderr through `sys.stderr`. Not with --verbose (which wants it all on stderr), nor
        when `sys.stderr` is not the process's stderr (a run inside a bigger program)."""
        if self.verbose or not _is_process_stderr(sys.stderr):
            yield
            return
        sys.stderr.flush()
        original = os.dup(2)
        target = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, 2)
        os.close(target)
        previous = sys.stderr
        sys.stderr = open(original, "w", buffering=1, encoding=previous.encoding, errors="backslashreplace")  # noqa: SIM115
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)
            sys.stderr.close()  # closes `original`
            sys.stderr = previous

    def show_on_stderr(self) -> None:
        self.verbose = True
        handler = logging.StreamHandler(sys.stderr)
        self._format(handler)
        logging.getLogger().addHandler(handler)
        self.handlers.append(handler)

    def __exit__(self, *exc_info: object) -> None:
        logging.captureWarnings(False)
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        root.handlers, level, ours = self._saved
        root.setLevel(level)
        LOGGER.setLevel(ours)
        if not self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    @staticmethod
    def _format(handler: logging.Handler) -> None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def _is_process_stderr(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


class _PrivateFile(logging.FileHandler):
    def _open(self):  # noqa: ANN202 (logging's own signature)
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(descriptor, self.mode, encoding=self.encoding, errors=self.errors)  # noqa: SIM115


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


def _runner() -> beam.runners.PipelineRunner:
    """The DirectRunner's in-process engine, used directly: Beam's DirectRunner would first try to
    download the Prism runner binary, which fails (slowly, or not at all) without internet."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _last_line(error: BaseException) -> str:
    """Beam wraps a worker's error in its traceback; the cause is the last line, less Beam's
    "[while running 'Step']" suffix."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(error).__name__
    return re.sub(r"\s*\[while running '[^']*'\]$", "", last)
