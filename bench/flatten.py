"""Benchmark: metadata rows per second, our header parse and flatten versus pydicom's JSON model.

    python bench/flatten.py [--instances 2000] [--runs 3] [--profile-top 15]

Replicates the corpus our parser accepts (bench/import_parse.py's valid_sources: pydicom's test and
charset files and pydicom-data, the multi-MB images in their natural proportion) as whole copies,
each instance with fresh Study, Series and SOP Instance UIDs, until there are at least `instances`
files, written once to a temporary directory. Then, on the same files, in one process:
  ours      open_ranged + read_header (stops before Pixel Data, checks the rest by element headers)
            + dicomlib.flatten.flatten(header.dataset): one row of the metadata table
  baseline  what a hand-written script does: pydicom.dcmread(path) of the whole file, pixels
            included, ds.to_json_dict() with its defaults (no bulk data handler, so binary values,
            Pixel Data too, are inlined as base64 whatever their size; the file meta group is not in
            it), then a generic recursive flatten of the JSON into one dict of column -> value
            (keys joined by ".", lists of objects indexed, lists of scalars kept)
An untimed pass of both sides warms caches and finds the files either side raises on; those are
left out of the timed runs (and counted on stderr). The timed runs alternate ours and baseline,
`runs` times each; the best run of each is reported. Within our runs the two phases are timed with
perf_counter: parse (open_ranged + read_header) and flatten. Finally, untimed, cProfile over flatten
alone (on freshly parsed headers) prints its hot functions to stderr.

Ends with one JSON line per metric on stdout (progress and the profile go to stderr):
  rows_per_s      ours vs baseline; target 2.0 (ratio), met when ours >= 2 x baseline
  parse_share     share of our time in the parse (informational: baseline, target and met null)
  flatten_share   share of our time in flatten (informational)
  bytes_read      bytes read per file set: ours what open_ranged fetched, baseline the whole files
                  (informational)
  instances       files timed (ours) of those written (baseline), informational
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import math
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.import_parse import valid_sources  # noqa: E402
from dicomlib.flatten import flatten  # noqa: E402
from dicomlib.header import read_header  # noqa: E402
from storage.objects import MatchedFile, open_ranged  # noqa: E402

emit = functools.partial(report.emit, "flatten")


log = report.log


def make_instances(target: Path, instances: int) -> list[MatchedFile]:
    """Whole copies of the valid corpus with fresh UIDs, at least `instances` files."""
    sources = valid_sources()
    copies = math.ceil(instances / len(sources))
    written = []
    for index, source in enumerate(sources):
        dataset = pydicom.dcmread(source)
        for copy in range(copies):
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = target / f"{copy:02d}" / f"{index:04d}.dcm"
            path.parent.mkdir(exist_ok=True)
            dataset.save_as(path, enforce_file_format=True)
            written.append(MatchedFile(str(path), path.stat().st_size))
    return sorted(written)  # copy by copy, each the corpus in its order


# ours


def ours(file: MatchedFile) -> tuple[dict, int]:
    with open_ranged(file) as stream:
        header = read_header(stream, file.size)
        fetched = stream.raw.bytes_fetched
    return flatten(header.dataset).row, fetched


def ours_timed(files: list[MatchedFile]) -> tuple[float, float, float, int]:
    """(total seconds, parse seconds, flatten seconds, bytes fetched) over `files`."""
    clock = time.perf_counter
    parse = flat = 0.0
    fetched = 0
    start = clock()
    for file in files:
        t0 = clock()
        with open_ranged(file) as stream:
            header = read_header(stream, file.size)
            fetched += stream.raw.bytes_fetched
        t1 = clock()
        flatten(header.dataset)
        parse += t1 - t0
        flat += clock() - t1
    return clock() - start, parse, flat, fetched


# baseline


def flatten_json(value: Any, prefix: str = "", out: dict | None = None) -> dict:
    """Nested JSON as one flat dict: keys joined by ".", lists of objects indexed."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, item in value.items():
            flatten_json(item, f"{prefix}.{key}" if prefix else key, out)
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for index, item in enumerate(value):
            flatten_json(item, f"{prefix}.{index}", out)
    else:
        out[prefix] = value
    return out


