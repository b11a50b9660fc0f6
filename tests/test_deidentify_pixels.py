"""Burnt-in text (dicomlib/deidentify/pixels.py) with the real tesseract and pydicom's real codecs:
instances made from pydicom's corpus with a name, an ID and a date drawn into the pixels; OCR finds
them before and not after REDACT_ALL_TEXT, pixels outside the redacted boxes are unchanged, the
sensitive modes keep harmless words, the transfer syntax is kept where it is lossless, and the
Provenance lists the boxes. Then `dicom-etl deidentify_dicom` end to end with REDACT_ALL_TEXT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from dicomlib.deidentify import deidentify, parse_config
from dicomlib.deidentify.pixels import ImageFinding, frame_words
from dicomlib.deidentify.provenance import instance_resource
from dicomlib.render import eight_bit
from tests.beam_support import filled_store
from tests.command_line import Place

KEY = b"a-test-key-0123456789"
NAME, PATIENT_ID, DATE, HARMLESS = "JOHN SMITH", "PID 7734921", "1958-03-14", "AXIAL"
FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
SIZE = 512


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if FONT_FILE.exists():
        return ImageFont.truetype(str(FONT_FILE), 28)
    return ImageFont.load_default(size=28)


def _draw(image: Image.Image, colour: int | tuple[int, int, int]) -> None:
    draw = ImageDraw.Draw(image)
    for position, line in (
        ((16, 12), NAME),
        ((16, 52), PATIENT_ID),
        ((16, 92), DATE),
        ((380, 460), HARMLESS),
    ):
        draw.text(position, line, fill=colour, font=_font())


def _background() -> np.ndarray:
    """pydicom's CT_small scaled up to SIZE x SIZE, 8 bits, kept away from the text's white."""
    ct = dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64)
    grey = ((ct - ct.min()) / (ct.max() - ct.min()) * 120).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((SIZE, SIZE), Image.Resampling.NEAREST))


def burnt_in(colour: bool = False, frames: int = 1) -> Dataset:
    """An 8-bit MONOCHROME2 (or RGB) instance with the patient's name, an ID and a date burnt in, on
    CT_small's header; `frames` identical frames."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "SMITH^JOHN"
    ds.PatientID = "PID7734921"
    ds.PatientBirthDate = "19580314"
    grey = Image.fromarray(_background())
    image = grey.convert("RGB") if colour else grey
    _draw(image, (255, 255, 0) if colour else 255)
    arr = np.asarray(image)
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    ds.BurnedInAnnotation = "YES"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.stack([arr] * frames).tobytes() if frames > 1 else arr.tobytes()
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def read_text(ds: Dataset, frame: int = 0, rows: slice = slice(None)) -> str:
    """What the OCR reads in one frame of `ds` (in `rows` of it: tesseract's page analysis reads
    nothing at all in some frames with black boxes, so a harmless word is looked for in its half)."""
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[frame]
    return " ".join(word.text for word in frame_words(eight_bit(arr[rows], ds)))


def config(mode: str, profile: str = "KEEP_ALL_PROFILE") -> object:
    return parse_config(
        json.dumps({"dicom": {"filterProfile": profile}, "image": {"textRedactionMode": mode}})
    )


def outside(findings: list[ImageFinding], shape: tuple[int, ...]) -> np.ndarray:
    """A mask of the pixels outside every redacted box."""
    mask = np.ones(shape[:2], bool)
    for box in findings:
        mask[box.top : box.bottom, box.left : box.right] = False
    return mask


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


