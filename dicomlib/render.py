"""Rendering for export as jpeg or png: each frame as a viewer would first show it, in 8 bits."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
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
)

from dicomlib.convert import _cannot, _frame_view, _pixel_syntax, _quiet

# png at zlib's fastest level: 6x faster than Pillow's default on corpus radiographs, ~15% larger
IMAGE_FORMATS: dict[str, dict[str, Any]] = {
    "jpeg": {"format": "JPEG", "quality": 90},
    "png": {"format": "PNG", "compress_level": 1},
}


def render(ds: Dataset, image_format: str) -> Iterator[bytes]:
    """One 8-bit jpeg or png per frame, grey or RGB, as a viewer would first show it.

    Grey: Modality LUT or rescale, then the first VOI LUT or window (else the frame's range) mapped
    to 0-255, MONOCHROME1 inverted. Colour: RGB (YBR converted), palette through its LUT, scaled to
    8 bits, then to sRGB through the ICC profile if there is one.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {image_format!r}")
    action = f"render as {image_format} from {_pixel_syntax(ds).name}"
    with _quiet(), _cannot(action):
        arrays, transform = iter_pixels(ds), _icc_transform(ds)
    for index in itertools.count():
        with _quiet(), _cannot(action):
            arr = next(arrays, None)
            if arr is None:
                return
            pixels = eight_bit(arr, _frame_view(ds, index))
            if transform is not None and pixels.ndim == 3:
                pixels = apply_icc_profile(pixels, transform=transform)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, **IMAGE_FORMATS[image_format])
        yield out.getvalue()


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


def eight_bit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
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
