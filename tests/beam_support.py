"""Running one transform in a TestPipeline: the runner, its counters, and inputs as the pipelines
hand them over (parsed files keyed by SOP Instance UID, as after the GroupByKey)."""

from __future__ import annotations

import io
import socket
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam
import pydicom
import pytest
import requests
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from dicomlib import NAMESPACE
from dicomlib.uids import InstanceRef
from storage import dicomweb_client
from storage.file_store import FileLayoutStore
from storage.objects import MatchedFile
from storage.store import Parsed
from transforms.dead_letter import DEAD_LETTER

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
CT = SAMPLE / "ct" / "CT_small.dcm"  # 39 KB
MR = SAMPLE / "mr" / "MR_small.dcm"  # 10 KB


def new_pipeline() -> TestPipeline:
    """A TestPipeline on the in-process engine the pipelines use (pipelines/run.py): Beam's
    DirectRunner would first try to fetch the Prism runner."""
    return TestPipeline(runner=FnApiRunner())


def run(pipeline: beam.Pipeline) -> beam.runners.runner.PipelineResult:
    """Run to the end; assert_that failures and the DoFns' errors are raised here."""
    result = pipeline.run()
    result.wait_until_finish()
    return result


def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """The run's committed counters in our namespace, by name (a counter never incremented is absent)."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in found:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return {name: value for name, value in totals.items() if value}


def matched(path: Path) -> MatchedFile:
    return MatchedFile(str(path), path.stat().st_size)


def ref_of(path: Path | bytes) -> InstanceRef:
    """The instance's UIDs as pydicom reads them: an oracle independent of dicomlib/header.py."""
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(source, stop_before_pixels=True)
    return InstanceRef(
        str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
    )


def parsed(path: Path) -> Parsed:
    return Parsed(matched(path), ref_of(path))


def keyed(paths: Iterable[Path]) -> list[tuple[str, list[Parsed]]]:
    """Files as WriteInstances receives them after the GroupByKey: each under its SOP Instance UID."""
    groups: dict[str, list[Parsed]] = {}
    for path in paths:
        item = parsed(path)
        groups.setdefault(item.ref.sop, []).append(item)
    return list(groups.items())


def variant(source: Path, target: Path, **changes: Any) -> Path:
    """`source` with some attributes changed (its UIDs kept unless given), written to `target`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(source)
        for keyword, value in changes.items():
            setattr(dataset, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target)
    return target


def with_other_preamble(source: Path, target: Path) -> Path:
    """The same file meta and data set in other bytes: only the 128-byte preamble differs."""
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"another writer".ljust(128, b"\0") + data[128:])
    return target


def closed_port_url(path: str = "/dicom-web") -> str:
    """An address on loopback where nothing listens: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stores' retries, as many as they make, with backoff short enough for a test (the
    names tests/test_healthcare_api.py shortens too)."""
    monkeypatch.setattr(dicomweb_client, "THROTTLE_BACKOFF", 0.001)
    monkeypatch.setattr(dicomweb_client, "BACKOFF", 0.001)


def filled_store(root: Path, files: Iterable[Path]) -> FileLayoutStore:
    """A local file-layout store holding `files` (written by the store itself, not a transform)."""
    store = FileLayoutStore(str(root))
    results = store.write([parsed(path) for path in files])
    assert {written.outcome for written in results} <= {"success"}, results
    return store


def letters(outputs: Any, label: str = "Letters") -> beam.PCollection:
    """A DoFn's dead letters as (uri, stage, reason)."""
    return outputs[DEAD_LETTER] | label >> beam.Map(lambda r: (r["uri"], r["stage"], r["reason"]))


def details(outputs: Any, label: str = "Details") -> beam.PCollection:
    """A DoFn's dead letters as (uri, detail)."""
    return outputs[DEAD_LETTER] | label >> beam.Map(lambda r: (r["uri"], r["detail"]))


def orthanc_store(orthanc: Any, path: Path) -> None:
    """Store a file in Orthanc through its own REST API, not through the code under test."""
    requests.post(
        f"{orthanc.rest}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30
    ).raise_for_status()


def expect_outputs(
    main: beam.PCollection,
    letters: beam.PCollection,
    expected_main: Iterable[Any],
    expected_letters: Iterable[Any],
    label: str = "Outputs",
) -> None:
    """One assert_that over a DoFn's two outputs, each element marked with its output ("main" or
    DEAD_LETTER): an assert_that adds some stages to run, a second one costs as much again."""
    marked = (
        main | f"{label}Main" >> beam.Map(lambda element: ("main", element)),
        letters | f"{label}DeadLetter" >> beam.Map(lambda element: (DEAD_LETTER, element)),
    ) | f"{label}Both" >> beam.Flatten()
    expected = [("main", e) for e in expected_main] + [(DEAD_LETTER, e) for e in expected_letters]
    assert_that(marked, equal_to(expected), label=label)
