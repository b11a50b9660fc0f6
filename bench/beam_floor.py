"""What Beam's direct runner costs with no work: import_dicom's shape, its work left out.

    python bench/beam_floor.py COUNT

COUNT elements shaped like import's matched files (a path and a size) are made from one element
(the fan-out of pattern expansion), reshuffled, keyed by a 64-character UID, grouped by it (as
import groups files by SOP Instance UID), turned into one small record each and counted. Nothing is
read, parsed or written. bench/scale.py runs it beside the pipelines at each size: its time per
element and peak RSS are the part of theirs that is Beam's own (the direct runner holds every
shuffled element in memory until the next stage has run).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import apache_beam as beam

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as the bench's instances have


def files(count: int) -> Iterator[tuple[str, int]]:
    return ((f"/scratch/incoming/{i // 200:06d}/{i // 50 % 4}/{i:07d}.dcm", 3000) for i in range(count))


def keyed(file: tuple[str, int]) -> tuple[str, tuple[tuple[str, int], tuple[str, str, str]]]:
    """A SOP Instance UID made from the path, and the file with its study, series and SOP UIDs."""
    sop = f"{UID_ROOT}{abs(hash(file[0])):038d}"
    return sop, (file, (sop[:60], sop[:62], sop))


def main(count: int) -> None:
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create([count])
            | "Expand" >> beam.FlatMap(files)
            | beam.Reshuffle()
            | "BySopInstanceUid" >> beam.Map(keyed)
            | beam.GroupByKey()
            | "Record" >> beam.Map(lambda element: {"outcome": "success", "sop": element[0]})
            | beam.combiners.Count.Globally()
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="elements to make")
    main(parser.parse_args().count)
