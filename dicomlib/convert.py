"""Convert one stored instance for export, writing its output piece by piece.

Three conversions, one per export file type: `transcode` (dicom with --transfer_syntax, lossless
or lossy: lossy.py), `frames` (octet-stream) and `render` (jpeg, png: render.py). The instance is
read once with `read_instance` (its pixels held as stored: compressed, or native); frames are then
decoded, converted and handed on one at a time, so converting a file of size S holds about S plus one frame,
never the whole decoded volume (a lossy transcode also holds its compressed output).
Whatever pydicom, a codec plugin or a native codec raises (a Rust codec's panic included) becomes
ItemFailed("cannot_convert") naming the source transfer syntax, so one odd instance is a dead letter
rather than a failed run; an instance without pixels is "no_pixel_data".
"""

from __future__ import annotations

import io
import itertools
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import (
    as_pixel_options,
    get_decoder,
    get_encoder,
    iter_pixels,
    pack_bits,
)
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomlib.failures import ItemFailed, describe, item_failure
from dicomlib.header import check_header, check_inflated_size
from dicomlib.lossy import DEFAULT_QUALITY, LOSSY_SYNTAXES, encode_lossy, mark_lossy

FILE_TYPES = {"dicom": "dcm", "octet-stream": "bin", "jpeg": "jpg", "png": "png"}
# the MIME type of each file type, as the Healthcare API's export and DICOMweb name them
MIME_TYPES = {
    "application/dicom": "dicom",
    "application/octet-stream": "octet-stream",
    "image/jpeg": "jpeg",
    "image/png": "png",
}
KEEP_SYNTAX = "*"  # as DICOMweb's transfer-syntax=*: each instance as stored, not transcoded
TRANSFER_SYNTAXES: dict[str, str] = {
    ExplicitVRLittleEndian: "explicit-vr-little-endian",
    ImplicitVRLittleEndian: "implicit-vr-little-endian",
    DeflatedExplicitVRLittleEndian: "deflated-explicit-vr-little-endian",
    RLELossless: "rle-lossless",
    JPEGLSLossless: "jpeg-ls-lossless",
    JPEG2000Lossless: "jpeg-2000-lossless",
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_DATA = 0x7FE00010
WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}  # values byte-swapped between endiannesses
MAX_INFLATED = 128 * 1024 * 1024  # a deflated instance inflating to more is too_large to convert
ITEM, SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def read_instance(source: BinaryIO) -> Dataset:
    """The whole instance, pixels as stored, for conversion, from a seekable binary file.

    Its header is checked first, within header.py's bounds, so that a file that is not whole,
    well-formed DICOM fails with the reason an import gives it (truncated, malformed, too_large...)
    before pydicom reads all of it. A deflated data set is measured in bounded steps too (pydicom
    inflates it at once): past MAX_INFLATED it is too_large, so a small deflate bomb cannot take the
    worker's memory.
    """
    size = source.seek(0, io.SEEK_END)
    source.seek(0)
    check_header(source, size)
    source.seek(0)
    with _quiet(), _cannot("read the file"):
        check_inflated_size(source, MAX_INFLATED)
        source.seek(0)
        return pydicom.dcmread(source)


