"""Hostile variants of real DICOM files, made deterministically for the fuzz test.

Each mutant starts as a copy of a corpus file with its own SOP Instance UID (so that the mutants
that stay valid are stored, and exported again, rather than all colliding), then gets one kind of
damage: a flipped bit, a cut, an element length made huge, a VR made nonsense, an element written
twice, a hostile UID, another transfer syntax in the file meta, or a deflated data set with damage.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import write_file_meta_info

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
HOSTILE_UIDS = ["../../evil", "1.2..3", " 1.2.3", "1.2.3/4", "", "1." + "2" * 70, "1.2.3\\4.5", "1.2.3 "]
SYNTAXES = [b"1.2.840.10008.1.2\x00", b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00",
            b"1.2.840.10008.1.2.5\x00", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90"]  # fmt: skip


def make_mutants(sources: list[Path], per_source: int, target: Path, seed: int = 11) -> list[Path]:
    """`per_source` mutants of each source in `target`, the same every time for the same seed."""
    target.mkdir(parents=True, exist_ok=True)
    chance = random.Random(seed)
    kinds = list(MUTATIONS)
    paths = []
    for number, source in enumerate(sources):
        for copy in range(per_source):
            data = _fresh_uid(source.read_bytes(), number * per_source + copy)
            kind = kinds[copy % len(kinds)]
            path = target / f"{number:03d}-{copy:03d}-{kind}.dcm"
            path.write_bytes(MUTATIONS[kind](data, chance))
            paths.append(path)
    return paths


def _fresh_uid(data: bytes, number: int) -> bytes:
    sop = _read(data).SOPInstanceUID.encode()
    stem, _, last = sop.rpartition(b".")
    if len(last) < 5:
        return data
    return data.replace(sop, stem + b"." + b"9" + str(number).zfill(len(last) - 1).encode())


def _read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def _elements(data: bytes) -> list[tuple[int, int, bool, bool]]:
    """(value offset, length, explicit VR, little endian) of the raw top-level and meta elements."""
    ds = _read(data)
    little = ds.original_encoding[1] is not False
    found = [(e.value_tell, e.length, True, True) for e in ds.file_meta._dict.values() if _raw(e)]
    found += [(e.value_tell, e.length, not e.is_implicit_VR, little) for e in ds._dict.values() if _raw(e)]
    return found


def _raw(element: object) -> bool:
    return isinstance(element, RawDataElement) and element.value_tell is not None


def flip(data: bytes, chance: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(chance.randint(1, 3)):
        position = chance.randrange(128, len(out)) if chance.random() < 0.7 else chance.randrange(128, 1024)
        out[min(position, len(out) - 1)] ^= 1 << chance.randrange(8)
    return bytes(out)


def cut(data: bytes, chance: random.Random) -> bytes:
    return data[: chance.randrange(0, len(data))]


def huge_length(data: bytes, chance: random.Random) -> bytes:
    tell, _, explicit, little = chance.choice(_elements(data))
    out = bytearray(data)
    endian = "<" if little else ">"
    short = explicit and out[tell - 4 : tell - 2].decode("latin-1") not in LONG_VRS
    if short:
        out[tell - 2 : tell] = struct.pack(endian + "H", chance.choice([0xFFFF, 0xFFFE, 0x8001]))
    else:
        out[tell - 4 : tell] = struct.pack(
            endian + "L", chance.choice([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x10000000])
        )
    return bytes(out)


def bad_vr(data: bytes, chance: random.Random) -> bytes:
    explicit = [(tell, length) for tell, length, is_explicit, _ in _elements(data) if is_explicit]
    tell, _ = chance.choice(explicit)
    out = bytearray(data)
    header = tell - (8 if out[tell - 4 : tell - 2].decode("latin-1") not in LONG_VRS else 12)
    out[header + 4 : header + 6] = chance.choice([b"ZZ", b"\x00\x01", b"SQ", b"UN", b"OB", b"DA", b"US"])
    return bytes(out)


def twice(data: bytes, chance: random.Random) -> bytes:
    tell, length, explicit, _ = chance.choice(_elements(data))
    long = not explicit or data[tell - 4 : tell - 2].decode("latin-1") in LONG_VRS
    start = tell - (12 if explicit and long else 8)
    element = data[start : tell + length]
    return data[: tell + length] + element + data[tell + length :]


def hostile_uid(data: bytes, chance: random.Random) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    if chance.random() < 0.2:  # padding where it may not be: pydicom would strip it, so in bytes
        sop = ds.SOPInstanceUID.encode()
        return data.replace(sop + b"\0", b" " + sop) if len(sop) % 2 else data.replace(sop, b" " + sop[1:])
    keyword = chance.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, keyword, chance.choice(HOSTILE_UIDS))
        out = io.BytesIO()
        ds.save_as(out)
    return out.getvalue()


def other_syntax(data: bytes, chance: random.Random) -> bytes:
    current = _read(data).file_meta.TransferSyntaxUID.encode()
    padded = current + b"\x00" * (len(current) % 2)
    same_length = [s for s in SYNTAXES if len(s) == len(padded) and s != padded]
    if padded not in data or not same_length:
        return flip(data, chance)
    return data.replace(padded, chance.choice(same_length), 1)


def deflated(data: bytes, chance: random.Random) -> bytes:
    """The data set deflated (as a Deflated Explicit VR Little Endian file), then damaged."""
    ds = _read(data)
    if ds.original_encoding != (False, True) or data[132:136] != b"\x02\x00\x00\x00":
        return cut(data, chance)  # deflate applies to explicit VR little endian; group length needed
    meta = ds.file_meta
    body = data[132 + 12 + struct.unpack("<L", data[140:144])[0] :]
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=False)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = compressor.compress(body) + compressor.flush()
    damaged = chance.choice([stream[: len(stream) // 2], flip(b"\x00" * 128 + stream, chance)[128:], stream])
    return data[:128] + b"DICM" + buffer.getvalue() + damaged


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": flip,
    "cut": cut,
    "huge_length": huge_length,
    "bad_vr": bad_vr,
    "twice": twice,
    "hostile_uid": hostile_uid,
    "other_syntax": other_syntax,
    "deflated": deflated,
}
