"""Read and validate a DICOM file's header without reading its pixel data.

pydicom parses up to Pixel Data and stops; the rest of the file is checked by walking element
headers only, so a multi-GB file costs a few small reads. Whatever lengths a file declares, parsing
holds at most MAX_HEADER_BYTES of it: values over DEFER_BYTES are skipped unread, a header with more
is `too_large`, and a deflated data set is inflated in bounded steps (pydicom would inflate all of
it, pixels included, so a 1 MB file could take gigabytes). pydicom accepts a file cut short without
complaint (a UID cut in half reads as a shorter UID), so truncation is checked here: the parse must
either stop at Pixel Data, or its last element must end exactly at the end of the file; every
element from Pixel Data on must fit in the file. A file cut exactly between two elements before
Pixel Data cannot be told from a complete file without Pixel Data (pydicom's charset test files are
images stripped of their pixels this way), so it is accepted.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset

from dicomlib.failures import ItemFailed, SourceReadError, describe
from dicomlib.uids import valid_uid

logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings repeat the ones ignored below
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                   b"UT", b"UV"}  # fmt: skip
UNDEFINED = 0xFFFFFFFF
ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data
MAX_HEADER_BYTES = 64 * 1024 * 1024  # what parsing may hold of one header (inflated): more is too_large
# Reads pydicom may make of one header (one to three a data element): a hostile file of millions of
# empty elements (8 bytes each) would otherwise cost a minute of CPU within MAX_HEADER_BYTES.
MAX_READS = 2_000_000
DEFER_BYTES = 1_000_000  # larger values are skipped, not read: the table drops them as too_large anyway
INFLATE_CHUNK = 1024 * 1024
MAX_META_BYTES = 1024 * 1024  # a file meta group holds a few UIDs: more is no file meta group


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    dataset: Dataset  # everything before Pixel Data, file meta included; values over DEFER_BYTES unread


def read_header(stream: BinaryIO, size: int) -> Header:
    """Parse and validate; ItemFailed with not_dicom, truncated, malformed, too_large or *_uid.

    An error reading the source itself (SourceReadError) passes through: the caller's read_error.
    """
    dataset = check_header(stream, size)
    study, series, sop = (
        _uid(dataset, key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return Header(study, series, sop, dataset)


def check_header(stream: BinaryIO, size: int) -> Dataset:
    """The header of a whole, well-formed DICOM file, its UIDs unchecked; ItemFailed with not_dicom,
    truncated, malformed or too_large. Holds at most MAX_HEADER_BYTES of it whatever lengths the
    file declares."""
    try:
        try:
            dataset = pydicom.dcmread(
                _Budget(stream, size), stop_before_pixels=True, defer_size=DEFER_BYTES, force=False
            )
        except _Deflated as deflated:  # pydicom would inflate the whole data set at once
            return _parse_deflated(stream, deflated.data_set_start)
        _check_complete(stream, size, dataset)
        return dataset
    except (ItemFailed, SourceReadError):
        raise
    except InvalidDicomError:
        raise ItemFailed("not_dicom", "not a DICOM Part 10 file (no 'DICM' after the preamble)") from None
    except (EOFError, struct.error) as error:
        raise ItemFailed("truncated", f"the file ends inside its header: {describe(error)}") from None
    except Exception as error:  # whatever else pydicom or zlib raises on a hostile file
        raise ItemFailed("malformed", f"pydicom cannot parse the header: {describe(error)}") from None


class _Deflated(Exception):
    """pydicom asked for the whole rest of the file: the data set is deflated."""

    def __init__(self, data_set_start: int) -> None:
        super().__init__(data_set_start)
        self.data_set_start = data_set_start


class _Budget:
    """The stream as pydicom reads it, refusing to hand over more than MAX_HEADER_BYTES.

    Values skipped (deferred) cost nothing; only bytes read count, and reads (MAX_READS). pydicom
    reads "everything left" only to inflate a deflated data set, which is done here instead, in
    bounded steps.
    """

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.name = getattr(stream, "name", None)
        self.left = MAX_HEADER_BYTES
        self.reads_left = MAX_READS

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise _Deflated(self.stream.tell())
        self.reads_left -= 1
        if self.reads_left < 0:
            raise ItemFailed("too_large", f"the header takes more than {MAX_READS} reads (data elements)")
        if size > self.left:
            position = self.stream.tell()
            if position + size > self.size:  # a length that runs past the end: not a large value
                raise ItemFailed("truncated", f"{size} bytes at {position}, but the file has {self.size}")
            raise ItemFailed("too_large", f"the header holds more than {MAX_HEADER_BYTES} bytes of values")
        data = self.stream.read(size)
        self.left -= len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


def _parse_deflated(stream: BinaryIO, data_set_start: int) -> Dataset:
    """A Deflated Explicit VR Little Endian file: inflate at most MAX_HEADER_BYTES (a deflate bomb
    never grows past it), parse up to Pixel Data, and check that the deflate stream is complete."""
    stream.seek(0)
    head = stream.read(data_set_start)
    meta = pydicom.dcmread(io.BytesIO(head)).file_meta  # nothing after the meta: nothing to inflate
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = _inflate(stream, inflater, MAX_HEADER_BYTES + 1)
    cut = len(inflated) > MAX_HEADER_BYTES
    buffer = io.BytesIO(inflated)
    try:
        dataset = read_dataset(
            _Budget(buffer, len(inflated)),  # type: ignore[arg-type]  # what pydicom calls of a file
            False,
            True,
            stop_when=lambda tag, *_: tag in PIXEL_TAGS,
            defer_size=DEFER_BYTES,
        )
    except ItemFailed:
        raise
    except Exception:
        if cut:
            raise _too_large_inflated() from None
        raise
    at_pixels = buffer.tell() < len(inflated)
    if cut and not at_pixels:
        raise _too_large_inflated()
    _inflate_rest(stream, inflater)  # the pixels, inflated and dropped: is the stream whole?
    ds = FileDataset(buffer, dataset, head[:128], meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    if not cut:
        _check_complete(buffer, len(inflated), ds)
    return ds


def _inflate(stream: BinaryIO, inflater: zlib._Decompress, limit: int) -> bytes:
    """Up to `limit` more inflated bytes (fewer only at the end of the stream or of the file)."""
    out = bytearray()
    while len(out) < limit and not inflater.eof:
        data = inflater.unconsumed_tail or stream.read(INFLATE_CHUNK)
        if not data:
            break
        try:
            out += inflater.decompress(data, limit - len(out))
        except zlib.error as error:
            raise ItemFailed("malformed", f"the deflated data set is not deflate data: {error}") from None
    return bytes(out)


def _inflate_rest(stream: BinaryIO, inflater: zlib._Decompress, limit: int | None = None) -> int:
    """Inflate the rest of the stream a chunk at a time, keeping nothing: how many bytes it held.

    truncated when the file ends inside the stream; too_large past `limit`.
    """
    total = 0
    while piece := _inflate(stream, inflater, INFLATE_CHUNK):
        total += len(piece)
        if limit is not None and total > limit:
            raise ItemFailed("too_large", f"the data set inflates to more than {limit} bytes")
    if not inflater.eof:
        raise ItemFailed("truncated", "the file ends inside its deflated data set")
    return total


def check_inflated_size(stream: BinaryIO, limit: int) -> None:
    """Before a whole deflated instance is read: too_large if its data set inflates past `limit`
    (measured a chunk at a time, holding nothing), truncated if its stream ends early. Other files
    cost a walk of their header."""
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    try:
        pydicom.dcmread(_Budget(stream, size), stop_before_pixels=True, specific_tags=[0x00080005])
        return
    except _Deflated as deflated:
        stream.seek(deflated.data_set_start)
    _inflate_rest(stream, zlib.decompressobj(-zlib.MAX_WBITS), limit)


def _too_large_inflated() -> ItemFailed:
    return ItemFailed("too_large", f"the header inflates to more than {MAX_HEADER_BYTES} bytes")


def data_set_digest(stream: BinaryIO) -> str:
    """SHA-256 of a Part 10 file's data set, the preamble and file meta group (which servers may
    rewrite) left out; read in chunks, so any size costs a buffer."""
    stream.seek(data_set_start(stream))
    digest = hashlib.sha256()
    while chunk := stream.read(INFLATE_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


class DataSetDigester:
    """data_set_digest of a Part 10 file fed in pieces as it arrives, holding only its head (up to
    the end of the file meta group), which also names the instance (MediaStorageSOPInstanceUID)."""

    def __init__(self) -> None:
        self.head: bytearray | None = bytearray()
        self.digest = hashlib.sha256()
        self.sop: str | None = None

    def update(self, data: bytes) -> None:
        if self.head is None:
            self.digest.update(data)
            return
        self.head += data
        found = _file_meta(self.head)
        if found is not None:
            start, self.sop = found
            self.digest.update(self.head[start:])
            self.head = None
        elif len(self.head) > MAX_META_BYTES:  # no file meta group is that large: no name
            self.head = None

    def result(self) -> tuple[str | None, str]:
        """(MediaStorageSOPInstanceUID or None, the digest) once the whole file was fed."""
        if self.head is not None:  # a file that ends within its first bytes or its meta group
            stream = io.BytesIO(bytes(self.head))
            return None, data_set_digest(stream)
        return self.sop, self.digest.hexdigest()


def _file_meta(head: bytes | bytearray) -> tuple[int, str | None] | None:
    """Where the data set starts in a Part 10 file beginning with `head`, as data_set_start finds
    it, and its MediaStorageSOPInstanceUID; None if that needs more bytes."""
    if len(head) < 132:
        return None
    if head[128:132] != b"DICM":
        return 0, None
    position, sop = 132, None
    while True:
        if len(head) < position + 8:
            return None
        if head[position : position + 2] != b"\x02\x00":
            return position, sop
        if bytes(head[position + 4 : position + 6]) in LONG_LENGTH_VRS:
            if len(head) < position + 12:
                return None
            start = position + 12
            end = start + struct.unpack("<L", head[position + 8 : position + 12])[0]
        else:
            start = position + 8
            end = start + struct.unpack("<H", head[position + 6 : position + 8])[0]
        if head[position + 2 : position + 4] == b"\x03\x00":  # (0002,0003)
            if len(head) < end:
                return None
            sop = bytes(head[start:end]).decode("latin-1").rstrip("\x00 ") or None
        position = end


def data_set_start(stream: BinaryIO) -> int:
    """The offset where a Part 10 file's data set begins: after the preamble, `DICM` and the file
    meta group's elements (explicit VR little endian, whatever the data set's syntax); 0 for a
    file without them."""
    stream.seek(128)
    if stream.read(4) != b"DICM":
        return 0
    position = 132
    while True:
        stream.seek(position)
        head = stream.read(12)
        if len(head) < 8 or head[:2] != b"\x02\x00":
            return position
        if head[4:6] in LONG_LENGTH_VRS:
            position += 12 + struct.unpack("<L", head[8:12])[0]
        else:
            position += 8 + struct.unpack("<H", head[6:8])[0]


def _uid(dataset: Dataset, keyword: str) -> str:
    """A UID as the file holds it: only trailing padding is dropped (a leading space is invalid)."""
    element = dataset.get_item(keyword)
    if element is None:
        raise ItemFailed("missing_uid", f"{keyword} is missing")
    value = element.value
    if isinstance(element, RawDataElement):
        if value is None and element.length:
            raise ItemFailed("invalid_uid", f"{keyword} is {element.length} bytes long")
        value = (value or b"").decode("latin-1").rstrip("\x00 ")
    if value is None or value == "":
        raise ItemFailed("missing_uid", f"{keyword} is empty")
    if not isinstance(value, str) or not valid_uid(value):
        raise ItemFailed("invalid_uid", f"{keyword} {repr(str(value))[:80]} is not 1-64 digits and dots")
    return str(value)  # a plain str: pydicom's UID cannot be a Beam key


def _check_complete(stream: BinaryIO, size: int, dataset: Dataset) -> None:
    if len(dataset) == 0:
        raise ItemFailed("truncated", "the file ends before its data set begins")
    position = stream.tell()
    if position < size:  # stopped at Pixel Data: walk the remaining element headers
        implicit, little = dataset.original_encoding
        _walk_to_end(stream, size, bool(implicit), little is not False)
        return
    last = dataset._dict[list(dataset._dict)[-1]]  # keyed by tag; the last read is the highest
    if isinstance(last, RawDataElement) and last.length != UNDEFINED:
        end = last.value_tell + last.length
        if end != size:
            raise ItemFailed("truncated", f"element {last.tag} needs {end} bytes but the file has {size}")
    elif not _ends_with_delimiter(stream, size, dataset.original_encoding[1] is not False):
        raise ItemFailed("truncated", f"sequence {last.tag} has no end before the end of the file")


def _ends_with_delimiter(stream: BinaryIO, size: int, little: bool) -> bool:
    stream.seek(size - 8)
    return stream.read(8) == struct.pack("<HHL" if little else ">HHL", 0xFFFE, 0xE0DD, 0)


def _walk_to_end(stream: BinaryIO, size: int, implicit: bool, little: bool) -> None:
    """Follow element headers from the current position; each value must fit in the file."""
    endian = "<" if little else ">"
    position = stream.tell()
    while position < size:
        tag, length, header = _element_header(stream, position, implicit, endian)
        position += header
        if length == UNDEFINED:
            position = _skip_items(stream, position, size, endian, tag)
            continue
        if position + length > size:
            raise ItemFailed(
                "truncated",
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes at offset "
                f"{position} but the file has {size}",
            )
        position += length


def _element_header(stream: BinaryIO, position: int, implicit: bool, endian: str) -> tuple[int, int, int]:
    stream.seek(position)
    head = stream.read(8)
    if len(head) < 8:
        raise ItemFailed("truncated", f"the file ends inside an element header at {position}")
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | element
    if implicit or tag >> 16 == 0xFFFE:
        return tag, struct.unpack(endian + "L", head[4:])[0], 8
    if head[4:6] in LONG_LENGTH_VRS:
        extra = stream.read(4)
        if len(extra) < 4:
            raise ItemFailed("truncated", f"the file ends inside an element header at {position}")
        return tag, struct.unpack(endian + "L", extra)[0], 12
    return tag, struct.unpack(endian + "H", head[6:])[0], 8


def _skip_items(stream: BinaryIO, position: int, size: int, endian: str, tag: int) -> int:
    """Skip an undefined-length value (encapsulated frames): items up to the sequence delimiter."""
    if _ends_with_delimiter(stream, size, endian == "<"):  # usual: nothing follows the frames
        return size
    while position < size:
        item, length, _ = _element_header(stream, position, True, endian)
        position += 8
        if item == SEQUENCE_END:
            return position
        if item != ITEM or length == UNDEFINED or position + length > size:
            break
        position += length
    raise ItemFailed(
        "truncated",
        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no end before the end of the file",
    )
