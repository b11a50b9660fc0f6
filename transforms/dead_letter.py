"""The dead letter: every item that fails, with the stage and reason, as JSON lines."""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import NAMESPACE

DEAD_LETTER = "dead_letter"


def failure(uri: str, stage: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
    """A dead-letter record on the DEAD_LETTER output of a DoFn."""
    record = {"uri": uri, "stage": stage, "reason": reason, "detail": detail}
    return beam.pvalue.TaggedOutput(DEAD_LETTER, record)


class WriteDeadLetters(beam.PTransform):
    """Count failures by reason and write them under `directory` as `{name}-*.jsonl`.

    Each run writes its own files (`name` carries the run's timestamp), so no earlier dead letter
    is overwritten; a run without failures writes no file.
    """

    def __init__(self, directory: str, name: str) -> None:
        super().__init__()
        self.directory = directory
        self.name = name

    def expand(self, records: beam.PCollection[dict[str, Any]]) -> beam.pvalue.PDone:
        return (
            records
            | "CountReasons" >> beam.Map(_count_reason)
            | "ToJson" >> beam.Map(lambda record: json.dumps(record, sort_keys=True))
            | "Write"
            >> beam.io.WriteToText(
                f"{self.directory.rstrip('/')}/{self.name}",
                file_name_suffix=".jsonl",
                skip_if_empty=True,
            )
        )


def _count_reason(record: dict[str, Any]) -> dict[str, Any]:
    Metrics.counter(NAMESPACE, f"failure_{record['reason']}").inc()
    return record
