"""A run's JSON summary (the last line on stdout) and, after exit 3, its one line on stderr."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from dicomlib import NAMESPACE
from pipelines import progress_lines
from transforms import progress

# Counters that fail the run (exit 3) when they are not 0; also any unmatched_* one.
FAILING = ("failure", "metadata_failures", "provenance_failures")


def summarize(keys: Sequence[str], counts: dict[str, int]) -> tuple[dict[str, Any], bool]:
    """The summary of the counters `keys` (and the failures' reasons), and whether any item failed."""
    summary: dict[str, Any] = {key: counts.get(key, 0) for key in keys}
    summary["failure_reasons"] = failure_reasons(counts)
    failed = any(value for key, value in summary.items() if key in FAILING or key.startswith("unmatched_"))
    return summary, failed


def so_far(keys: Sequence[str], counts: dict[str, int]) -> dict[str, Any]:
    """The summary of a run that did not finish: its keys that the progress counts know (and always
    success, failure and failure_reasons)."""
    unmatched = counts.get(progress.NOT_AN_ITEM, 0)
    failed = progress_lines.done(counts) - sum(counts.get(key, 0) for key in progress.SUCCEEDED)
    metrics = counts | {"failure": failed, "unmatched_patterns": unmatched, "unmatched_targets": unmatched}
    summary, _ = summarize(keys, metrics)
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
    provenance = summary.get("provenance_failures", 0)
    if provenance:
        parts.append(
            f"{provenance:,} Provenance resource{'s' if provenance > 1 else ''} could not be written"
        )
    unmatched = summary.get("unmatched_patterns", summary.get("unmatched_targets", 0))
    if unmatched:
        what = "pattern" if "unmatched_patterns" in summary else "filter line"
        parts.append(f"{unmatched:,} {what}{'s' if unmatched > 1 else ''} matched nothing")
    reasons = sorted(summary["failure_reasons"].items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{reason} {count:,}" for reason, count in reasons[:3])
    shown += f", {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
    return f"error: {'; '.join(parts)} ({shown}); the dead letters are in {dead_letter}"


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


def launched(result: beam.runners.runner.PipelineResult, options: PipelineOptions) -> dict[str, object]:
    """The job's id and state. A flex template launch (--template_location) only writes the job's
    description there and Dataflow creates the job, so its result has no job: the job is queued."""
    if getattr(result, "has_job", True):
        job_id = getattr(result, "job_id", None)
        return {"job_id": job_id() if callable(job_id) else job_id, "state": str(result.state)}
    template = options.view_as(GoogleCloudOptions).template_location or ""
    return {"job_id": None, "state": "JOB_STATE_QUEUED", "template_location": template}
