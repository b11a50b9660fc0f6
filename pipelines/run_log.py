"""Where a run's logs go: a log file in the temporary directory, kept only if the run fails.

Stderr holds only our own lines (progress, and exit 1's or 3's line). What libraries log (warnings,
codec tracebacks of instances counted as failed, Beam's errors) and whatever else reaches the
process's stderr during a run goes to the log file, which exit 1's JSON line names; `--verbose` shows
it all on stderr instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from dicomlib import NAMESPACE

LOGGER = logging.getLogger(NAMESPACE)


def run_name(pipeline_name: str) -> str:
    """A name unique to this run, for files that must not overwrite an earlier run's."""
    return f"{pipeline_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


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
