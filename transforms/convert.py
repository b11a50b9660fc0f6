"""Convert one stored instance for export: bytes in, bytes out, through pydicom's own pixel API.

Three conversions, one per export file type: `transcode` (dicom with --transfer_syntax), `frames`
(octet-stream) and `render` (jpeg, png). Whatever pydicom or its plugins cannot decode or encode
becomes ConversionError("cannot_convert") naming the source transfer syntax, so one odd instance is
a dead letter rather than a failed bundle; an instance without pixels is "no_pixel_data".
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pydicom
from PIL import Image, ImageCms
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_icc_profile,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    create_icc_transform,
    iter_pixels,
    pack_bits,
    pixel_array,
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

TRANSFER_SYNTAXES: dict[str, str] = {
    ExplicitVRLittleEndian: "explicit-vr-little-endian",
    ImplicitVRLittleEndian: "implicit-vr-little-endian",
    DeflatedExplicitVRLittleEndian: "deflated-explicit-vr-little-endian",
    RLELossless: "rle-lossless",
    JPEGLSLossless: "jpeg-ls-lossless",
    JPEG2000Lossless: "jpeg-2000-lossless",
}
# png at zlib's fastest level: 6x faster than Pillow's default on corpus radiographs, ~15% larger
IMAGE_FORMATS = {"jpeg": {"format": "JPEG", "quality": 90}, "png": {"format": "PNG", "compress_level": 1}}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_DATA = 0x7FE00010
WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}  # values byte-swapped between endiannesses


class ConversionError(Exception):
    """An instance that cannot be converted; `reason` becomes the dead letter's reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def transcode(data: bytes, transfer_syntax: str) -> bytes:
    """`data` re-encoded losslessly in `transfer_syntax`, keeping its SOP Instance UID.

    Already in that syntax: `data` unchanged. Without Pixel Data (SR, RT plan...) the data set is
    only re-encoded (compressed syntaxes encode it as explicit VR little endian). A lossy source is
    decoded and its decoded pixels stored losslessly: nothing further is lost. Compressed sources
    are decoded as pydicom decodes them, YBR as RGB (Photometric Interpretation updated to match).
    """
    target = UID(transfer_syntax)
    if target not in TRANSFER_SYNTAXES:  # the export pipeline checks the flag before it starts
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
    with _quiet():
        ds = _read(data)
        if ds.file_meta.get("TransferSyntaxUID") == target:
            return data
        source = _source_syntax(ds)
        with _cannot(source, f"transcode to {target.name}"):
            ds.file_meta.TransferSyntaxUID = source  # when guessed: decompress() and compress() read it
            pixels = "PixelData" in ds
            if pixels and source.is_compressed:
                ds.decompress(generate_instance_uid=False)
            elif pixels and (not source.is_little_endian or (target.is_compressed and _as_planes(ds))):
                _store_decoded(ds)
            _resolve(ds, swap=not source.is_little_endian)
            if target.is_compressed and _has_pixels(ds):
                ds.compress(target, generate_instance_uid=False)
            ds.file_meta.TransferSyntaxUID = target
            out = io.BytesIO()
            pydicom.dcmwrite(out, ds)  # in the meta's syntax; save_as() refuses a big endian source
            return out.getvalue()


def frames(data: bytes) -> list[bytes]:
    """Each frame's pixels as DICOMweb's application/octet-stream frames: native little endian.

    Decoded as pydicom decodes them: samples interleaved (planar configuration 0), YBR as RGB (what
    JPEG decoders mostly give anyway), palette colour as indices, signed values sign-extended.
    BitsAllocated 1 frames are packed bits as DICOM stores them, ceil(rows * columns / 8) bytes.
    """
    with _quiet():
        ds = _pixel_dataset(data)
        with _cannot(_source_syntax(ds), "decode"):
            single_bit = ds.get("BitsAllocated") == 1
            return [
                pack_bits(arr) if single_bit else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
                for arr in iter_pixels(ds)
            ]


