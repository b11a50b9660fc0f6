"""Benchmark: tag-only de-identification, instances per second, ours versus pydicom's `deid` and
`dicognito`; and OCR milliseconds per frame for burnt-in text.

    pip install deid dicognito        # the baselines (PyPI); not project dependencies
    python bench/deidentify.py [--instances 300] [--runs 3] [--frames 10]

The corpus: the files of pydicom's corpus our parser accepts (bench/import_parse.py's valid_sources)
that all three tools de-identify without raising (an untimed pass finds them), copied with fresh
Study, Series and SOP Instance UIDs until there are at least `instances` files, written once to a
temporary directory. Each side goes from the file path to a de-identified data set in memory:
  ours       pydicom.dcmread + dicomlib.deidentify.deidentify (Basic Profile, REDACT_NO_TEXT), in
             place (the data set was read for it; dicognito also changes it in place)
  deid       deid.dicom.replace_identifiers([path]) with its default recipe (loaded once), save=False
  dicognito  pydicom.dcmread + dicognito's Anonymizer().anonymize(ds)
Runs alternate the three sides, `runs` times each; the best run of each is reported. Then OCR: one
512 x 512 8-bit frame with text burnt in (tests/test_deidentify_pixels.py's), read `frames` times
with dicomlib.deidentify.pixels.frame_words (the real tesseract), median ms.

One JSON line per metric on stdout:
  instances_per_s  ours vs the faster baseline; target 1.0 (ratio)
  ocr_ms_per_frame median ms (informational: baseline, target and met null)
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.import_parse import valid_sources  # noqa: E402
from dicomlib.deidentify import DeidConfig, deidentify  # noqa: E402

KEY = b"bench-key-0123456789"


emit = functools.partial(report.emit, "deidentify")


log = report.log


def ours(path: Path) -> object:
    return deidentify(pydicom.dcmread(path), DeidConfig(), KEY, in_place=True).dataset


@functools.cache
def _recipe() -> object:
    from deid.config import DeidRecipe

    return DeidRecipe()  # deid's default recipe for DICOM, loaded once


def deid_side(path: Path) -> object:
    from deid.dicom import replace_identifiers

    return replace_identifiers([str(path)], deid=_recipe(), save=False)


def dicognito_side(path: Path) -> object:
    from dicognito.anonymizer import Anonymizer

    ds = pydicom.dcmread(path)
    Anonymizer().anonymize(ds)
    return ds


SIDES: dict[str, Callable[[Path], object]] = {"ours": ours, "deid": deid_side, "dicognito": dicognito_side}


def usable(sources: list[Path]) -> list[Path]:
    """The sources every side de-identifies without raising."""
    kept = []
    for path in sources:
        try:
            for side in SIDES.values():
                side(path)
            kept.append(path)
        except Exception:  # noqa: BLE001 - a file a tool cannot handle is left out, and counted
            pass
    log(f"{len(kept)} of {len(sources)} corpus files are de-identified by all three")
    return kept


def make_instances(target: Path, sources: list[Path], instances: int) -> list[Path]:
    copies = math.ceil(instances / len(sources))
    written = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        for copy in range(copies):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = target / f"{copy:02d}-{index:04d}.dcm"
            ds.save_as(path)
            written.append(path)
    return written


def timed(side: Callable[[Path], object], paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        side(path)
    return len(paths) / (time.perf_counter() - start)


def ocr_ms(frames: int) -> float:
    from dicomlib.deidentify.pixels import frame_words
    from dicomlib.render import eight_bit
    from tests.test_deidentify_pixels import burnt_in

    ds = burnt_in()
    image = eight_bit(ds.pixel_array, ds)
    times = []
    for _ in range(frames):
        start = time.perf_counter()
        frame_words(image)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # deid logs every file
    with tempfile.TemporaryDirectory() as directory:
        sources = usable(valid_sources())
        paths = make_instances(Path(directory), sources, args.instances)
        log(f"{len(paths)} instances written")
        best = dict.fromkeys(SIDES, 0.0)
        for run in range(args.runs):
            for name, side in SIDES.items():
                rate = timed(side, paths)
                best[name] = max(best[name], rate)
                log(f"run {run + 1}: {name} {rate:.1f} instances/s")
    baseline = max(best["deid"], best["dicognito"])
    log(f"best: ours {best['ours']:.1f}, deid {best['deid']:.1f}, dicognito {best['dicognito']:.1f}")
    emit("instances_per_s", best["ours"], baseline, 1.0, best["ours"] >= baseline)
    emit("ocr_ms_per_frame", ocr_ms(args.frames), None, None, None)


if __name__ == "__main__":
    main()
