"""Read and validate a DICOM file's header without reading its pixel data.

pydicom parses up to Pixel Data and stops; the rest of the file is checked by walking element
headers only, so a multi-GB file costs a few small reads. pydicom accepts a file cut short without
complaint (a UID cut in half reads as a shorter UID), so truncation is checked here: the parse must
either stop at Pixel Data, or its last element must end exactly at the end of the file; every
element from Pixel Data on must fit in the file. A file cut exactly between two elements before
Pixel Data cannot be told from a complete file without Pixel Data (pydicom's charset test files are
images stripped of their pixels this way), so it is accepted.
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings repeat the ones ignored below
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                   b"UT", b"UV"}  # fmt: skip
UNDEFINED = 0xFFFFFFFF
ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD


class InvalidInstance(Exception):
    """A file that cannot be stored; `reason` is the dead letter's reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    dataset: Dataset  # everything before Pixel Data, file meta included


def read_header(stream: BinaryIO, size: int) -> Header:
    """Parse and validate; raise InvalidInstance with not_dicom, truncated, malformed or *_uid."""
    with warnings.catch_warnings():  # odd but readable values; the dcmtk oracle tests cover them
        warnings.simplefilter("ignore")
        dataset = _parse(stream)
        if dataset.file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            _check_complete(stream, size, dataset)
        study, series, sop = (
            _uid(dataset, key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
    return Header(study, series, sop, dataset)


def _parse(stream: BinaryIO) -> Dataset:
    try:
        return pydicom.dcmread(stream, stop_before_pixels=True)
    except InvalidDicomError:
        raise InvalidInstance(
            "not_dicom", "not a DICOM Part 10 file (no 'DICM' after the preamble)"
        ) from None
    except (EOFError, struct.error) as error:
        raise InvalidInstance("truncated", f"the file ends inside its header: {error}") from None
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:
        raise InvalidInstance("malformed", f"pydicom cannot parse the header: {error}") from None


def valid_uid(value: str) -> bool:
    """1 to 64 digits and dots, no empty component: safe as a path segment ('..' is not)."""
    return len(value) <= 64 and UID_RE.fullmatch(value) is not None


def _uid(dataset: Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception as error:  # pydicom converts values lazily; any odd byte can surface here
        raise InvalidInstance("invalid_uid", f"{keyword} cannot be decoded: {error}") from None
    if value is None or value == "":
        raise InvalidInstance("missing_uid", f"{keyword} is missing or empty")
    if not isinstance(value, str) or not valid_uid(value):
        shown = repr(str(value))[:80]
        raise InvalidInstance("invalid_uid", f"{keyword} {shown} is not 1-64 digits and dots")
    return str(value)  # a plain str: pydicom's UID cannot be a Beam key


def _check_complete(stream: BinaryIO, size: int, dataset: Dataset) -> None:
    if len(dataset) == 0:
        raise InvalidInstance("truncated", "the file ends before its data set begins")
    position = stream.tell()
    if position < size:  # stopped at Pixel Data: walk the remaining element headers
        implicit, little = dataset.original_encoding
        _walk_to_end(stream, size, bool(implicit), little is not False)
        return
    last = dataset._dict[list(dataset._dict)[-1]]  # keyed by tag; the last read is the highest
    if isinstance(last, RawDataElement) and last.length != UNDEFINED:
        end = last.value_tell + last.length
        if end != size:
            raise InvalidInstance(
                "truncated", f"element {last.tag} needs {end} bytes but the file has {size}"
            )
    elif not _ends_with_delimiter(stream, size, dataset.original_encoding[1] is not False):
        raise InvalidInstance("truncated", f"sequence {last.tag} has no end before the end of the file")


def _ends_with_delimiter(stream: BinaryIO, size: int, little: bool) -> bool:
    stream.seek(size - 8)
    return stream.read(8) == struct.pack("<HHL" if little else ">HHL", 0xFFFE, 0xE0DD, 0)


def _walk_to_end(stream: BinaryIO, size: int, implicit: bool, little: bool) -> None:
    """Follow element headers from the current position; each value must fit in the file."""
    endian = "<" if little else ">"
    position = stream.tell()
    while position < size:
        tag, length, header = _element_header(stream, position, size, implicit, endian)
        position += header
        if length == UNDEFINED:
            position = _skip_items(stream, position, size, endian, tag)
            continue
        if position + length > size:
            raise InvalidInstance(
                "truncated",
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes at offset "
                f"{position} but the file has {size}",
            )
        position += length


def _element_header(
    stream: BinaryIO, position: int, size: int, implicit: bool, endian: str
) -> tuple[int, int, int]:
    stream.seek(position)
    head = stream.read(8)
    if len(head) < 8:
        raise InvalidInstance("truncated", f"the file ends inside an element header at {position}")
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | element
    if implicit or tag >> 16 == 0xFFFE:
        return tag, struct.unpack(endian + "L", head[4:])[0], 8
    if head[4:6] in LONG_LENGTH_VRS:
        extra = stream.read(4)
        if len(extra) < 4:
            raise InvalidInstance("truncated", f"the file ends inside an element header at {position}")
        return tag, struct.unpack(endian + "L", extra)[0], 12
    return tag, struct.unpack(endian + "H", head[6:])[0], 8


def _skip_items(stream: BinaryIO, position: int, size: int, endian: str, tag: int) -> int:
    """Skip an undefined-length value (encapsulated frames): items up to the sequence delimiter."""
    if _ends_with_delimiter(stream, size, endian == "<"):  # usual: nothing follows the frames
        return size
    while position < size:
        item, length, _ = _element_header(stream, position, size, True, endian)
        position += 8
        if item == SEQUENCE_END:
            return position
        if item != ITEM or length == UNDEFINED or position + length > size:
            break
        position += length
    raise InvalidInstance(
        "truncated",
        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no end before the end of the file",
    )
