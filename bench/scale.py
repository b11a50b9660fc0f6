"""Benchmark: does anything but the work grow with the size of the work?

    python bench/scale.py [--sizes 5000,50000] [--huge]

Makes N tiny instances (2-4 KB: pydicom test files with fresh UIDs, 50 instances a series, 4 series
a study, so the disk is not the limit) and runs the three pipelines on them as a user would, each
as `python -m pipelines.X` in a fresh process, timed by wall clock, its peak resident set taken from
`resource.getrusage(RUSAGE_CHILDREN)` in a wrapper process of its own (the largest process of the
run: the direct runner works in one):
  import_dicom     the files into a local file-layout store
  export_dicom     that store into a directory, byte for byte
  export_metadata  that store into a local Parquet table
and `cp -r` of the same files, the baseline for import (`cp -r` then `sync` too, for reference), and
bench/beam_floor.py: import's shape with no work, what Beam's direct runner costs by itself. At
each size the time per instance and the peak RSS are reported; the targets are the issue's: at the
largest size at most 1.2 times the smallest's, and import at most 3 times `cp -r`'s time per file.
Each pipeline's growth in RSS is set beside the floor's: the direct runner holds every shuffled
element in memory, so part of any pipeline's growth is Beam's own.
`--huge` adds 500,000 (about 2 GB and an hour or more on two cores). Then import against a copy of
600 multi-frame instances of 5 MiB (3 GB), where both are bound by bytes: target 1.5 times `cp -r`
followed by `sync` (a durable copy, as the store's writes are), plain `cp -r` beside it. Then, in a
100,000-object bucket (fake-gcs-server on loopback, the objects preloaded into its filesystem
backend), the objects listed to resolve narrow patterns, per matching object (target 2), beside
Beam's FileSystems.match: bench/import_parse.py's listing at ten times its size. Ends with one JSON
line per metric.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.import_parse import listing, seed_listing_bucket  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "rtplan.dcm",
    "reportsi.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "rtdose_1frame.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
]
SERIES_SIZE, SERIES_PER_STUDY = 50, 4
GROWTH_TARGET, CP_TARGET, LARGE_TARGET = 1.2, 3.0, 1.5
PIPELINES = ("import_dicom", "export_dicom", "export_metadata")
LARGE_FRAMES = 10  # of 512 x 512 16-bit pixels: 5 MiB an instance

emit = functools.partial(report.emit, "scale")

# Runs a command and prints its wall time and the peak RSS (KiB) of its largest process, as JSON.
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"seconds": time.perf_counter() - start, "exit": code,
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_instances(target: Path, count: int) -> int:
    """`count` instances under target/study/series/; returns their total bytes."""
    sources = [pydicom.dcmread(get_testdata_file(name)) for name in SOURCES]
    total = 0
    for index in range(count):
        if index % SERIES_SIZE == 0:
            if index % (SERIES_SIZE * SERIES_PER_STUDY) == 0:
                study = generate_uid()
                study_dir = target / f"{index // (SERIES_SIZE * SERIES_PER_STUDY):06d}"
            series = generate_uid()
            folder = study_dir / f"{index // SERIES_SIZE % SERIES_PER_STUDY}"
            folder.mkdir(parents=True)
        dataset = sources[index % len(sources)]
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        total += save_as_new(dataset, folder / f"{index:07d}.dcm")
    return total


def save_as_new(dataset: pydicom.Dataset, path: Path) -> int:
    """`dataset` saved to `path` as a new instance (a fresh SOP Instance UID); its size."""
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def make_large_instances(target: Path, count: int) -> int:
    """`count` multi-frame CT instances of 5 MiB of random pixels each (nothing compresses), one
    series; returns their total bytes."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.Rows = dataset.Columns = 512
    dataset.NumberOfFrames = LARGE_FRAMES
    dataset.PixelData = random.Random(0).randbytes(512 * 512 * 2 * LARGE_FRAMES)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    target.mkdir(parents=True)
    return sum(save_as_new(dataset, target / f"{index:05d}.dcm") for index in range(count))


def large_files(scratch: Path, count: int) -> None:
    """import_dicom against a copy of the same multi-MB files, where both are bound by bytes: `cp -r`
    then `sync` (the copy made durable, as the store's writes are) is the target's baseline; plain
    `cp -r`, which leaves the bytes in the page cache, is reported beside it."""
    work = scratch / "large"
    size = make_large_instances(work / "incoming", count)
    report.log(f"{count:,} multi-frame instances, {size / 1e6:.0f} MB")
    commands = {
        "cp": ["cp", "-r", str(work / "incoming"), str(work / "copy")],
        "cp_sync": ["sh", "-c", f"cp -r '{work}/incoming' '{work}/copy_synced' && sync"],
        "import_dicom": [
            sys.executable, "-m", "pipelines.import_dicom", f"--input={work}/incoming/*.dcm",
            f"--store={work}/store", f"--dead_letter={work}/dead_letter",
        ],
    }  # fmt: skip
    per_file = {}
    for name, command in commands.items():
        subprocess.run(["sync"], check=True)
        per_file[name] = 1000 * measure(command)["seconds"] / count
        report.log(f"multi-MB {name}: {per_file[name]:.1f} ms/file")
    ours, base = per_file["import_dicom"], per_file["cp_sync"]
    emit("import_vs_cp_ms_per_file_multi_mb", ours, base, LARGE_TARGET, ours <= LARGE_TARGET * base)
    emit("import_vs_cp_without_sync_ms_per_file_multi_mb", ours, per_file["cp"], None, None)
    shutil.rmtree(work)