def render(data: bytes, image_format: str) -> list[bytes]:
    """One 8-bit jpeg or png per frame, grey or RGB, as a viewer would first show it.

    Grey: Modality LUT or rescale, then the first VOI LUT or window (else the frame's range) mapped
    to 0-255, MONOCHROME1 inverted. Colour: RGB (YBR converted), palette through its LUT, scaled to
    8 bits, then to sRGB through the ICC profile if there is one. Frames are decoded one at a time
    so a long multi-frame never sits whole in memory.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {image_format!r}")
    with _quiet():
        ds = _pixel_dataset(data)
        with _cannot(_source_syntax(ds), f"render as {image_format}"):
            images, transform = [], _icc_transform(ds)
            for index, arr in enumerate(iter_pixels(ds)):
                pixels = _eight_bit(arr, _frame_view(ds, index))
                if transform is not None and pixels.ndim == 3:
                    pixels = apply_icc_profile(pixels, transform=transform)
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, **IMAGE_FORMATS[image_format])
                images.append(out.getvalue())
            return images


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns about every odd value it still reads; numpy about overflow in float maths."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _cannot(source: UID, action: str) -> Iterator[None]:
    """Any failure of pydicom or a plugin (they raise many types) as cannot_convert."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())  # pydicom's messages span lines
        detail = f"cannot {action} from {source.name}: {type(error).__name__}: {message}"
        raise ConversionError("cannot_convert", detail[:400]) from error


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as error:
        raise ConversionError("cannot_convert", f"pydicom cannot read the file: {error}"[:300]) from error


def _pixel_dataset(data: bytes) -> Dataset:
    ds = _read(data)
    if not _has_pixels(ds):
        raise ConversionError("no_pixel_data", "the instance has no Pixel Data")
    ds.file_meta.TransferSyntaxUID = _source_syntax(ds)  # the decoders need it, even when guessed
    return ds


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


def _as_planes(ds: Dataset) -> bool:
    """Native colour stored plane by plane, or YBR_FULL_422 (one Cb and Cr per two pixels): what
    pydicom's encoders do not read right (planes) or at all (4:2:2), so they get decoded pixels."""
    return ds.get("PlanarConfiguration") == 1 or ds.get("PhotometricInterpretation") == "YBR_FULL_422"


def _store_decoded(ds: Dataset) -> None:
    """Native Pixel Data replaced by its own decoding: little endian, pixel by pixel, 4:2:2 made full.

    For big endian sources too: pydicom writes byte strings as read, and Pixel Data's word size
    depends on BitsAllocated (1-bit data is packed in 16-bit words), so it is decoded, not swapped.
    """
    arr = pixel_array(ds, raw=True)
    bits = ds.BitsAllocated
    cells = pack_bits(arr) if bits == 1 else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        ds.PhotometricInterpretation = "YBR_FULL"
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0
    ds.PixelData = cells + b"\0" * (len(cells) % 2)
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


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


def _icc_transform(ds: Dataset) -> ImageCms.ImageCmsTransform | None:
    """The ICC profile's transform to sRGB: the data set's, or a slide's first optical path's.

    A profile Pillow cannot read is ignored, as most viewers do: the colours are still meaningful.
    """
    paths = [item for item in ds.get("OpticalPathSequence") or [] if "ICCProfile" in item]
    profile = ds.get("ICCProfile") or (paths[0].ICCProfile if paths else None)
    if not profile:
        return None
    try:
        return create_icc_transform(icc_profile=profile)
    except (OSError, ValueError, ImageCms.PyCMSError):
        return None


def _eight_bit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame as uint8 grey (rows, columns) or RGB (rows, columns, 3)."""
    photometric = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return _scale(arr, 0, np.iinfo(arr.dtype).max)
    if arr.ndim == 3:
        if arr.shape[2] != 3:
            raise ValueError(f"{arr.shape[2]} samples per pixel ({photometric}) cannot be shown")
        return _scale(arr, 0, 2 ** min(ds.get("BitsStored") or 8, arr.dtype.itemsize * 8) - 1)
    values, (low, high) = _voi(apply_modality_lut(arr, ds), ds)
    grey = _scale(values, low, high)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """The first VOI LUT or window applied, and its output range; else the values' own range.

    pydicom's VOI output is in the LUT's or the stored values' range, not yet for display: the range
    is that of the LUT's entries, or the window's output for two values far outside any window.
    """
    if (sequence := ds.get("VOILUTSequence")) and "LUTData" in sequence[0]:
        count, first = sequence[0].LUTDescriptor[0] or 2**16, sequence[0].LUTDescriptor[1]
        lut = apply_voi(np.arange(first, first + count), ds)
        return apply_voi(values, ds), (float(lut.min()), float(lut.max()))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            low, high = apply_windowing(np.array([-1e300, 1e300]), ds)
            return apply_windowing(values, ds), (float(low), float(high))
        except (ValueError, TypeError, IndexError):  # a zero width or an odd value: show the range
            pass
    finite = values[np.isfinite(values)]
    return values, ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0))


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0-255; a flat range is black."""
    if high == low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.nan_to_num(values.astype(np.float64)) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