def frame_count(ds: Dataset) -> int:
    """How many frames the instance holds (its files are named after the count)."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def transcode(ds: Dataset, transfer_syntax: str, out: BinaryIO, quality: int = DEFAULT_QUALITY) -> str | None:
    """`ds` written to `out` in `transfer_syntax`; the new SOP Instance UID when lossy compression
    made a new instance, None when the instance keeps its UID.

    Without Pixel Data (SR, RT plan...) the data set is only re-encoded (compressed syntaxes encode
    it as explicit VR little endian); native little endian pixels between native syntaxes are
    copied as they are. Otherwise frames are decoded one at a time, as pydicom decodes them (YBR
    as RGB for compressed sources, Photometric Interpretation updated to match), and written native
    or encoded frame by frame. A lossless target keeps the SOP Instance UID: a lossy source's
    decoded pixels are stored losslessly, nothing further is lost. A lossy target makes a new
    instance (see lossy.mark_lossy), its frames encoded at `quality` and held, compressed, until the
    ratio written before them is known. The caller copies an instance already in
    `transfer_syntax` unchanged.
    """
    target = UID(transfer_syntax)
    lossy = target in LOSSY_SYNTAXES
    if target not in TRANSFER_SYNTAXES and not lossy:  # the export pipeline checks the flag first
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
    source = _source_syntax(ds)
    with _quiet(), _cannot(f"transcode from {source.name} to {target.name}"):
        ds.file_meta.TransferSyntaxUID = source  # when guessed: the decoders read it
        native_copy = not source.is_compressed and source.is_little_endian and not target.is_compressed
        if "PixelData" not in ds or native_copy:
            if target.is_compressed and _has_pixels(ds):
                raise ValueError("float pixel data has no encoder")
            _resolve(ds, swap=not source.is_little_endian)
            ds.file_meta.TransferSyntaxUID = target
            pydicom.dcmwrite(out, ds)  # in the meta's syntax; save_as() refuses a big endian source
            return None
        # a lossy encoder is given RGB, whatever colour space a native source is in
        raw = not source.is_compressed and not lossy
        decoded = get_decoder(source).iter_array(ds, validate=True, raw=raw, **as_pixel_options(ds))
        first, image_pixel = next(decoded)
        ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]  # as decompress()
        if int(image_pixel["samples_per_pixel"]) > 1:
            ds.PlanarConfiguration = 0
        arrays = itertools.chain([first], (arr for arr, _ in decoded))
        _resolve(ds, swap=not source.is_little_endian)
        ds.file_meta.TransferSyntaxUID = target
        if lossy:
            uncompressed = frame_count(ds) * first.nbytes
            encoded = list(encode_lossy(ds, target, arrays, quality))
            mark_lossy(ds, source, target, quality, uncompressed / max(sum(map(len, encoded)), 1))
            _write_streamed(ds, target, out, _encapsulated(encoded))
            return str(ds.SOPInstanceUID)
        _write_streamed(ds, target, out, _pixel_value(ds, target, arrays, first))
        return None


def frames(ds: Dataset) -> Iterator[bytes]:
    """Each frame's pixels as DICOMweb's application/octet-stream frames: native little endian.

    Decoded as pydicom decodes them: samples interleaved (planar configuration 0), YBR as RGB (what
    JPEG decoders mostly give anyway), palette colour as indices, signed values sign-extended.
    BitsAllocated 1 frames are packed bits as DICOM stores them, ceil(rows * columns / 8) bytes.
    """
    action = f"decode from {_pixel_syntax(ds).name}"
    single_bit = ds.get("BitsAllocated") == 1
    with _quiet(), _cannot(action):
        arrays = iter_pixels(ds)
    while True:
        with _quiet(), _cannot(action):
            arr = next(arrays, None)
            if arr is None:
                return
            data = pack_bits(arr) if single_bit else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        yield data


def _pixel_syntax(ds: Dataset) -> UID:
    """The source syntax of an instance whose pixels are wanted; no_pixel_data if it has none."""
    if not _has_pixels(ds):
        raise ItemFailed("no_pixel_data", "the instance has no Pixel Data")
    ds.file_meta.TransferSyntaxUID = _source_syntax(ds)  # the decoders need it, even when guessed
    return ds.file_meta.TransferSyntaxUID


def _pixel_value(
    ds: Dataset, target: UID, arrays: Iterator[np.ndarray], first: np.ndarray
) -> Iterator[bytes]:
    """The Pixel Data element of `target`, header included, in pieces: native cells with their
    length known from the first frame, or one encoded fragment per frame."""
    implicit = target.is_implicit_VR
    if target.is_compressed:
        options = as_pixel_options(ds, number_of_frames=1)
        encoder = get_encoder(target)
        yield from _encapsulated(encoder.encode(arr, validate=True, **options) for arr in arrays)
        return
    vr = "OB" if ds.BitsAllocated <= 8 else "OW"
    if ds.BitsAllocated == 1:  # bits packed across frame boundaries: small enough to pack at once
        cells = pack_bits(np.stack(list(arrays)))
        yield _element_header(PIXEL_DATA, vr, len(cells) + len(cells) % 2, implicit) + cells
        yield b"\0" * (len(cells) % 2)
        return
    length = frame_count(ds) * first.nbytes
    if length >= 0xFFFFFFFF:
        raise ValueError(f"{length} bytes of native pixels do not fit one DICOM element")
    yield _element_header(PIXEL_DATA, vr, length + length % 2, implicit)
    written = 0
    for arr in arrays:
        cells = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        written += len(cells)
        yield cells
    if written != length:
        raise ValueError(f"the frames hold {written} bytes, not the {length} their attributes give")
    yield b"\0" * (length % 2)


def _encapsulated(fragments: Iterable[bytes]) -> Iterator[bytes]:
    """An encapsulated Pixel Data element, one fragment per frame, with an empty offset table."""
    yield _element_header(PIXEL_DATA, "OB", 0xFFFFFFFF, False) + _item(b"")
    for fragment in fragments:
        yield _item(fragment)
    yield struct.pack("<HHL", *SEQUENCE_DELIMITER, 0)


def _element_header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length)
    return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)


def _item(data: bytes) -> bytes:
    padded = data + b"\0" * (len(data) % 2)
    return struct.pack("<HHL", *ITEM, len(padded)) + padded


def _write_streamed(ds: Dataset, target: UID, out: BinaryIO, pixels: Iterator[bytes]) -> None:
    """A Part 10 file as dcmwrite writes it, with Pixel Data written piece by piece; a deflated
    target's data set goes through one streaming compressor."""
    fp = DicomIO(out)
    fp.is_implicit_VR, fp.is_little_endian = target.is_implicit_VR, True
    fp.write(ds.preamble or b"\0" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
    deflater = _Deflater(out) if target == DeflatedExplicitVRLittleEndian else None
    body = fp if deflater is None else DicomIO(deflater)
    body.is_implicit_VR, body.is_little_endian = target.is_implicit_VR, True
    write_dataset(body, ds[:PIXEL_DATA], list(ds.original_character_set))
    for piece in pixels:
        body.write(piece)
    write_dataset(body, ds[PIXEL_DATA + 1 :], list(ds.original_character_set))
    if deflater is not None:
        deflater.finish()


class _Deflater(io.RawIOBase):
    """A write-only stream deflating into `out` (raw deflate, as PS3.5 A.5 asks), padded to even."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self.out = out
        self.compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        self.position = 0
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = self.compressor.compress(bytes(data))
        self.out.write(chunk)
        self.written += len(chunk)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def finish(self) -> None:
        rest = self.compressor.flush()
        self.written += len(rest)
        self.out.write(rest + b"\0" * (self.written % 2))


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns about every odd value it still reads; numpy about overflow in float maths."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _cannot(action: str) -> Iterator[None]:
    """Whatever pydicom, a plugin or a native codec raises, as cannot_convert (they raise many types,
    BaseExceptions among them); our own ItemFailed and interrupts pass through."""
    try:
        yield
    except BaseException as error:  # item_failure re-raises interrupts
        failed = item_failure(error, "cannot_convert")
        if failed is error:
            raise
        raise ItemFailed("cannot_convert", f"cannot {action}: {describe(error)}"[:500]) from error


def _has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def _source_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, or the encoding pydicom guessed when its meta names none."""
    if syntax := ds.file_meta.get("TransferSyntaxUID"):
        return UID(syntax)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _resolve(ds: Dataset, swap: bool) -> None:
    """Convert every raw element; with `swap` turn word-typed values from big to little endian.

    Converting looks up the VR of elements read as implicit VR: some files say explicit VR in their
    meta but are implicit VR, and dcmwrite cannot write an element without a VR as explicit VR.
    """
    for element in ds.iterall():
        size = WORD_SIZES.get(element.VR) if swap and element.tag != PIXEL_DATA else None
        if size and isinstance(element.value, bytes):
            element.value = np.frombuffer(element.value, f">u{size}").astype(f"<u{size}").tobytes()


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The data set as one frame sees it: enhanced objects can rescale and window per frame."""
    groups = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups += [per_frame[index]] if index < len(per_frame) else []
    names = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
    items = [group[name][0] for group in groups for name in names if group.get(name)]
    if not items:
        return ds
    view = ds.copy()
    for item in items:
        view.update(item)
    return view