def baseline(file: MatchedFile) -> tuple[dict, int]:
    return flatten_json(pydicom.dcmread(file.uri).to_json_dict()), file.size


def baseline_timed(files: list[MatchedFile]) -> tuple[float, int]:
    start = time.perf_counter()
    for file in files:
        flatten_json(pydicom.dcmread(file.uri).to_json_dict())
    return time.perf_counter() - start, sum(f.size for f in files)


# checks and profile


def usable(files: list[MatchedFile]) -> list[MatchedFile]:
    """Files both sides make a non-empty row of (also the untimed warm-up)."""
    kept = []
    failed = {"ours": 0, "baseline": 0}
    for file in files:
        ok = True
        for side, read in (("ours", ours), ("baseline", baseline)):
            try:
                row, _ = read(file)
                assert row, "empty row"
            except Exception as error:
                failed[side] += 1
                ok = False
                log(f"{side} raises on {Path(file.uri).name}: {type(error).__name__}: {str(error)[:100]}")
        if ok:
            kept.append(file)
    log(f"left out: {len(files) - len(kept)} files (ours raises on {failed['ours']}, "
        f"baseline on {failed['baseline']})")  # fmt: skip
    return kept


def profile_flatten(files: list[MatchedFile], top: int) -> None:
    """cProfile of flatten alone, on headers parsed (untimed) just before: flatten converts raw
    elements in place, so each call gets a fresh data set."""
    datasets = []
    for file in files:
        with open_ranged(file) as stream:
            datasets.append(read_header(stream, file.size).dataset)
    profiler = cProfile.Profile()
    profiler.enable()
    for dataset in datasets:
        flatten(dataset)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    log(f"cProfile of flatten over {len(datasets)} headers: {stats.total_tt:.2f} s under the profiler")
    deferred = sum(v[3] for k, v in stats.stats.items() if k[2] == "_convert_with_pydicom")
    log(f"of which pydicom converting raw elements flatten cannot decode itself (sequences above all, "
        f"parsed lazily): {deferred:.2f} s, {deferred / stats.total_tt:.0%}")  # fmt: skip
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    for line in out.getvalue().splitlines():
        if line.strip():
            print(f"#   {line}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom warns on odd values, many times over: for neither side
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        files = make_instances(Path(scratch), args.instances)
        total = sum(f.size for f in files)
        log(f"{len(files)} instances, {total / 1e6:.0f} MB, written in {time.perf_counter() - started:.1f} s")
        written = len(files)
        files = usable(files)
        our_best = base_best = math.inf
        parse = flat = 0.0
        for run in range(args.runs):
            seconds, run_parse, run_flat, our_bytes = ours_timed(files)
            if seconds < our_best:
                our_best, parse, flat = seconds, run_parse, run_flat
            base_seconds, base_bytes = baseline_timed(files)
            base_best = min(base_best, base_seconds)
            log(f"run {run + 1}: ours {seconds:.2f} s (parse {run_parse:.2f}, flatten {run_flat:.2f}), "
                f"baseline {base_seconds:.2f} s")  # fmt: skip
        our_rate, base_rate = len(files) / our_best, len(files) / base_best
        emit("rows_per_s", our_rate, base_rate, 2.0, our_rate >= 2.0 * base_rate)
        emit("parse_share", parse / (parse + flat), None, None, None)
        emit("flatten_share", flat / (parse + flat), None, None, None)
        emit("bytes_read", our_bytes, base_bytes, None, None)
        emit("instances", len(files), written, None, None)  # timed, of those written
        profile_flatten(files, args.profile_top)
        log(f"whole bench {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
