"""Many distinct instances from one real file, fast: its SOP Instance UID replaced, byte for byte,
by UIDs of the same length (so no length field changes), in its file meta and its data set."""

from __future__ import annotations

from pathlib import Path

import pydicom


def fresh_copies(source: Path, count: int, target: Path, start: int = 0) -> list[Path]:
    """`count` copies of `source` in `target`, each with its own SOP Instance UID."""
    data = source.read_bytes()
    sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID.encode()
    stem, _, last = sop.rpartition(b".")
    width = len(last)
    assert count + start <= 10 ** (width - 1), "the UID's last component is too short for so many copies"
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(start, start + count):
        uid = stem + b"." + b"9" + str(number).zfill(width - 1).encode()  # same length, no leading 0
        path = target / f"{number:06d}.dcm"
        path.write_bytes(data.replace(sop, uid))
        paths.append(path)
    return paths
