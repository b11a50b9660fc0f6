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
launcher names in the environment, twice a second. The launcher's `Reporter` adds them up,
prints a line every `interval` seconds (the first after `interval`: runs shorter than that print
none), and gives a run that fails its counts so far.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam

DIRECTORY = "DICOM_ETL_PROGRESS_DIR"  # where worker processes publish their counts
LAUNCHER = "DICOM_ETL_PROGRESS_PID"  # the launcher's process id: the one process that does not publish
SECONDS = "DICOM_ETL_PROGRESS_SECONDS"  # seconds between progress lines; default 10
SUCCEEDED = ("success", "already_present")
FOUND = ("matched", "selected")
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


def done(counts: dict[str, int]) -> int:
    """Items finished: succeeded or failed (a pattern or line that matched nothing is no item)."""
    failed = sum(v for k, v in counts.items() if k.startswith("failure_") and k != NOT_AN_ITEM)
    return sum(counts.get(k, 0) for k in SUCCEEDED) + failed


class Reporter:
    """The launcher's side of a local run: the counts of every worker, and a line on stderr every
    `interval` seconds while the run goes on. Use as a context manager around the run."""

    def __init__(self, name: str, interval: float | None = None) -> None:
        self.name = name
        self.interval = interval if interval is not None else float(os.environ.get(SECONDS) or 10)
        self._stop = threading.Event()
        self.directory: str | None = None
        self.started = time.monotonic()
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    def __enter__(self) -> Reporter:
        with _lock:
            _counts.clear()
        self.directory = tempfile.mkdtemp(prefix="dicom-etl-progress-")
        self._saved = {key: os.environ.get(key) for key in (DIRECTORY, LAUNCHER)}
        os.environ[DIRECTORY], os.environ[LAUNCHER] = self.directory, str(os.getpid())
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dicom-etl-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.remove()

    def remove(self) -> None:
        """Remove the directory of the worker processes' counts."""
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def counts(self) -> dict[str, int]:
        """Every process's counts so far."""
        with _lock:
            total = Counter(_counts)
        for path in Path(self.directory).glob("[0-9]*.json") if self.directory else ():
            with contextlib.suppress(OSError, ValueError):
                total.update(json.loads(path.read_text()))
        return dict(total)

    def line(self, counts: dict[str, int], now: float) -> str:
        """E.g. `import_dicom: 0:00:21 elapsed; 24,320 matched, 24,320 parsed, 12,345 done (success
        12,000, already_present 300, failure 45); 587.0 done/s, about 0:00:20 left`. The rate is the
        current stage's over the last `interval` seconds."""
        found = next((key for key in FOUND if key in counts), None)
        stages = {key: counts[key] for key in (found, "parsed") if key in counts}
        stages["done"] = done(counts)
        if not self._samples:
            self._samples.append((self.started, {}))  # nothing counted when the run started
        self._samples.append((now, stages))
        while now - self._samples[0][0] > max(self.interval, 1.0) + 0.5:
            self._samples.popleft()
        shown = [f"{value:,} {key}" for key, value in stages.items()]
        if stages["done"]:
            outcomes = {key: counts.get(key, 0) for key in SUCCEEDED}
            outcomes["failure"] = stages["done"] - sum(outcomes.values())
            shown[-1] += " (" + ", ".join(f"{k} {v:,}" for k, v in outcomes.items() if v) + ")"
        text = f"{self.name}: {_clock(now - self.started)} elapsed; {', '.join(shown)}"
        if not any(stages.values()):
            return text
        total = stages.get(found, 0) if found else 0
        later = [key for key in stages if key != found]
        if found and not any(stages[key] for key in later):
            current = found  # still finding
        else:
            current = next((key for key in later if stages[key] < total), "done")
        then, before = self._samples[0]
        rate = (stages[current] - before.get(current, 0)) / max(now - then, 1.0)
        text += f"; {rate:,.1f} {current}/s"
        if current != found and total > stages[current] and rate > 0:
            text += f", about {_clock((total - stages[current]) / rate)} left"
            text += " to parse" if current == "parsed" else ""
        return text

    def _run(self) -> None:
        """Looks every second (the samples of the rate), prints every `interval`."""
        next_line = self.started + self.interval
        while not self._stop.wait(min(1.0, self.interval)):
            now = time.monotonic()
            text = self.line(self.counts(), now)
            if now >= next_line:
                next_line = now + self.interval
                print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