def measure(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of one command, run in a fresh wrapper process."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    if result["exit"] != 0:
        raise SystemExit(f"{command[:3]} exited {result['exit']}")
    return {"seconds": result["seconds"], "rss_mib": result["max_rss_kib"] / 1024}


def run_size(scratch: Path, count: int) -> dict[str, dict]:
    """Every pipeline and `cp -r` over `count` fresh instances; per-instance seconds and peak MiB."""
    work = scratch / str(count)
    started = time.perf_counter()
    size = make_instances(work / "incoming", count)
    report.log(f"{count:,} instances, {size / 1e6:.0f} MB, made in {time.perf_counter() - started:.0f} s")
    python = [sys.executable, "-m"]
    store = str(work / "store")
    commands = {
        "cp": ["cp", "-r", str(work / "incoming"), str(work / "copy")],
        "cp_sync": ["sh", "-c", f"cp -r '{work}/incoming' '{work}/copy_synced' && sync"],
        "import_dicom": [
            *python,
            "pipelines.import_dicom",
            f"--input={work}/incoming/**.dcm",
            f"--store={store}",
            f"--dead_letter={work}/dl_import",
        ],
        "export_dicom": [
            *python,
            "pipelines.export_dicom",
            f"--store={store}",
            f"--output={work}/exported",
            f"--dead_letter={work}/dl_export",
        ],
        "export_metadata": [
            *python,
            "pipelines.export_metadata",
            f"--store={store}",
            f"--destination={work}/metadata",
            f"--dead_letter={work}/dl_metadata",
        ],
        "beam_floor": [sys.executable, "bench/beam_floor.py", str(count)],
    }
    results = {}
    for name, command in commands.items():
        subprocess.run(["sync"], check=True)  # the files just written do not slow the next step
        result = measure(command)
        result["per_instance_ms"] = 1000 * result["seconds"] / count
        report.log(
            f"{count:,} {name}: {result['seconds']:.1f} s, {result['per_instance_ms']:.3f} ms/instance, "
            f"peak {result['rss_mib']:.0f} MiB"
        )
        results[name] = result
    shutil.rmtree(work)
    return results


def report_sizes(measured: dict[int, dict[str, dict]]) -> None:
    """Each size's figures, then each larger size against the smallest, and import against cp."""
    small, *larger = measured
    for count, results in measured.items():
        for name in (*PIPELINES, "beam_floor", "cp", "cp_sync"):
            emit(f"{name}_ms_per_instance_{count}", results[name]["per_instance_ms"], None, None, None)
            emit(f"{name}_peak_rss_mib_{count}", results[name]["rss_mib"], None, None, None)
    for count in larger:
        for name in (*PIPELINES, "beam_floor"):
            for key, metric in (("per_instance_ms", "ms_per_instance"), ("rss_mib", "peak_rss_mib")):
                ours, base = measured[count][name][key], measured[small][name][key]
                target = GROWTH_TARGET
                emit(f"{name}_{metric}_{count}_vs_{small}", ours, base, target, ours <= target * base)
        floor_growth = measured[count]["beam_floor"]["rss_mib"] - measured[small]["beam_floor"]["rss_mib"]
        for name in PIPELINES:
            growth = measured[count][name]["rss_mib"] - measured[small][name]["rss_mib"]
            emit(f"{name}_rss_growth_mib_{count}_vs_{small}_vs_beam_floor", growth, floor_growth, None, None)
    for count in larger or [small]:
        ours, base = (
            measured[count]["import_dicom"]["per_instance_ms"],
            measured[count]["cp"]["per_instance_ms"],
        )
        emit(f"import_vs_cp_ms_per_file_{count}", ours, base, CP_TARGET, ours <= CP_TARGET * base)
        durable = measured[count]["cp_sync"]["per_instance_ms"]
        emit(f"import_vs_cp_then_sync_ms_per_file_{count}", ours, durable, None, None)
        floor = measured[count]["beam_floor"]["per_instance_ms"]
        emit(f"beam_floor_vs_cp_ms_per_file_{count}", floor, base, None, None)


def listing_at_scale(studies: int) -> None:
    """bench/import_parse.py's listing comparison in a bucket of `studies` x 100 objects."""
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        seed_listing_bucket(Path(scratch), studies)
        report.log(f"{studies * 100:,} objects preloaded in {time.perf_counter() - started:.0f} s")
        with running_emulator(root=Path(scratch)):
            listing(emit, f"_{studies * 100}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000", help="comma-separated instance counts; empty: none")
    parser.add_argument("--huge", action="store_true", help="add 500,000 instances")
    parser.add_argument("--large_count", type=int, default=600, help="5 MiB instances; 0: none")
    parser.add_argument("--listing_studies", type=int, default=1000, help="of 100 objects each; 0: none")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([500_000] if args.huge else [])
    if sizes:
        with tempfile.TemporaryDirectory() as scratch:
            report_sizes({count: run_size(Path(scratch), count) for count in sizes})
    if args.large_count:
        with tempfile.TemporaryDirectory() as scratch:
            large_files(Path(scratch), args.large_count)
    if args.listing_studies:
        listing_at_scale(args.listing_studies)


if __name__ == "__main__":
    main()
