"""Secondary Capture (or VL Photographic) instances made from JPEG and PNG images and metadata,
without I/O.

A JPEG Baseline image is kept as it is, encapsulated (JPEG Baseline transfer syntax): no re-encoding,
so no second loss. A PNG is decoded and stored losslessly as native pixels (Explicit VR Little
Endian). Anything that cannot be kept as it is (progressive or 12-bit JPEG, CMYK, 16-bit PNG,
transparency) is refused with its reason rather than converted with a loss.

UIDs are derived, so that importing the same image again finds it `already_present`:
- SOP Instance UID: the metadata's, else from the image's bytes;
- Study Instance UID: the metadata's, else from PatientID with AccessionNumber, else with StudyID,
  else with the image's directory;
- Series Instance UID: the metadata's, else from the study's UID, the directory, Modality and
  SeriesNumber.
Each derived UID is `2.25.` and a name-based UUID (version 5) of its sources, as PS3.5 B.2 allows.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from typing import Any, NamedTuple

from PIL import Image
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pydicom.valuerep import validate_value

from dicomlib.failures import ItemFailed
from dicomlib.uids import InstanceRef, valid_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIDECAR_SUFFIX = ".json"
# set from the image or by the import: metadata that gives them is refused rather than overridden
FROM_IMAGE = frozenset(
    {
        "SOPClassUID",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "PixelData",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    }
)
TYPE_2 = (  # Patient, General Study, General Series, General Equipment, General Image: empty if not given
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "Laterality",  # 2C: required for a paired body part, which an image does not tell
    "Manufacturer",
    "PatientOrientation",
)
# --sop_class: the SOP Class UID, and the attributes each IOD needs that metadata may give instead
SOP_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "secondary_capture": (
        SECONDARY_CAPTURE,
        {"Modality": "OT", "ConversionType": "WSD", "ImageType": ["DERIVED", "SECONDARY"]},
    ),
    "vl_photographic": (  # Acquisition Context Sequence: Type 2
        VL_PHOTOGRAPHIC,
        {"Modality": "XC", "ImageType": ["ORIGINAL", "PRIMARY"], "AcquisitionContextSequence": []},
    ),
}
SOF_MARKERS = {  # JPEG start-of-frame markers (ITU T.81 Table B.1) and what they are
    0xC0: "Baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential sequential",
    0xC6: "differential progressive",
    0xC7: "differential lossless",
    0xC9: "arithmetic extended sequential",
    0xCA: "arithmetic progressive",
    0xCB: "arithmetic lossless",
    0xCD: "arithmetic differential sequential",
    0xCE: "arithmetic differential progressive",
    0xCF: "arithmetic differential lossless",
}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb threshold
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 65_535  # Rows and Columns are US


class MetadataError(ValueError):
    """Metadata JSON that is not a DICOM JSON object or keyword object, or holds a bad value."""


class Built(NamedTuple):
    """An instance made from an image: its Part 10 bytes and its UIDs."""

    data: bytes
    ref: InstanceRef


class Pixels(NamedTuple):
    """What the Image Pixel module says of an image, and its Pixel Data."""

    samples: int
    photometric: str
    rows: int
    columns: int
    pixel_data: bytes
    transfer_syntax: UID


def is_sidecar(uri: str) -> bool:
    """A metadata file beside an image (`photo.jpg.json`), matched by a pattern such as `dir/**`."""
    return uri.lower().endswith(SIDECAR_SUFFIX)


def sidecar_of(uri: str) -> str:
    """Where an image's own metadata file is: `photo.jpg` -> `photo.jpg.json`."""
    return uri + SIDECAR_SUFFIX


# --- metadata ---------------------------------------------------------------------------------


