"""Lossy compression for export: frames encoded in JPEG Baseline or JPEG 2000 (lossy), and the
compression recorded in the data set as PS3.3 asks (a lossy copy is a new instance)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import as_pixel_options, get_encoder
from pydicom.uid import JPEG2000, UID, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, generate_uid

# lossy targets, with the method PS3.3 C.7.6.1.1.5 records in LossyImageCompressionMethod
LOSSY_SYNTAXES: dict[str, str] = {JPEGBaseline8Bit: "jpeg-baseline", JPEG2000: "jpeg-2000"}


LOSSY_METHODS = {JPEGBaseline8Bit: "ISO_10918_1", JPEG2000: "ISO_15444_1"}


LOSSY_SOURCES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}  # never lossless


DEFAULT_QUALITY = 90  # JPEG: the IJG quality scale; JPEG 2000: compression ratio 101 - quality


JPEG_BASELINE_INPUT = ("MONOCHROME1", "MONOCHROME2", "RGB")


MAX_DESCRIPTION = 1024  # DerivationDescription is an ST


def encode_lossy(ds: Dataset, target: UID, arrays: Iterator[np.ndarray], quality: int) -> Iterator[bytes]:
    """Each frame encoded in the lossy `target`, the data set's pixel attributes updated to match.

    JPEG Baseline (Pillow's libjpeg): 8-bit unsigned grey, or RGB stored as YBR_FULL_422 (chroma
    halved horizontally, as PS3.5 8.2.1 expects of it). JPEG 2000 (pydicom's OpenJPEG encoder):
    any depth up to 38 bits, compression ratio 101 - quality, colour through the irreversible
    component transform (YBR_ICT).
    """
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        raise ValueError("palette colour indices cannot be lossy compressed")
    if target == JPEGBaseline8Bit:
        if ds.BitsAllocated != 8 or ds.PixelRepresentation != 0 or photometric not in JPEG_BASELINE_INPUT:
            signed = "signed" if ds.PixelRepresentation else "unsigned"
            raise ValueError(
                f"JPEG Baseline encodes 8-bit unsigned grey or RGB pixels, not {ds.BitsAllocated}-bit "
                f"{signed} {photometric}"
            )
        ds.BitsStored, ds.HighBit = 8, 7  # the decoded values may use every bit
        if photometric == "RGB":
            ds.PhotometricInterpretation = "YBR_FULL_422"
        for arr in arrays:
            out = io.BytesIO()
            Image.fromarray(arr).save(out, format="JPEG", quality=quality, subsampling="4:2:2")
            yield out.getvalue()
        return
    options = as_pixel_options(ds, number_of_frames=1)
    if photometric == "RGB":  # pydicom's encoder applies the transform only when told the result's
        options["photometric_interpretation"] = ds.PhotometricInterpretation = "YBR_ICT"
    encoder = get_encoder(target)
    for arr in arrays:
        yield encoder.encode(arr, validate=True, j2k_cr=[101 - quality], **options)


def mark_lossy(ds: Dataset, source: UID, target: UID, quality: int, ratio: float) -> None:
    """The lossy compression recorded as PS3.3 asks: Lossy Image Compression "01" with its ratio
    and method appended to any earlier ones (C.7.6.1.1.5), and a new instance (the image is no
    longer the one the SOP Instance UID names): a new UID derived from the source's UID, the
    syntax and the quality (the same export writes the same UID), Image Type DERIVED, the source
    in Source Image Sequence, and the derivation described and coded (CID 7202, 7203)."""
    was_lossy = ds.get("LossyImageCompression") == "01" or source in LOSSY_SOURCES
    ds.LossyImageCompression = "01"
    _append(ds, "LossyImageCompressionRatio", f"{ratio:.2f}")
    _append(ds, "LossyImageCompressionMethod", LOSSY_METHODS[target])
    previous = str(ds.SOPInstanceUID)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[previous, target, str(quality)]
    )
    if ds.get("ImageType"):
        ds.ImageType = ["DERIVED", *list(_values(ds, "ImageType"))[1:]]
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = previous
    purpose = ("121330", "Lossy compressed") if was_lossy else ("121320", "Uncompressed")
    reference.PurposeOfReferenceCodeSequence = [_code(purpose[0], f"{purpose[1]} predecessor")]
    ds.SourceImageSequence = [*(ds.get("SourceImageSequence") or []), reference]
    derivation = _code("113040", "Lossy Compression")
    ds.DerivationCodeSequence = [*(ds.get("DerivationCodeSequence") or []), derivation]
    text = f"Lossy compression: {target.name}, quality {quality}, ratio {ratio:.2f}:1"
    earlier = str(ds.get("DerivationDescription") or "")
    ds.DerivationDescription = (f"{earlier}; {text}" if earlier else text)[-MAX_DESCRIPTION:]


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _values(ds: Dataset, keyword: str) -> list[Any]:
    """An attribute's values as a list, whatever its multiplicity: none when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _append(ds: Dataset, keyword: str, value: str) -> None:
    setattr(ds, keyword, [*_values(ds, keyword), value])
