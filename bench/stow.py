"""Benchmark: our batched STOW-RS import into Orthanc versus one instance per request, as Beam's dicomio.

    python bench/stow.py [--instances 1000] [--rounds 3] [--part import|rerun|all] [--series_size 50]

Makes the instances once with fresh UIDs from the corpus (bench/import_parse.py's make_instances):
5% multi-MB (2.1-7.2 MB: multi-frame MR, large radiographs, a colour volume) and 95% the corpus's
other images (median 4 KB, mean 95 KB, at most 1.1 MB), i.e. many small instances and a few large
ones that carry ~75% of the bytes (1000 instances: 352 MB); each instance is in a study and series
of its own. Each side then imports them all into an emptied private Orthanc (tests/orthanc_server.py;
Orthanc 1.10, DICOMweb plugin 1.7):
  ours      pipelines.import_dicom.main, in-process on the FnApiRunner: batches of up to 50 instances
            or 32 MB, 4 batches in flight, a QIDO query before and after each STOW-RS
  baseline  Beam's dicomio UploadToDicomStore itself (its _StoreInstance DoFn: buffers of 8 elements,
            a fresh 5-thread pool per buffer, one POST per instance on a new session), after the same
            expand/parse front on the same runner; only its client is ours, because dicomio is
            hard-wired to healthcare.googleapis.com: it posts to Orthanc's {root}/studies with basic
            auth, and wraps each file in a one-part multipart/related body, since Orthanc's DICOMweb
            plugin answers 415 to a bare application/dicom body (the Healthcare API's extension)
  ceiling   Orthanc's own ingestion: POST /instances of the raw files from 1, 4, 8 and 16 threads
            (a requests session per thread), the best rate
The timed runs alternate ours, baseline and ceiling for --rounds rounds and keep each side's best,
so that other load on the machine hurts no side more than another. Requests are counted in a
separate, untimed pass of each side through a pass-through FaultProxy (it reads each body whole and
reconnects upstream per request, which would slow the timed runs); that pass also warms up Beam and
the page cache. Ends with one JSON line per metric on stdout (for fraction_of_ceiling, "baseline" is
the ceiling); progress goes to stderr. Targets: instances/s at least 1.5x the baseline, at most 0.1x
its requests, and at least 0.8 of the ceiling.

The re-run part makes --instances small instances (the corpus's files under 2 MB), --series_size a
series, imports them into an emptied Orthanc and imports them again (every one already_present):
  ours      the re-run as the pipeline makes it (series read whole, storage/dicomweb.py)
  baseline  the first import, for time; for requests, the re-run reading each present instance
            alone, as re-runs did before (the same pipeline with series never read whole)
Requests are counted through a FaultProxy in an untimed pass; the timed rounds keep each side's
best. Targets: at most 0.1 requests per instance, and a re-run no slower than the first import.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apache_beam as beam
import pydicom
import requests
from apache_beam.io.fileio import ReadableFile
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.gcp.healthcare.dicomio import UploadToDicomStore
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.import_parse import LARGE, make_instances, valid_sources  # noqa: E402
from dicomlib.wildcard import parse_pattern  # noqa: E402
from pipelines import import_dicom  # noqa: E402
from storage import dicomweb  # noqa: E402
from storage.store import Parsed  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.orthanc_server import Orthanc, running_orthanc  # noqa: E402
from transforms.dead_letter import DEAD_LETTER  # noqa: E402
from transforms.expand import ExpandPatterns  # noqa: E402
from transforms.store_instances import ParseInstances  # noqa: E402

LARGE_FRACTION = 0.05
CEILING_THREADS = (1, 4, 8, 16)
BENCH_NAMESPACE = "bench_stow"


emit = functools.partial(report.emit, "stow")


log = report.log


# ours


def run_ours(root: Path, dicomweb: str, expected: int, outcome: str = "success") -> None:
    """Our import pipeline, as the CLI runs it; fails unless every instance ended as `outcome`."""
    with tempfile.TemporaryDirectory() as dead_letter, contextlib.redirect_stdout(io.StringIO()) as out:
        status = import_dicom.main(
            [f"--input={root}/**", f"--store={dicomweb}", f"--dead_letter={dead_letter}"]
        )
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    if status != 0 or summary[outcome] != expected:
        raise RuntimeError(f"our import failed (exit {status}): {summary}")


# baseline


class OrthancStowClient:
    """The client dicomio's _StoreInstance calls, pointed at a DICOMweb root with basic auth.

    Like dicomio's default DicomApiHttpClient, which make_request builds anew for every instance, it
    opens a new session (so a new connection) per request and sets no timeout or retries.
    """

    def __init__(self, root: str, auth: tuple[str, str]) -> None:
        self.root = root
        self.auth = auth

    def dicomweb_store_instance(
        self,
        project_id: str,
        region: str,
        dataset_id: str,
        dicom_store_id: str,
        dcm_file: bytes,
        credential: object = None,
    ) -> tuple[None, int]:
        boundary = uuid.uuid4().hex  # Orthanc refuses a bare application/dicom body: one part
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = head + dcm_file + f"\r\n--{boundary}--\r\n".encode()
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        with requests.Session() as session:
            session.auth = self.auth
            response = session.post(f"{self.root}/studies", data=body, headers={"Content-Type": content_type})
        return None, response.status_code


def readable(element: tuple[str, Parsed]) -> ReadableFile:
    """What fileio.ReadMatches would give dicomio for this file."""
    file = element[1].file
    return ReadableFile(FileMetadata(file.uri, file.size))


class CountOutcomes(beam.DoFn):
    """dicomio's result dicts, counted: the bench checks that every instance was stored."""

    def __init__(self) -> None:
        self.success = Metrics.counter(BENCH_NAMESPACE, "success")
        self.failure = Metrics.counter(BENCH_NAMESPACE, "failure")

    def process(self, result: dict) -> Iterator[dict]:
        (self.success if result["success"] else self.failure).inc()
        yield result