def parse_metadata(text: bytes | str, template: bool = False) -> Dataset:
    """A metadata file as a Dataset: a JSON object in the DICOM JSON model (PS3.18 F.2,
    `{"00100020": {"vr": "LO", "Value": ["123"]}}`) or by keyword (`{"PatientID": "123"}`), the two
    forms mixed freely. Every value is checked against its VR. A `template` (applied to every image)
    may not give a SOP Instance UID: every image would have the same."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise MetadataError(f"not JSON: {error}") from None
    ds = _dataset(obj, "")
    if template and "SOPInstanceUID" in ds:
        raise MetadataError("SOPInstanceUID would give every image the same UID (give it per image)")
    return ds


def _dataset(obj: Any, where: str) -> Dataset:
    if not isinstance(obj, dict):
        raise MetadataError(f"{where or 'the file'} is not a JSON object")
    ds = Dataset()
    for key, value in obj.items():
        if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
            tag = Tag(key)
            name = keyword_for_tag(tag) or key
            try:
                element = Dataset.from_json({key: value}, bulk_data_uri_handler=_no_bulk_data)[tag]
            except MetadataError:
                raise
            except Exception as error:  # pydicom's own errors for a malformed DICOM JSON element
                raise MetadataError(f"{where}{name}: {error}") from None
        else:
            number = tag_for_keyword(key)
            if number is None:
                raise MetadataError(f"{where}{key}: not a DICOM keyword (nor a tag like 00100020)")
            tag, name = Tag(number), key
            element = _keyword_element(tag, value, f"{where}{key}")
        if not where and (name in FROM_IMAGE or tag.group == 0x0002):  # the top level only
            raise MetadataError(f"{where}{name}: set from the image by the import, not by metadata")
        _check(element.VR, element.value, f"{where}{name}")
        if tag in ds:
            raise MetadataError(f"{where}{name}: given twice (by keyword and by tag)")
        ds[tag] = element
    return ds


def _no_bulk_data(*_: Any) -> bytes:
    raise MetadataError("a BulkDataURI cannot be read: give the value inline")


def _keyword_element(tag: int, value: Any, where: str) -> Any:
    """`{"Keyword": value}`: a string or number, a list of them (several values), or for a sequence a
    list of objects in the same form."""
    vr = dictionary_VR(tag)
    ds = Dataset()
    if vr == "SQ":
        if not isinstance(value, list):
            raise MetadataError(f"{where}: a sequence is a list of objects")
        items = [_dataset(item, f"{where}[{n}].") for n, item in enumerate(value)]
        ds.add_new(tag, vr, items)
        return ds[tag]
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        raise MetadataError(f"{where}: binary VR {vr}: give it in the DICOM JSON form (InlineBinary)")
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise MetadataError(f"{where}: values are strings or numbers")
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "AT") and not all(isinstance(v, int) for v in values):
        raise MetadataError(f"{where}: VR {vr} takes whole numbers")
    if vr in ("FL", "FD") and not all(isinstance(v, (int, float)) for v in values):
        raise MetadataError(f"{where}: VR {vr} takes numbers")
    if vr in ("IS", "DS"):
        values = [str(v) for v in values]
    _check(vr, values, where)  # before pydicom makes the element (and warns of or refuses the value)
    try:
        ds.add_new(tag, vr, values if isinstance(value, list) else values[0])
    except (ValueError, TypeError, OverflowError) as error:
        raise MetadataError(f"{where}: {error}") from None
    return ds[tag]


def _check(vr: str, value: Any, where: str) -> None:
    """A value pydicom would write, and that its VR allows (length, characters, form)."""
    if vr == "SQ":
        for n, item in enumerate(value):  # DICOM JSON items; keyword-form items were checked as read
            for element in item:
                _check(element.VR, element.value, f"{where}[{n}].{element.keyword or element.tag}")
        return
    for one in value if isinstance(value, list | tuple | MultiValue) else [value]:
        if one is None or one == "":
            continue
        try:
            validate_value(vr, str(one) if vr in ("PN", "IS", "DS") else one, pydicom_config.RAISE)
        except (ValueError, TypeError) as error:
            raise MetadataError(f"{where}: {error}") from None


def merged(template: Dataset | None, own: Dataset | None) -> Dataset:
    """The template with an image's own metadata laid over it, attribute by attribute."""
    ds = Dataset()
    for source in (template, own):
        for element in source or ():
            ds[element.tag] = element
    return ds


# --- pixels -----------------------------------------------------------------------------------


