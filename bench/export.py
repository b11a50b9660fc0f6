"""Benchmark: exporting gs:// to gs:// with a filter, ours versus a naive listing-and-copying script.

    python bench/export.py [--studies 100] [--per_study 10] [--fraction 0.1]

Makes studies x per_study instances (default 1,000, ~10 per study in one or two series) with fresh
UIDs from the corpus's images of at most 2 MB (bench/import_parse.py's valid_sources), uploads them in
the file layout `store/studies/{study}/series/{series}/instances/{sop}.dcm` of a bucket in
fake-gcs-server on loopback, and a filter file naming `fraction` of the studies (/studies/UID lines)
next to them. Then each side exports what the filter selects to `{side}/{study}/{series}/{sop}.dcm`:
  ours      pipelines.export_dicom.main, in-process on the FnApiRunner (one worker, so one instance
            at a time): lists only the filtered studies' prefixes and copies each instance with a
            server-side rewrite; objects_listed and bytes_through_worker come from its summary line
  baseline  what a hand-written script does: read the filter, list the whole store prefix, keep the
            objects of the filtered studies, download each and upload it; sequential, like ours
Both sides then export the whole store without a filter (informational: objects listed per instance,
worker bytes, instances/s). Untimed, at the end, every selected instance is checked to have landed with
its source's bytes: the filtered outputs are downloaded and compared with the local files, the
unfiltered ones compared by size and the CRC32C the server keeps.

"Worker bytes" are bytes of instances read into the process: ours its bytes_through_worker counter,
the baseline the bytes it downloaded (it uploads as many again). As a cross-check that the counter
is honest, every socket urllib3 opens is counted (bytes sent plus received, HTTP headers and JSON
metadata included): `wire_bytes`. Ours is timed after an untimed warm-up export of one study.
Ends with one JSON line per metric on stdout (progress goes to stderr). Targets: objects listed at
most 1.2 per selected instance (on ours), and worker bytes about zero (met when ours is at most 1% of
the baseline's); the rest is informational (target and met null).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import pydicom
import urllib3.util.connection
from google.cloud import storage
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.import_parse import LARGE, valid_sources  # noqa: E402
from pipelines import export_dicom  # noqa: E402
from storage.file_store import INSTANCE_PATH  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402

BUCKET = "export-bench"
STORE = "store"
UPLOAD_THREADS = 8  # only to fill the emulator quickly; both sides then run sequentially


emit = functools.partial(report.emit, "export")


log = report.log


# bytes on the wire


class Wire:
    """Bytes sent and received on every socket urllib3 opens in this process (all GCS clients)."""

    lock = threading.Lock()
    sent = 0
    received = 0

    @classmethod
    def add(cls, sent: int = 0, received: int = 0) -> None:
        with cls.lock:
            cls.sent += sent
            cls.received += received

    @classmethod
    def total(cls) -> int:
        with cls.lock:
            return cls.sent + cls.received


class CountingSocket(socket.socket):
    """What http.client reads and writes through: recv_into (via makefile) and sendall."""

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        count = super().recv_into(buffer, nbytes, flags)
        Wire.add(received=count)
        return count

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        Wire.add(received=len(data))
        return data

    def send(self, data, flags: int = 0) -> int:  # type: ignore[override]
        count = super().send(data, flags)
        Wire.add(sent=count)
        return count

    def sendall(self, data, flags: int = 0) -> None:  # type: ignore[override]
        super().sendall(data, flags)
        Wire.add(sent=memoryview(data).nbytes)


def count_wire_bytes() -> None:
    """Wrap every new urllib3 connection's socket in a CountingSocket (connections opened before
    this are not counted: call it before any client connects)."""
    original = urllib3.util.connection.create_connection

    def counting(*args, **kwargs) -> socket.socket:
        plain = original(*args, **kwargs)
        timeout = plain.gettimeout()
        wrapped = CountingSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        wrapped.settimeout(timeout)
        return wrapped

    urllib3.util.connection.create_connection = counting


# the store


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def make_store(root: Path, studies: int, per_study: int) -> dict[str, bytes]:
    """Instances with fresh UIDs in the file layout under `root`; {study/series/sop.dcm: bytes}, in
    the order made. Even-numbered studies have one series, odd-numbered ones two (split about evenly);
    the corpus's files are used in turn, so a study's sources depend only on its number.
    """
    sources = [p for p in valid_sources() if p.stat().st_size <= LARGE]
    made: dict[str, bytes] = {}
    count = 0
    for study_index in range(studies):
        study = generate_uid()
        series_uids = [generate_uid() for _ in range(1 + study_index % 2)]
        for number in range(per_study):
            series = series_uids[number * len(series_uids) // per_study]
            dataset = pydicom.dcmread(sources[count % len(sources)])
            count += 1
            sop = generate_uid()
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = sop
            path = root / "studies" / study / "series" / series / "instances" / f"{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset.save_as(path, enforce_file_format=True)
            made[f"{study}/{series}/{sop}.dcm"] = path.read_bytes()
    return made


def upload(client: storage.Client, root: Path, prefix: str) -> None:
    bucket = client.bucket(BUCKET)
    files = sorted(p for p in root.rglob("*") if p.is_file())

    def put(path: Path) -> None:
        bucket.blob(prefix + path.relative_to(root).as_posix()).upload_from_filename(str(path))

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, files))


# the two sides


def run_ours(output: str, filter_file: str | None, expected: int) -> tuple[dict, float, int]:
    """(summary line, seconds, wire bytes) of our export; fails unless every instance succeeded."""
    argv = [f"--store=gs://{BUCKET}/{STORE}", f"--output=gs://{BUCKET}/{output}"]
    argv += [f"--filter_file={filter_file}"] if filter_file else []
    with tempfile.TemporaryDirectory() as dead_letter, contextlib.redirect_stdout(io.StringIO()) as out:
        wire = Wire.total()
        start = time.perf_counter()
        status = export_dicom.main([*argv, f"--dead_letter={dead_letter}"])
        elapsed = time.perf_counter() - start
        wire = Wire.total() - wire
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    if status != 0 or summary.get("success") != expected or summary.get("selected") != expected:
        raise RuntimeError(f"our export failed (exit {status}, expected {expected}): {summary}")
    return summary, elapsed, wire


def run_naive(output: str, filter_file: str | None, expected: int) -> tuple[int, int, float, int]:
    """(objects listed, bytes downloaded, seconds, wire bytes) of the naive script, sequential."""
    wire = Wire.total()
    start = time.perf_counter()
    client = storage.Client()
    bucket = client.bucket(BUCKET)
    wanted = None
    if filter_file:
        text = bucket.blob(filter_file.removeprefix(f"gs://{BUCKET}/")).download_as_text()
        wanted = {line.strip().removeprefix("/studies/") for line in text.splitlines() if line.strip()}
    listed, chosen = 0, []
    for blob in client.list_blobs(BUCKET, prefix=f"{STORE}/"):
        listed += 1
        match = INSTANCE_PATH.search(blob.name)
        if match and (wanted is None or match.group(1) in wanted):
            chosen.append((blob.name, match.groups()))
    downloaded = 0
    for name, (study, series, sop) in chosen:
        data = bucket.blob(name).download_as_bytes()
        downloaded += len(data)
        bucket.blob(f"{output}/{study}/{series}/{sop}.dcm").upload_from_string(
            data, content_type="application/dicom"
        )
    elapsed = time.perf_counter() - start
    wire = Wire.total() - wire
    if len(chosen) != expected:
        raise RuntimeError(f"the naive script selected {len(chosen)} instances, expected {expected}")
    return listed, downloaded, elapsed, wire


def check_landed(client: storage.Client, output: str, expected: dict[str, bytes], download: bool) -> None:
    """Exactly the expected instances under `output`, each with the source's bytes (downloaded and
    compared, or by size and the CRC32C the server keeps)."""
    found = {b.name.removeprefix(f"{output}/"): b for b in client.list_blobs(BUCKET, prefix=f"{output}/")}
    if set(found) != set(expected):
        missing, extra = len(set(expected) - set(found)), len(set(found) - set(expected))
        raise RuntimeError(f"{output}: {missing} instances missing, {extra} unexpected")
    for name, blob in found.items():
        data = expected[name]
        if download:
            same = blob.download_as_bytes() == data
        else:
            same = (blob.size, blob.crc32c) == (len(data), crc32c(data))
        if not same:
            raise RuntimeError(f"{output}/{name} differs from its source")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--per_study", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1, help="of the studies, named by the filter")
    args = parser.parse_args()
    began = time.perf_counter()
    count_wire_bytes()
    with tempfile.TemporaryDirectory() as scratch, running_emulator() as client:
        root = Path(scratch) / "store"
        made = make_store(root, args.studies, args.per_study)
        client.create_bucket(BUCKET)
        upload(client, root, f"{STORE}/")
        studies = list(dict.fromkeys(name.split("/", 1)[0] for name in made))  # in the order made
        step, count = max(1, round(1 / args.fraction)), max(1, round(len(studies) * args.fraction))
        # evenly spread, alternately one- and two-series studies; the same sources every run
        picked = [studies[min(i * step + i % 2, len(studies) - 1)] for i in range(count)]
        filter_path = Path(scratch) / "filter.txt"
        filter_path.write_text("".join(f"/studies/{uid}\n" for uid in picked))
        client.bucket(BUCKET).blob("filter.txt").upload_from_filename(str(filter_path))
        filter_uri = f"gs://{BUCKET}/filter.txt"
        selected = {name: data for name, data in made.items() if name.split("/", 1)[0] in picked}
        n, total = len(selected), len(made)
        megabytes = sum(map(len, made.values())) / 1e6, sum(map(len, selected.values())) / 1e6
        log(
            f"{total} instances in {len(studies)} studies, {megabytes[0]:.0f} MB; the filter names "
            f"{len(picked)} studies: {n} instances, {megabytes[1]:.1f} MB"
        )

        one_study = Path(scratch) / "warm.txt"
        one_study.write_text(f"/studies/{picked[0]}\n")
        warm = sum(1 for name in made if name.startswith(picked[0] + "/"))
        run_ours("out-warm", str(one_study), warm)  # Beam's first run in a process pays one-time costs

        summary, ours_s, ours_wire = run_ours("out-ours", filter_uri, n)
        log(f"ours, filtered: {ours_s:.2f} s, {ours_wire / 1e6:.2f} MB on the wire; {summary}")
        base_listed, base_bytes, base_s, base_wire = run_naive("out-naive", filter_uri, n)
        log(
            f"naive, filtered: {base_s:.2f} s, {base_wire / 1e6:.2f} MB on the wire, listed {base_listed}, "
            f"downloaded {base_bytes} bytes"
        )
        all_summary, all_s, all_wire = run_ours("out-ours-all", None, total)
        log(f"ours, whole store: {all_s:.2f} s, {all_wire / 1e6:.2f} MB on the wire; {all_summary}")
        all_listed, all_bytes, all_base_s, all_base_wire = run_naive("out-naive-all", None, total)
        log(
            f"naive, whole store: {all_base_s:.2f} s, {all_base_wire / 1e6:.2f} MB on the wire, "
            f"listed {all_listed}, downloaded {all_bytes} bytes"
        )

        for output, expected, download in [
            ("out-ours", selected, True),
            ("out-naive", selected, True),
            ("out-ours-all", made, False),
            ("out-naive-all", made, False),
        ]:
            check_landed(client, output, expected, download)
        log("every selected instance landed with its source's bytes, on both sides")

    ours_per = summary["objects_listed"] / n
    emit("objects_listed_per_selected", ours_per, base_listed / n, 1.2, ours_per <= 1.2)
    ours_bytes = summary["bytes_through_worker"]
    emit("worker_bytes", ours_bytes, base_bytes, 0.01, ours_bytes <= 0.01 * base_bytes)
    emit("wire_bytes", ours_wire, base_wire, None, None)
    emit("instances_per_s", n / ours_s, n / base_s, None, None)
    all_per = all_summary["objects_listed"] / total
    emit("objects_listed_per_instance_unfiltered", all_per, all_listed / total, None, None)
    emit("worker_bytes_unfiltered", all_summary["bytes_through_worker"], all_bytes, None, None)
    emit("instances_per_s_unfiltered", total / all_s, total / all_base_s, None, None)
    log(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
