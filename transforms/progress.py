"""A local run's progress: counts so far from every worker, and a line on stderr every 10 seconds.

Beam's metrics of a local run are only known when the run ends (the in-process engine runs each
stage as one bundle), so these counts live beside them, under the same names:
- what is found: `matched` files (import) or `selected` instances, counted where they pass;
- what is parsed on the way (`parsed`, import);
- what is done: `success` and `already_present`, counted by the DoFns that decide them
  (`finished`), and failures, counted by reason (`failure_<reason>`) where they meet
  the dead letter (`CountFailures`), as the summary counts them.

In the launcher's process the counts are shared by every worker thread. A worker process of
`--direct_running_mode=multi_processing` publishes its own to a file in a directory that the
launcher names in the environment, twice a second. The launcher's Reporter
(pipelines/progress_lines.py) adds them up, prints a line every `interval` seconds, and gives a run
that fails its counts so far.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam

DIRECTORY = "DICOM_ETL_PROGRESS_DIR"  # where worker processes publish their counts
LAUNCHER = "DICOM_ETL_PROGRESS_PID"  # the launcher's process id: the one process that does not publish
SUCCEEDED = ("success", "already_present")
NOT_AN_ITEM = "failure_no_match"  # a pattern or filter line that matched nothing: no item failed
PUBLISH_EVERY = 0.5  # seconds

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_publisher: threading.Thread | None = None


def count(name: str, n: int = 1) -> None:
    """Add n to this process's count `name` (named as the run's Metrics counter)."""
    global _publisher
    with _lock:
        _counts[name] += n
        if _publisher is None and _in_worker_process():
            _publisher = threading.Thread(target=_publish, name="dicom-etl-progress", daemon=True)
            _publisher.start()


def finished(outcome: str, n: int = 1) -> None:
    """n items done with `outcome`: `success` or `already_present`. Failures are counted where they
    meet the dead letter (CountFailures), once, whatever DoFn failed them."""
    if outcome in SUCCEEDED:
        count(outcome, n)


class Count(beam.PTransform):
    """Counts the elements passing by as `name`, and passes them on (fused with the step before)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        return items | beam.Map(_counted, self.name)


class CountFailures(beam.PTransform):
    """Dead-letter records -> the same records, each counted as `failure_<reason>`."""

    def expand(self, records: beam.PCollection[dict[str, Any]]) -> beam.PCollection[dict[str, Any]]:
        return records | beam.Map(_failed)


def count_failures(failures: Iterable[beam.PCollection]) -> list[beam.PCollection]:
    """Each dead-letter output counted where it is made (a Flatten's consumers would only run
    once every producer is done)."""
    return [records | f"CountFailures{number}" >> CountFailures() for number, records in enumerate(failures)]


def _counted(item: Any, name: str) -> Any:
    count(name)
    return item


def _failed(record: dict[str, Any]) -> dict[str, Any]:
    count(f"failure_{record['reason']}")
    return record


def _in_worker_process() -> bool:
    launcher = os.environ.get(LAUNCHER)
    return bool(launcher and os.environ.get(DIRECTORY)) and launcher != str(os.getpid())


def _publish() -> None:
    """A worker process's counts, written where the launcher reads them; best effort."""
    directory = Path(os.environ[DIRECTORY])
    published = None
    while True:
        with _lock:
            snapshot = dict(_counts)
        if snapshot != published:
            with contextlib.suppress(OSError):
                temporary = directory / f".{os.getpid()}.json"
                temporary.write_text(json.dumps(snapshot))
                temporary.replace(directory / f"{os.getpid()}.json")
            published = snapshot
        time.sleep(PUBLISH_EVERY)


def snapshot() -> dict[str, int]:
    """This process's counts so far."""
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Start counting a new run from nothing."""
    with _lock:
        _counts.clear()