def pixels_of(data: bytes) -> Pixels:
    """The Image Pixel module of a JPEG or PNG image, decoded once in full to know it is whole.

    ItemFailed: `not_image` (neither JPEG nor PNG), `corrupt_image` (cannot be decoded),
    `unsupported_image` (cannot be kept without a loss), `too_large`."""
    frame = _baseline_frame(data) if data[:2] == b"\xff\xd8" else None  # refused before decoding
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
    except Image.UnidentifiedImageError:
        if frame is not None or data[:8] == PNG_SIGNATURE:
            raise ItemFailed("corrupt_image", "Pillow cannot read it") from None
        raise ItemFailed("not_image", "neither a JPEG nor a PNG image") from None
    except Exception as error:
        raise ItemFailed("corrupt_image", f"{type(error).__name__}: {error}") from None
    with image:
        columns, rows = image.size
        if columns * rows > MAX_PIXELS:
            raise ItemFailed("too_large", f"{columns} x {rows} pixels, over {MAX_PIXELS:,}")
        if max(columns, rows) > MAX_SIDE:
            raise ItemFailed(
                "unsupported_image", f"{columns} x {rows}: DICOM holds at most {MAX_SIDE} a side"
            )
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise ItemFailed("unsupported_image", f"{image.format} of {frames} frames (one is kept)")
        try:
            image.load()
        except Exception as error:  # truncated or damaged data: Pillow's OSError, or anything else
            raise ItemFailed("corrupt_image", f"{type(error).__name__}: {error}") from None
        if frame is not None:
            return _jpeg(data, frame, image, rows, columns)
        return _png(data, image, rows, columns)


def _baseline_frame(data: bytes) -> list[tuple[int, int, int]]:
    """The components of a JPEG that DICOM's JPEG Baseline syntax can hold as it is; anything else
    is refused with what it is."""
    marker, precision, components = _start_of_frame(data)
    if marker != 0xC0:
        kind = SOF_MARKERS.get(marker, "unknown")
        raise ItemFailed(
            "unsupported_image", f"{kind} JPEG (SOF{marker - 0xC0}): only Baseline is kept as it is"
        )
    if precision != 8 or len(components) not in (1, 3):
        what = {4: " (CMYK or YCCK)"}.get(len(components), "")
        raise ItemFailed(
            "unsupported_image",
            f"JPEG of {len(components)} components{what} at {precision} bits: "
            "only 8-bit greyscale or 3-component colour is kept",
        )
    return components


def _jpeg(
    data: bytes, components: list[tuple[int, int, int]], image: Image.Image, rows: int, columns: int
) -> Pixels:
    """A JPEG kept unchanged, its colour space as the decoder sees it (Adobe APP14, component ids)."""
    if len(components) == 1:
        photometric = "MONOCHROME2"
    elif image.info.get("adobe_transform") == 0 or [c[0] for c in components] == [ord(c) for c in "RGB"]:
        photometric = "RGB"  # colour stored without the YCbCr transform
    else:  # YCbCr, subsampled or not: YBR_FULL_422, as PS3.5 8.2.1 asks of JPEG Baseline
        photometric = "YBR_FULL_422"
    fragment = data[: data.rindex(b"\xff\xd9") + 2] if data.rfind(b"\xff\xd9") >= 0 else data
    return Pixels(len(components), photometric, rows, columns, encapsulate([fragment]), JPEGBaseline8Bit)