def run_baseline(root: Path, dicomweb: str, auth: tuple[str, str], expected: int) -> None:
    """dicomio's upload after our front, on our runner; fails unless every POST answered 200."""
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
    parsed = (
        pipeline
        | "Patterns" >> beam.Create([parse_pattern(f"{root}/**")])
        | "Expand" >> beam.ParDo(ExpandPatterns())
        | "SpreadFiles" >> beam.Reshuffle()
        | "Parse" >> beam.ParDo(ParseInstances()).with_outputs(DEAD_LETTER, main="parsed")
    )
    destination = {"project_id": "-", "region": "-", "dataset_id": "-", "dicom_store_id": "-"}
    (
        parsed.parsed
        | "Readable" >> beam.Map(readable)
        | "Upload" >> UploadToDicomStore(destination, "fileio", client=OrthancStowClient(dicomweb, auth))
        | "Count" >> beam.ParDo(CountOutcomes())
    )
    result = pipeline.run()
    result.wait_until_finish()
    query = result.metrics().query(MetricsFilter().with_namespace(BENCH_NAMESPACE))
    counts = {c.key.metric.name: c.committed or c.attempted or 0 for c in query["counters"]}
    if counts.get("success", 0) != expected or counts.get("failure", 0):
        raise RuntimeError(f"the baseline failed: {counts}")


# ceiling


def run_ceiling(orthanc: Orthanc, files: list[Path], threads: int) -> None:
    """POST /instances of each raw file from `threads` threads, one keep-alive session per thread."""
    local = threading.local()
    sessions: list[requests.Session] = []

    def post(path: Path) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.auth = orthanc.auth
            sessions.append(local.session)
        local.session.post(
            f"{orthanc.rest}/instances", data=path.read_bytes(), timeout=600
        ).raise_for_status()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, files))
    for session in sessions:
        session.close()


# measuring


def timed(orthanc: Orthanc, expected: int, run: Callable[[], None]) -> float:
    """Instances per second of `run` into an emptied Orthanc, checking that it holds them all after."""
    orthanc.clear()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    held = orthanc.instance_count()
    if held != expected:
        raise RuntimeError(f"Orthanc holds {held} instances, expected {expected}")
    return expected / elapsed


def counted(orthanc: Orthanc, run: Callable[[str], None]) -> Counter[str]:
    """Requests that `run(dicomweb_root_through_proxy)` makes, by method, into an emptied Orthanc."""
    orthanc.clear()
    with FaultProxy(orthanc.rest) as proxy:
        run(f"{proxy.url}/dicom-web")
        return Counter(request.method for request in proxy.requests)


def bench_import(orthanc: Orthanc, scratch: str, instances: int, rounds: int) -> None:
    """Ours, the baseline and the ceiling importing the same instances (the module's docstring)."""
    large = max(1, round(instances * LARGE_FRACTION))
    root = Path(scratch) / "instances"
    make_instances(root, instances - large, large)
    files = sorted(root.rglob("*.dcm"))
    n = len(files)
    log(f"{n} instances ({large} multi-MB), {sum(f.stat().st_size for f in files) / 1e6:.0f} MB")

    def ours(store: str) -> None:
        run_ours(root, store, n)

    def baseline(store: str) -> None:
        run_baseline(root, store, orthanc.auth, n)

    our_requests = counted(orthanc, ours)
    base_requests = counted(orthanc, baseline)
    log(f"requests: ours {dict(our_requests)}, baseline {dict(base_requests)}")

    our_rate = base_rate = ceiling = 0.0
    for turn in range(1, rounds + 1):  # sides alternate; the best of each, against other load
        rate = timed(orthanc, n, lambda: ours(orthanc.dicomweb))
        log(f"round {turn}, ours: {rate:.1f} instances/s ({n / rate:.2f} s)")
        our_rate = max(our_rate, rate)
        rate = timed(orthanc, n, lambda: baseline(orthanc.dicomweb))
        log(f"round {turn}, baseline: {rate:.1f} instances/s ({n / rate:.2f} s)")
        base_rate = max(base_rate, rate)
        for threads in CEILING_THREADS:
            rate = timed(orthanc, n, lambda threads=threads: run_ceiling(orthanc, files, threads))
            log(f"round {turn}, ceiling, {threads} threads: {rate:.1f} instances/s ({n / rate:.2f} s)")
            ceiling = max(ceiling, rate)
    orthanc.clear()

    emit("instances_per_s", our_rate, base_rate, 1.5, our_rate >= 1.5 * base_rate)
    ours_total, base_total = our_requests.total(), base_requests.total()
    emit("requests", ours_total, base_total, 0.1, ours_total <= 0.1 * base_total)
    emit("fraction_of_ceiling", our_rate, ceiling, 0.8, our_rate >= 0.8 * ceiling)


