"""A local run's progress lines: the launcher adds up the counts of every worker (transforms/progress.py)
and prints a line on stderr every 10 seconds (DICOM_ETL_PROGRESS_SECONDS)."""

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
from pathlib import Path

from transforms import progress

SECONDS = "DICOM_ETL_PROGRESS_SECONDS"  # seconds between progress lines; default 10
FOUND = ("matched", "selected")


def done(counts: dict[str, int]) -> int:
    """Items finished: succeeded or failed (a pattern or line that matched nothing is no item)."""
    failed = sum(v for k, v in counts.items() if k.startswith("failure_") and k != progress.NOT_AN_ITEM)
    return sum(counts.get(k, 0) for k in progress.SUCCEEDED) + failed


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
        progress.reset()
        self.directory = tempfile.mkdtemp(prefix="dicom-etl-progress-")
        self._saved = {key: os.environ.get(key) for key in (progress.DIRECTORY, progress.LAUNCHER)}
        os.environ[progress.DIRECTORY], os.environ[progress.LAUNCHER] = self.directory, str(os.getpid())
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
        total = Counter(progress.snapshot())
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
            outcomes = {key: counts.get(key, 0) for key in progress.SUCCEEDED}
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