@pytest.mark.parametrize("colour", [False, True], ids=["monochrome2", "rgb"])
def test_all_text_is_found_before_and_not_after_and_other_pixels_are_unchanged(colour: bool) -> None:
    ds = burnt_in(colour)
    before = read_text(ds)
    assert "JOHN" in before and "SMITH" in before and "7734921" in before and "1958" in before
    result = deidentify(ds, config("REDACT_ALL_TEXT"), KEY)
    out = result.dataset
    after = read_text(out)
    assert "JOHN" not in after and "SMITH" not in after and "7734921" not in _digits(after)
    assert "1958" not in _digits(after) and HARMLESS not in after
    mask = outside(result.images, ds.pixel_array.shape)
    assert np.array_equal(out.pixel_array[mask], ds.pixel_array[mask])
    assert not np.array_equal(out.pixel_array, ds.pixel_array)
    assert out.BurnedInAnnotation == "NO" and ds.BurnedInAnnotation == "YES"
    assert {box.info_type for box in result.images} == {"TEXT"}
    assert all(0 <= box.confidence <= 1 for box in result.images)
    assert "113101" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]


def test_sensitive_text_removes_the_name_id_and_date_and_keeps_harmless_words() -> None:
    ds = burnt_in()
    result = deidentify(ds, config("REDACT_SENSITIVE_TEXT"), KEY)
    after = read_text(result.dataset)
    assert "JOHN" not in after and "SMITH" not in after
    assert "7734921" not in _digits(after) and "1958" not in _digits(after)
    assert HARMLESS in read_text(result.dataset, rows=slice(SIZE // 2, None))
    assert not any(HARMLESS in box.quote for box in result.images)
    types = {box.info_type for box in result.images}
    assert "PERSON_NAME" in types and "DATE" in types
    mask = outside(result.images, ds.pixel_array.shape)
    assert np.array_equal(result.dataset.pixel_array[mask], ds.pixel_array[mask])


def test_identical_frames_are_read_once_and_both_redacted() -> None:
    ds = burnt_in(frames=2)
    result = deidentify(ds, config("REDACT_ALL_TEXT"), KEY)
    by_frame = [[b for b in result.images if b.frame == i] for i in (0, 1)]
    assert by_frame[0] and [(b.left, b.top) for b in by_frame[0]] == [(b.left, b.top) for b in by_frame[1]]
    out = result.dataset.pixel_array
    assert np.array_equal(out[0], out[1])
    assert "SMITH" not in read_text(result.dataset, 1)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda uid: uid.name)
def test_a_lossless_source_keeps_its_syntax(syntax: UID) -> None:
    ds = burnt_in()
    ds.compress(syntax)
    result = deidentify(ds, config("REDACT_ALL_TEXT"), KEY)
    assert result.dataset.file_meta.TransferSyntaxUID == syntax
    assert "SMITH" not in read_text(result.dataset)
    reread = dcmread(_saved(result.dataset))
    assert reread.file_meta.TransferSyntaxUID == syntax and reread.BurnedInAnnotation == "NO"
    mask = outside(result.images, ds.pixel_array.shape)
    assert np.array_equal(reread.pixel_array[mask], ds.pixel_array[mask])


def test_a_jpeg_baseline_source_becomes_uncompressed() -> None:
    lossy = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    result = deidentify(lossy, config("REDACT_ALL_TEXT"), KEY)
    out = dcmread(_saved(result.dataset))
    assert lossy.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and out.BurnedInAnnotation == "NO"
    assert out.PhotometricInterpretation == "RGB"  # as decoded: nothing further lost
    mask = outside(result.images, lossy.pixel_array.shape)
    assert np.array_equal(out.pixel_array[mask], lossy.pixel_array[mask])


def test_in_place_deidentifies_the_given_data_set_without_text_redaction() -> None:
    ds = burnt_in()
    copied = deidentify(ds, config("REDACT_NO_TEXT", "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE"), KEY)
    assert ds.PatientName == "SMITH^JOHN" and copied.dataset is not ds and copied.images == []
    same = deidentify(
        ds, config("REDACT_NO_TEXT", "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE"), KEY, in_place=True
    )
    assert same.dataset is ds and ds.PatientName != "SMITH^JOHN"
    assert ds.SOPInstanceUID == copied.dataset.SOPInstanceUID and ds.BurnedInAnnotation == "YES"


def _saved(ds: Dataset) -> object:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_clean_descriptors_cleans_descriptor_attributes_and_provenance_lists_the_boxes() -> None:
    ds = burnt_in()
    ds.SeriesDescription = "AXIAL for John Smith"
    ds.ImageComments = "PID7734921 seen 1958-03-14"
    result = deidentify(ds, config("REDACT_SENSITIVE_TEXT_CLEAN_DESCRIPTORS"), KEY)
    out = result.dataset
    assert "Smith" not in out.SeriesDescription and "AXIAL" in out.SeriesDescription
    assert "PID7734921" not in out.ImageComments and "1958" not in out.ImageComments
    assert "113105" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    resource = instance_resource("op", "src", "dst", "2024-01-01T00:00:00+00:00", result, 1)
    [images] = [e for e in resource["entity"][0]["extension"] if e["url"] == "https://g.co/dicom-images"]
    [frame] = images["extension"]
    assert frame["url"] == "frame-index" and frame["valueDecimal"] == 0
    urls = [item["url"] for item in frame["extension"]]
    for url in ("left", "right", "top", "bottom", "relative-left", "relative-bottom", "quote", "infoType"):
        assert url in urls
    quotes = [item["valueString"] for item in frame["extension"] if item["url"] == "quote"]
    assert any("SMITH" in quote for quote in quotes)
    relative = [item["valueDecimal"] for item in frame["extension"] if item["url"].startswith("relative-")]
    assert all(0 <= value <= 1 for value in relative)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("REDACT_SENSITIVE_TEXT_CLEAN_DESCRIPTORS", "CT on [CTX] for [PERSON_NAME]"),
        ("REDACT_SENSITIVE_TEXT", "CT on SCANNER-SEVEN for Mary Major"),
    ],
)
def test_clean_descriptors_replaces_values_the_basic_profile_removes_with_ctx(
    mode: str, expected: str
) -> None:
    """The Healthcare API's Clean Descriptors Option: a phrase in a descriptor matching the value of an
    attribute the Basic Profile removes (StationName: X/Z/D) becomes [CTX]; the patient's own values
    keep their own infoType. Without the option, descriptors are left alone under KEEP_ALL."""
    ds = burnt_in()
    ds.PatientName = "Major^Mary"
    ds.StationName = "SCANNER-SEVEN"
    ds.SeriesDescription = "CT on SCANNER-SEVEN for Mary Major"
    result = deidentify(ds, config(mode), KEY)
    assert result.dataset.SeriesDescription == expected
    if mode.endswith("CLEAN_DESCRIPTORS"):
        [record] = [r for r in result.records if r.tag_id == "0008103E"]
        assert [finding.info_type for finding in record.findings] == ["CTX", "PERSON_NAME"]