# re-running


def make_series(target: Path, count: int, per_series: int) -> None:
    """`count` small instances (the corpus's files under 2 MB, fresh UIDs), `per_series` a series,
    each series of one patient (Orthanc tells series apart by patient as well as by UID)."""
    sources = [p for p in valid_sources() if p.stat().st_size <= LARGE]
    target.mkdir(parents=True)
    study = series = ""
    for index in range(count):
        if index % per_series == 0:
            study, series = generate_uid(), generate_uid()
        dataset = pydicom.dcmread(sources[index % len(sources)])
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.PatientID, dataset.PatientName = f"P{index // per_series}", f"Patient^{index // per_series}"
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(target / f"{index:05d}.dcm", enforce_file_format=True)


@contextlib.contextmanager
def instance_by_instance() -> Iterator[None]:
    """The re-run as it was before series were read whole: every present instance read alone."""
    saved = dicomweb.SERIES_READ_MIN
    dicomweb.SERIES_READ_MIN = sys.maxsize
    try:
        yield
    finally:
        dicomweb.SERIES_READ_MIN = saved


def rerun_requests(orthanc: Orthanc, root: Path, n: int) -> int:
    """Requests of a re-run into a store that holds every instance already."""
    orthanc.clear()
    run_ours(root, orthanc.dicomweb, n)
    with FaultProxy(orthanc.rest) as proxy:
        run_ours(root, f"{proxy.url}/dicom-web", n, "already_present")
        return len(proxy.requests)


def bench_rerun(orthanc: Orthanc, scratch: str, instances: int, per_series: int, rounds: int) -> None:
    """First import versus a re-run of the same instances (all already_present), in time and in
    requests; the baseline re-run reads every present instance alone, as before."""
    root = Path(scratch) / "series"
    make_series(root, instances, per_series)
    files = list(root.rglob("*.dcm"))
    n, size = len(files), sum(f.stat().st_size for f in files)
    log(f"re-run: {n} small instances, {per_series} a series, {size / 1e6:.0f} MB")
    ours_requests = rerun_requests(orthanc, root, n)
    with instance_by_instance():
        old_requests = rerun_requests(orthanc, root, n)
    log(f"re-run requests: ours {ours_requests}, instance by instance {old_requests}")
    first = again = old = float("inf")
    for turn in range(1, rounds + 1):
        orthanc.clear()
        seconds = [n / timed(orthanc, n, lambda: run_ours(root, orthanc.dicomweb, n))]
        for read_alone in (False, True):
            with instance_by_instance() if read_alone else contextlib.nullcontext():
                start = time.perf_counter()
                run_ours(root, orthanc.dicomweb, n, "already_present")
                seconds.append(time.perf_counter() - start)
        log(f"round {turn}: first import, re-run, re-run instance by instance: {seconds} s")
        first, again, old = min(first, seconds[0]), min(again, seconds[1]), min(old, seconds[2])
    orthanc.clear()
    emit("rerun_requests_per_instance", ours_requests / n, old_requests / n, 0.1, ours_requests <= 0.1 * n)
    emit("rerun_seconds_vs_first_import", again, first, 1.0, again <= first)
    emit("rerun_seconds_vs_instance_by_instance", again, old, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="at least 500 for a meaningful run")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each side's best counts")
    parser.add_argument("--series_size", type=int, default=50, help="instances a series, for the re-run")
    parser.add_argument("--part", choices=("import", "rerun", "all"), default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, running_orthanc() as orthanc:
        os.environ["DICOMWEB_USERNAME"], os.environ["DICOMWEB_PASSWORD"] = orthanc.auth
        if args.part in ("import", "all"):
            bench_import(orthanc, scratch, args.instances, args.rounds)
        if args.part in ("rerun", "all"):
            bench_rerun(orthanc, scratch, args.instances, args.series_size, args.rounds)


if __name__ == "__main__":
    main()
