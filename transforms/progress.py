"""Periodic progress lines in the log, so a long local run shows it is moving."""

from __future__ import annotations

import logging
import time
from collections import Counter

from transforms import NAMESPACE

LOGGER = logging.getLogger(NAMESPACE)


class Progress:
    """Counts outcomes in one worker and logs the totals at most every `interval` seconds."""

    def __init__(self, label: str, interval: float = 10.0) -> None:
        self.label = label
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.started = self.last = time.monotonic()

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            total = sum(self.counts.values())
            rate = total / max(now - self.started, 1e-9)
            shown = ", ".join(f"{key} {value}" for key, value in sorted(self.counts.items()))
            LOGGER.info("%s: %d done (%s), %.1f/s in this worker", self.label, total, shown, rate)
