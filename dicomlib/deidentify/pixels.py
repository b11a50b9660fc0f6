"""Burnt-in text: OCR each frame with Debian's tesseract-ocr, black out the text boxes to redact, write
the pixels back losslessly, and describe what was done for the Provenance (`https://g.co/dicom-images`).

- OCR: `tesseract stdin stdout --psm 11 tsv` on each frame rendered to 8 bits as a viewer would first
  show it (convert.py's rendering; colour as each pixel's brightest sample), upscaled when small;
  frames that are byte-identical are OCR'd once.
- Boxes: the words of one OCR line; REDACT_ALL_TEXT redacts every line (infoType TEXT, the OCR's
  confidence), the sensitive modes only the words of each finding of the sensitive-text detector
  (text.py) with the patient's own values as terms (the finding's infoType and confidence).
- Redaction: each box, padded by PADDING pixels and clipped to the frame, is filled with the frame's
  minimum value (per sample for colour).
- Write-back: losslessly in the source transfer syntax when it is lossless and pydicom can encode it
  (uncompressed, RLE Lossless, JPEG-LS lossless, JPEG 2000 lossless); otherwise (a lossy source such
  as JPEG Baseline, or big endian) uncompressed Explicit VR Little Endian, as re-encoding lossy would
  lose more. BurnedInAnnotation is set to NO.

No Beam and no data I/O; the OCR engine is a child process fed and read through pipes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomlib.convert import _frame_view, _quiet, _source_syntax, transcode
from dicomlib.deidentify import text
from dicomlib.failures import RunFailed
from dicomlib.render import eight_bit

REDACT_NO_TEXT, REDACT_ALL_TEXT, REDACT_SENSITIVE_TEXT, CLEAN_DESCRIPTORS = (
    "REDACT_NO_TEXT",
    "REDACT_ALL_TEXT",
    "REDACT_SENSITIVE_TEXT",
    "REDACT_SENSITIVE_TEXT_CLEAN_DESCRIPTORS",
)
ALL_TEXT = "TEXT"  # the infoType of a box under REDACT_ALL_TEXT
PADDING = 3  # pixels around each box, so that anti-aliased glyph edges go too
OCR_MIN_SIDE = 400  # frames smaller than this are upscaled (by an integer factor, at most 4) for OCR
OCR_TIMEOUT = 300  # seconds for one frame
# Syntaxes the pixels are written back in unchanged; every other one becomes Explicit VR Little Endian.
LOSSLESS_ENCODABLE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
)


class OcrUnavailable(RunFailed):
    """The tesseract command is not installed (Debian: apt-get install tesseract-ocr): every instance
    would fail alike, so the run ends."""


@dataclass(frozen=True)
class Word:
    """One word the OCR read, in the OCR image's pixels; `line` identifies its line."""

    left: int
    top: int
    width: int
    height: int
    confidence: float  # 0..1
    text: str
    line: tuple[int, int, int]  # block, paragraph, line


@dataclass(frozen=True)
class ImageFinding:
    """One redacted box of one frame: the Provenance's dicom-images entry."""

    frame: int
    left: int
    top: int
    right: int
    bottom: int
    width: int  # the frame's, for the relative values
    height: int
    quote: str
    info_type: str
    confidence: float


@functools.cache
def _tesseract() -> str:
    found = shutil.which("tesseract")
    if found is None:
        raise OcrUnavailable("tesseract is not installed (Debian: apt-get install tesseract-ocr)")
    return found