def test_deidentify_dicom_redacts_all_text_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "burnt.dcm"
    burnt_in().save_as(path, enforce_file_format=True)
    filled_store(tmp_path / "source", [path])
    mode = json.dumps({"image": {"textRedactionMode": "REDACT_ALL_TEXT"}})
    run = Place(tmp_path).run(
        "script",
        "deidentify_dicom",
        f"--source={tmp_path / 'source'}",
        f"--destination={tmp_path / 'dest'}",
        f"--config={mode}",
        f"--provenance_destination={tmp_path / 'prov'}",
        f"--dead_letter={tmp_path / 'dl'}",
        DEID_KEY=KEY.decode(),
    )
    assert run.status == 0, run.stderr
    assert (run.summary["success"], run.summary["failure"]) == (1, 0)
    [written] = sorted((tmp_path / "dest").rglob("*.dcm"))
    out = dcmread(written)
    assert out.BurnedInAnnotation == "NO"
    after = read_text(out)
    assert "SMITH" not in after and "JOHN" not in after and "7734921" not in _digits(after)
    lines = (tmp_path / "prov" / "Provenance.ndjson").read_text().splitlines()
    urls = [
        e["url"]
        for r in map(json.loads, lines)
        if "occurredDateTime" not in r
        for e in r["entity"][0]["extension"]
    ]
    assert "https://g.co/dicom-images" in urls