def _start_of_frame(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """The first SOF marker of a JPEG: its code, sample precision and (id, h, v) of each component."""
    at = 2  # after SOI
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ItemFailed("corrupt_image", f"JPEG: no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in SOF_MARKERS:
            body = data[at + 4 : at + 2 + length]
            count = body[5] if len(body) > 5 else 0
            if not count or len(body) < 6 + 3 * count:
                raise ItemFailed("corrupt_image", "JPEG: a start-of-frame segment cut short")
            parts = [(body[6 + 3 * n], body[7 + 3 * n] >> 4, body[7 + 3 * n] & 15) for n in range(count)]
            return marker, body[0], parts
        at += 2 + length
    raise ItemFailed("corrupt_image", "JPEG: no start-of-frame marker")


def _png(data: bytes, image: Image.Image, rows: int, columns: int) -> Pixels:
    """A PNG's pixels, native: greyscale as MONOCHROME2, colour as RGB; an opaque alpha channel is
    dropped, a palette expanded (no loss either way)."""
    if data[12:16] == b"IHDR" and data[24] == 16:
        raise ItemFailed("unsupported_image", f"16-bit PNG ({image.mode}): only 8-bit samples are kept")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA"):
        low, _ = image.getchannel("A").getextrema()
        if low != 255:
            raise ItemFailed(
                "unsupported_image", f"PNG with transparent pixels ({image.mode}): DICOM has no alpha"
            )
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    if image.mode == "L":
        return Pixels(1, "MONOCHROME2", rows, columns, _even(image.tobytes()), ExplicitVRLittleEndian)
    if image.mode == "RGB":
        return Pixels(3, "RGB", rows, columns, _even(image.tobytes()), ExplicitVRLittleEndian)
    raise ItemFailed("unsupported_image", f"PNG of mode {image.mode}: only 8-bit greyscale or colour is kept")


def _even(pixels: bytes) -> bytes:
    return pixels + b"\x00" if len(pixels) % 2 else pixels


# --- the instance -----------------------------------------------------------------------------


def build_instance(image: bytes, uri: str, metadata: Dataset, sop_class: str = "secondary_capture") -> Built:
    """The instance (a SOP_CLASSES name) of an image found at `uri` (its directory and name feed the
    derived UIDs and the Instance Number), with `metadata` (template and sidecar merged)."""
    sop_class_uid, defaults = SOP_CLASSES[sop_class]
    pixels = pixels_of(image)
    directory, _, name = uri.rpartition("/")
    ds = Dataset()
    for element in metadata:
        ds[element.tag] = element
    for keyword in TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    for keyword, value in defaults.items():
        if not ds.get(keyword):
            setattr(ds, keyword, value)
    if "InstanceNumber" not in ds:
        digits = re.search(r"(\d{1,9})$", name.rpartition(".")[0] or name)
        ds.InstanceNumber = int(digits.group(1)) if digits else None
    if "SpecificCharacterSet" not in ds and not _ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.StudyInstanceUID = _uid(ds, "StudyInstanceUID", _study_sources(ds, directory))
    ds.SeriesInstanceUID = _uid(
        ds,
        "SeriesInstanceUID",
        ["series", ds.StudyInstanceUID, directory, ds.Modality, str(ds.SeriesNumber or "")],
    )
    ds.SOPInstanceUID = _uid(ds, "SOPInstanceUID", ["sop", hashlib.sha256(image).hexdigest()])
    ds.SamplesPerPixel = pixels.samples
    ds.PhotometricInterpretation = pixels.photometric
    ds.Rows, ds.Columns = pixels.rows, pixels.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.samples == 3:
        ds.PlanarConfiguration = 0
    if pixels.transfer_syntax == JPEGBaseline8Bit:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ratio = pixels.rows * pixels.columns * pixels.samples / len(image)
        ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]
    ds.PixelData = pixels.pixel_data
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pixels.transfer_syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    ref = InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    return Built(out.getvalue(), ref)


def _study_sources(ds: Dataset, directory: str) -> list[str]:
    """What identifies the study when the metadata gives no UID: the patient and the accession
    number, else the study ID, else the directory the image is in."""
    patient = str(ds.get("PatientID") or "")
    if ds.get("AccessionNumber"):
        return ["study", patient, "accession", str(ds.AccessionNumber)]
    if ds.get("StudyID"):
        return ["study", patient, "study_id", str(ds.StudyID)]
    return ["study", patient, "directory", directory]


def _uid(ds: Dataset, keyword: str, sources: list[str]) -> str:
    """The metadata's UID (checked), else one derived from `sources`."""
    given = ds.get(keyword)
    if given:
        if not valid_uid(str(given)):
            raise ItemFailed(
                "malformed_metadata", f"{keyword} {str(given)[:80]!r} is not 1-64 digits and dots"
            )
        return str(given)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(['dicom-etl import_images', *sources])).int}"


def _ascii(ds: Dataset) -> bool:
    """Whether every text value is ASCII (else the instance says UTF-8: ISO_IR 192)."""
    for element in ds.iterall():
        if element.VR in ("SQ", "OB", "OW", "UN") or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        if not all(str(value).isascii() for value in values):
            return False
    return True