def ocr_words(image: np.ndarray) -> list[Word]:
    """The words tesseract reads in an 8-bit grey (rows, columns) or RGB (rows, columns, 3) image, via
    its TSV output (level 5 rows: left, top, width, height, conf, text); empty words left out."""
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG", compress_level=1)
    done = subprocess.run(
        [_tesseract(), "stdin", "stdout", "--psm", "11", "tsv"],
        input=png.getvalue(),
        capture_output=True,
        timeout=OCR_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tesseract failed: {done.stderr.decode(errors='replace')[-300:]}")
    words = []
    for row in done.stdout.decode("utf-8", errors="replace").splitlines()[1:]:
        cells = row.split("\t")
        if len(cells) < 12 or cells[0] != "5" or not cells[11].strip():
            continue
        block, paragraph, line = (int(cells[i]) for i in (2, 3, 4))
        left, top, width, height = (int(cells[i]) for i in (6, 7, 8, 9))
        confidence = max(float(cells[10]), 0.0) / 100.0
        words.append(Word(left, top, width, height, confidence, cells[11].strip(), (block, paragraph, line)))
    return words


def frame_words(frame: np.ndarray) -> list[Word]:
    """OCR of one 8-bit frame, upscaled when small; boxes in the frame's own pixels. Colour is read as
    the brightest sample of each pixel: coloured annotations (yellow, green) stand out as white."""
    rows, columns = frame.shape[:2]
    if frame.ndim == 3:
        frame = frame.max(axis=2)
    scale = max(1, min(4, -(-OCR_MIN_SIDE // max(min(rows, columns), 1))))
    image = frame
    if scale > 1:
        image = np.asarray(
            Image.fromarray(frame).resize((columns * scale, rows * scale), Image.Resampling.LANCZOS)
        )
    words = ocr_words(image)
    if scale == 1:
        return words
    out = []
    for word in words:
        left, top = word.left // scale, word.top // scale
        right = -(-(word.left + word.width) // scale)
        bottom = -(-(word.top + word.height) // scale)
        out.append(Word(left, top, right - left, bottom - top, word.confidence, word.text, word.line))
    return out


def boxes(
    words: list[Word], mode: str, terms: list[text.Term], frame: int, width: int, height: int
) -> list[ImageFinding]:
    """The boxes to redact among one frame's words: every line (REDACT_ALL_TEXT) or each finding's
    words (the sensitive modes; a line in capitals is also read title-cased, so that the name lists
    apply to "JOHN SMITH")."""
    lines: dict[tuple[int, int, int], list[Word]] = {}
    for word in words:
        lines.setdefault(word.line, []).append(word)
    out = []
    for line_words in lines.values():
        if mode == REDACT_ALL_TEXT:
            quote = " ".join(word.text for word in line_words)
            confidence = min(word.confidence for word in line_words)
            out.append(_box(line_words, frame, width, height, quote, ALL_TEXT, confidence))
            continue
        line, starts = "", []
        for word in line_words:
            line += " " if line else ""
            starts.append(len(line.encode()))
            line += word.text
        found = text.find(line, terms)
        if line.upper() == line and line.lower() != line:
            found += text.find(line.title(), terms)
        taken: set[int] = set()
        for finding in sorted(found, key=lambda f: (-(f.end - f.start), -f.confidence)):
            chosen = [
                i
                for i, word in enumerate(line_words)
                if starts[i] < finding.end and starts[i] + len(word.text.encode()) > finding.start
            ]
            if not chosen or taken & set(chosen):
                continue
            taken |= set(chosen)
            quote = " ".join(line_words[i].text for i in chosen)
            picked = [line_words[i] for i in chosen]
            out.append(_box(picked, frame, width, height, quote, finding.info_type, finding.confidence))
    return out


def _box(
    words: list[Word], frame: int, width: int, height: int, quote: str, info_type: str, confidence: float
) -> ImageFinding:
    left = max(min(word.left for word in words) - PADDING, 0)
    top = max(min(word.top for word in words) - PADDING, 0)
    right = min(max(word.left + word.width for word in words) + PADDING, width)
    bottom = min(max(word.top + word.height for word in words) + PADDING, height)
    return ImageFinding(
        frame, left, top, right, bottom, width, height, quote, info_type, round(confidence, 3)
    )


def redact_pixels(ds: Dataset, mode: str, terms: list[text.Term]) -> tuple[Dataset, list[ImageFinding]]:
    """`ds` with the burnt-in text that `mode` asks for blacked out in every frame, written back as the
    module docstring says, and the boxes redacted. `ds` is changed (the caller passes its own copy);
    the data set returned may be a new one read back from the re-encoded file."""
    if mode == REDACT_NO_TEXT or "PixelData" not in ds:
        return ds, []
    if ds.get("BitsAllocated") == 1:
        raise ValueError("burnt-in text in 1-bit pixel data (overlays, masks) cannot be redacted")
    source = _source_syntax(ds)
    ds.file_meta.TransferSyntaxUID = source
    with _quiet():
        decoded = get_decoder(source).iter_array(
            ds, validate=True, raw=not source.is_compressed, **as_pixel_options(ds)
        )
        frames: list[np.ndarray] = []
        photometric = None
        for arr, image_pixel in decoded:
            frames.append(np.array(arr, copy=True))
            photometric = image_pixel["photometric_interpretation"]
    if photometric:
        ds.PhotometricInterpretation = photometric
    findings: list[ImageFinding] = []
    seen: dict[bytes, list[Word]] = {}
    for index, frame in enumerate(frames):
        digest = hashlib.sha256(frame.tobytes()).digest()
        if digest not in seen:
            with _quiet():
                seen[digest] = frame_words(eight_bit(frame, _frame_view(ds, index)))
        rows, columns = frame.shape[:2]
        found = boxes(seen[digest], mode, terms, index, columns, rows)
        fill = frame.min(axis=(0, 1)) if frame.ndim == 3 else frame.min()
        for box in found:
            frame[box.top : box.bottom, box.left : box.right] = fill
        findings += found
    return _write_back(ds, source, frames), findings


def _write_back(ds: Dataset, source: UID, frames: list[np.ndarray]) -> Dataset:
    """The frames as native little endian pixels, then encoded in the source syntax if it is lossless
    and encodable (convert.transcode, the export's lossless encoder), else Explicit VR Little Endian."""
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        ds.PlanarConfiguration = 0
    native = b"".join(frame.astype(frame.dtype.newbyteorder("<")).tobytes() for frame in frames)
    ds.PixelData = native + b"\0" * (len(native) % 2)
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    ds.BurnedInAnnotation = "NO"
    target = source if source in LOSSLESS_ENCODABLE else ExplicitVRLittleEndian
    if target == ExplicitVRLittleEndian or not target.is_compressed:
        ds.file_meta.TransferSyntaxUID = target
        return ds
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    transcode(ds, target, out)
    out.seek(0)
    return pydicom.dcmread(out)
