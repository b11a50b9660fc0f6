"""Benchmark: our header parse and validate versus reading whole files with pydicom.

    python bench/import_parse.py [--small 440] [--large 60]

Makes instances with fresh UIDs from the corpus (pydicom's test files and pydicom-data), among
them multi-frame and multi-MB files, then measures on the same files, locally and through gs://
(fake-gcs-server on loopback):
  ours      open_ranged + read_header (stops before Pixel Data, checks the rest by element headers)
  baseline  pydicom.dcmread(path) of the whole file; through gs://, download the blob, then dcmread
and, in a 10,000-object bucket, how many objects each lists to resolve narrow patterns: our walk
versus Beam's FileSystems.match. Ends with one JSON line per metric.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from dicomlib.failures import ItemFailed  # noqa: E402
from dicomlib.header import read_header  # noqa: E402
from dicomlib.wildcard import parse_pattern  # noqa: E402
from storage.listing import Lister, expand
from storage.objects import MatchedFile, open_ranged
from tests.conftest import corpus_roots  # noqa: E402
from tests.gcs_emulator import preload, running_emulator, upload_tree  # noqa: E402

LARGE = 2_000_000  # "multi-MB": the files whose pixel data dominates


emit = functools.partial(report.emit, "import_parse")


def valid_sources() -> list[Path]:
    """Corpus files our parser accepts (the rest would only measure dead letters)."""
    found = []
    for path in sorted(p for root in corpus_roots() for p in root.rglob("*") if p.is_file()):
        try:
            with open_ranged(MatchedFile(str(path), path.stat().st_size)) as stream:
                read_header(stream, path.stat().st_size)
            found.append(path)
        except ItemFailed:
            pass
    return found


def tiled(path: Path, frames: int) -> pydicom.Dataset:
    """An uncompressed single-frame image repeated into a multi-frame one."""
    dataset = pydicom.dcmread(path)
    dataset.NumberOfFrames = frames
    dataset.PixelData = dataset.PixelData * frames
    return dataset


def make_instances(target: Path, small: int, large: int) -> None:
    sources = valid_sources()
    big = [pydicom.dcmread(p) for p in sources if p.stat().st_size > LARGE]
    big.append(tiled(next(p for p in sources if p.name == "MR2_UNCI.dcm"), 3))
    little = [p for p in sources if p.stat().st_size <= LARGE]
    plan = [("large", big[i % len(big)]) for i in range(large)]
    plan += [("small", little[i % len(little)]) for i in range(small)]
    for index, (kind, source) in enumerate(plan):
        dataset = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        folder = target / kind
        folder.mkdir(parents=True, exist_ok=True)
        dataset.save_as(folder / f"{index:05d}.dcm", enforce_file_format=True)


def timed(files: list[MatchedFile], read: Callable[[MatchedFile], int]) -> tuple[float, int]:
    """(instances per second, bytes read) of `read` over `files`."""
    start = time.perf_counter()
    total = sum(read(f) for f in files)
    return len(files) / (time.perf_counter() - start), total


def ours(file: MatchedFile) -> int:
    with open_ranged(file) as stream:
        read_header(stream, file.size)
        return stream.raw.bytes_fetched


def baseline_local(file: MatchedFile) -> int:
    pydicom.dcmread(file.uri)
    return file.size


def baseline_gcs(file: MatchedFile) -> int:
    from storage.objects import gcs_client, split_gcs

    bucket, name = split_gcs(file.uri)
    data = gcs_client().bucket(bucket).blob(name).download_as_bytes()
    pydicom.dcmread(io.BytesIO(data))
    return len(data)


def compare(where: str, kind: str, files: list[MatchedFile], baseline: Callable[[MatchedFile], int]) -> None:
    ours(files[0]), baseline(files[0])  # warm up imports and connections
    our_rate, our_bytes = timed(files, ours)
    base_rate, base_bytes = timed(files, baseline)
    speed_target = 3.0 if (where, kind) == ("gcs", "multi_mb") else 1.0
    emit(
        f"{where}_{kind}_instances_per_s",
        our_rate,
        base_rate,
        speed_target,
        our_rate >= speed_target * base_rate,
    )
    bytes_target = 0.10 if kind == "multi_mb" else 1.0
    emit(
        f"{where}_{kind}_bytes_read",
        our_bytes,
        base_bytes,
        bytes_target,
        our_bytes <= bytes_target * base_bytes,
    )


def seed_listing_bucket(root: Path, studies: int) -> None:
    """`studies` x 4 series x 25 one-byte objects in bucket listing-bench, preloaded into an emulator
    root (`running_emulator(root=...)`)."""
    names = (
        f"studies/s{study:04d}/series_{series}/i{instance:04d}.dcm"
        for study in range(studies)
        for series in range(4)
        for instance in range(25)
    )
    preload(root, "listing-bench", names, b"x")


def listing(emit: Callable[..., None], suffix: str = "") -> None:
    """Objects listed to resolve narrow patterns in the seeded bucket: ours versus Beam's
    FileSystems.match (run inside `running_emulator(root=...)`)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp import gcsio

    beam_listed = 0
    original = gcsio.GcsIO.list_files

    def counting(self, path: str, with_metadata: bool = False) -> Iterator:
        nonlocal beam_listed
        for item in original(self, path, with_metadata=with_metadata):
            beam_listed += 1
            yield item

    gcsio.GcsIO.list_files = counting
    for label, pattern in [
        ("one_series", "gs://listing-bench/studies/s0042/series_2/*.dcm"),
        ("mid_path_wildcard", "gs://listing-bench/studies/s00?2/series_1/*.dcm"),
    ]:
        parsed = parse_pattern(pattern)
        lister = Lister(parsed.bucket)
        matching = sum(1 for _ in expand(parsed, lister))
        beam_listed = 0
        [result] = FileSystems.match([pattern])
        assert len(result.metadata_list) == matching, (label, len(result.metadata_list), matching)
        emit(f"listed_objects_{label}{suffix}", lister.listed, beam_listed, 1.0, lister.listed <= beam_listed)
        # the target is on `ours`: at most 2 objects listed per matching one
        per_match = lister.listed / matching
        emit(f"listed_per_matching_{label}{suffix}", per_match, beam_listed / matching, 2.0, per_match <= 2.0)
    gcsio.GcsIO.list_files = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=440)
    parser.add_argument("--large", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root, seed = Path(scratch) / "instances", Path(scratch) / "seed"
        seed_listing_bucket(seed, studies=100)
        with running_emulator(root=seed) as client:
            make_instances(root, args.small, args.large)
            upload_tree(client, root, "parse-bench")
            sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*.dcm")}
            print(f"# {len(sizes)} instances, {sum(sizes.values()) / 1e6:.0f} MB", file=sys.stderr)
            for kind, folder in (("multi_mb", "large"), ("small", "small")):
                chosen = sorted(name for name in sizes if name.startswith(folder + "/"))
                local = [MatchedFile(str(root / n), sizes[n]) for n in chosen]
                remote = [MatchedFile(f"gs://parse-bench/{n}", sizes[n]) for n in chosen]
                compare("local", kind, local, baseline_local)
                compare("gcs", kind, remote, baseline_gcs)
            listing(emit)


if __name__ == "__main__":
    main()
