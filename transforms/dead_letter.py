"""The dead letter: every item that fails, with the stage and reason, as JSON lines."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from dicomlib import NAMESPACE
from storage.objects import join, write_bytes
from storage.staging import clean_staging

DEAD_LETTER = "dead_letter"
LINES_PER_FILE = 10_000


def failure(uri: str, stage: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
    """A dead-letter record on the DEAD_LETTER output of a DoFn."""
    record = {"uri": uri, "stage": stage, "reason": reason, "detail": detail}
    return beam.pvalue.TaggedOutput(DEAD_LETTER, record)


class WriteDeadLetters(beam.PTransform):
    """Count failures by reason and write them under `directory` as `{name}-*.jsonl`.

    Each run writes its own files (`name` carries the run's timestamp), so no earlier dead letter
    is overwritten; a run without failures writes no file. Each file appears whole (written aside,
    then moved into place), as soon as its bundle is done: a run stopped midway keeps the dead
    letters of the bundles it finished, and leaves no temporary files a later run cannot remove.
    """

    def __init__(self, directory: str, name: str) -> None:
        super().__init__()
        self.directory = directory
        self.name = name

    def expand(self, records: beam.PCollection[dict[str, Any]]) -> beam.PCollection[str]:
        return (
            records
            | "CountReasons" >> beam.Map(_count_reason)
            | "Batch" >> beam.BatchElements(min_batch_size=LINES_PER_FILE, max_batch_size=LINES_PER_FILE)
            | "Write" >> beam.ParDo(_WriteJsonLines(self.directory, self.name))
        )


class _WriteJsonLines(beam.DoFn):
    """Batches of records -> one file of JSON lines each; yields the files' paths."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name

    def setup(self) -> None:
        clean_staging(self.directory)

    def teardown(self) -> None:
        clean_staging(self.directory)  # the staging directory, once empty

    def process(self, records: list[dict[str, Any]]) -> Iterator[str]:
        path = join(self.directory, f"{self.name}-{uuid.uuid4().hex[:12]}.jsonl")
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        write_bytes(path, lines.encode(), root=self.directory)
        yield path


def _count_reason(record: dict[str, Any]) -> dict[str, Any]:
    Metrics.counter(NAMESPACE, f"failure_{record['reason']}").inc()
    return record
