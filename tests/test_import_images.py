"""import_images: JPEG and PNG images with JSON metadata become Secondary Capture instances.

Oracles: Pillow's own decode of each image (the stored pixels must equal it), pydicom, dcmtk's
`dcmdump`, and dicom3tools' `dciodvfy` (the IOD checker; `make test` installs it). Real JPEGs are the
JPEG Baseline streams inside pydicom's test files (written by dcmtk, dcmjpeg and others); the other
images are made here with Pillow.
"""

from __future__ import annotations

import io
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from dicomlib.failures import ItemFailed
from dicomlib.images import MetadataError, build_instance, parse_metadata, pixels_of
from pipelines import export_metadata, import_images
from tests.conftest import run_pipeline, stored_instances
from tests.gcs_emulator import upload_tree
from tests.healthcare_server import STORE
from tests.orthanc_server import Orthanc

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_JPEGS = {  # pydicom test file -> the photometric interpretation its JPEG stream decodes as
    "SC_rgb_jpeg_dcmtk.dcm": "YBR_FULL_422",
    "SC_rgb_jpeg.dcm": "YBR_FULL_422",
    "SC_rgb_jpeg_app14_dcmd.dcm": "RGB",  # Adobe APP14, no colour transform
    "SC_rgb_small_odd_jpeg.dcm": "YBR_FULL_422",  # 3 x 3
}
TEMPLATE = {"PatientID": "P-1", "PatientName": "Doe^Jane", "StudyDate": "20261123", "AccessionNumber": "A-7"}
# Type 1 attributes of the SC Image IOD's modules: General Series, General Study, General Image
# (none), Image Pixel, SC Image (none), SOP Common; SC Equipment's below
TYPE_1 = (
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "SOPClassUID",
    "SOPInstanceUID",
)
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
TYPE_2 += ("ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "InstanceNumber")


def real_jpeg(name: str) -> bytes:
    with warnings.catch_warnings():  # SC_rgb_jpeg.dcm says explicit VR and holds implicit
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(TEST_FILES / name)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def encoded(array: np.ndarray, kind: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, kind, **options)
    return out.getvalue()


def noise(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype("uint8")


def pillow_pixels(data: bytes, photometric: str) -> np.ndarray:
    """The image as Pillow decodes it, in the colour space the instance declares."""
    image = Image.open(io.BytesIO(data))
    if photometric.startswith("YBR"):
        image.draft("YCbCr", image.size)  # the decoder's own YCbCr, before its conversion to RGB
        return np.asarray(image)
    return np.asarray(image.convert("L" if photometric == "MONOCHROME2" else "RGB"))


def check_instance(data: bytes, image: bytes, tmp_path: Path, iod: str = "SCImage") -> pydicom.Dataset:
    """The instance's pixels equal Pillow's decode; its Type 1 and 2 attributes are there; dcmdump
    reads it and dciodvfy finds no error."""
    ds = pydicom.dcmread(io.BytesIO(data))
    # SC Equipment's ConversionType; the VL Image module's ImageType
    extra = ("ConversionType",) if iod == "SCImage" else ("ImageType",)
    for keyword in (*TYPE_1, *extra):
        assert ds.get(keyword) not in (None, ""), keyword
    for keyword in TYPE_2:
        assert keyword in ds, keyword
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (8, 8, 7)
    assert ds.PixelRepresentation == 0 and ("PlanarConfiguration" in ds) == (ds.SamplesPerPixel == 3)
    jpeg = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    expected = pillow_pixels(image, ds.PhotometricInterpretation)
    if jpeg:
        assert ds.LossyImageCompression == "01"
        assert next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\0") == image.rstrip(b"\0")
        stored = pixel_array(ds, decoding_plugin="pillow", as_rgb=False)
    else:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        stored = ds.pixel_array
    assert stored.shape == expected.shape and (stored == expected).all()
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(data)
    dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, check=True).stdout
    assert ds.SOPInstanceUID in dump
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
    assert iod in report and "Error" not in report, report
    return ds


# --- dicomlib: the instance ---------------------------------------------------------------------


def test_a_vl_photographic_instance(tmp_path: Path) -> None:
    image = real_jpeg("SC_rgb_jpeg_dcmtk.dcm")
    built = build_instance(image, "/in/a.jpg", parse_metadata(json.dumps(TEMPLATE)), "vl_photographic")
    ds = check_instance(built.data, image, tmp_path, "VLPhotographicImage")
    assert (ds.SOPClassUID, ds.Modality, "ConversionType" in ds) == (
        "1.2.840.10008.5.1.4.1.1.77.1.4",
        "XC",
        False,
    )
    sc = build_instance(image, "/in/a.jpg", parse_metadata(json.dumps(TEMPLATE)))
    assert pydicom.dcmread(io.BytesIO(sc.data)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.parametrize("name", REAL_JPEGS)
def test_a_real_jpeg_is_kept_as_it_is(name: str, tmp_path: Path) -> None:
    image = real_jpeg(name)
    ds = check_instance(build_instance(image, f"/in/{name}.jpg", parse_metadata("{}")).data, image, tmp_path)
    assert ds.PhotometricInterpretation == REAL_JPEGS[name]


@pytest.mark.parametrize(
    ("array", "options", "photometric"),
    [
        (noise(40, 60, 3), {}, "YBR_FULL_422"),  # Pillow's default: 4:2:0
        (noise(40, 60, 3), {"subsampling": 0}, "YBR_FULL_422"),
        (noise(33, 17), {"quality": 95}, "MONOCHROME2"),
    ],
)
def test_a_made_jpeg_is_kept_with_its_colour_space(
    array: np.ndarray, options: dict, photometric: str, tmp_path: Path
) -> None:
    image = encoded(array, "JPEG", **options)
    ds = check_instance(build_instance(image, "/in/a.jpg", parse_metadata("{}")).data, image, tmp_path)
    assert ds.PhotometricInterpretation == photometric


@pytest.mark.parametrize(
    ("image", "photometric"),
    [
        (encoded(noise(31, 17), "PNG"), "MONOCHROME2"),
        (encoded(noise(20, 30, 3), "PNG"), "RGB"),
        (encoded(np.dstack([noise(9, 9, 3), np.full((9, 9), 255, "uint8")]), "PNG"), "RGB"),  # opaque
        (encoded(noise(12, 12) > 127, "PNG"), "MONOCHROME2"),  # 1-bit
        (encoded(noise(12, 12), "PNG", optimize=True, bits=4), "MONOCHROME2"),
    ],
)
def test_a_png_is_stored_losslessly(image: bytes, photometric: str, tmp_path: Path) -> None:
    ds = check_instance(build_instance(image, "/in/a.png", parse_metadata("{}")).data, image, tmp_path)
    assert ds.PhotometricInterpretation == photometric


def test_a_palette_png_is_expanded_to_rgb(tmp_path: Path) -> None:
    image = encoded(noise(10, 14, 3), "PNG")
    palette = io.BytesIO()
    Image.open(io.BytesIO(image)).quantize(16).save(palette, "PNG")
    ds = pydicom.dcmread(io.BytesIO(build_instance(palette.getvalue(), "/a.png", parse_metadata("{}")).data))
    expected = np.asarray(Image.open(palette).convert("RGB"))
    assert ds.PhotometricInterpretation == "RGB" and (ds.pixel_array == expected).all()


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(noise(8, 8, 3)).convert("CMYK").save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("image", "reason", "words"),
    [
        (encoded(noise(16, 16, 3), "JPEG", progressive=True), "unsupported_image", "progressive JPEG"),
        (real_jpeg("JPEG-lossy.dcm"), "unsupported_image", "extended sequential JPEG (SOF1)"),
        (real_jpeg("SC_rgb_jpeg_gdcm.dcm"), "unsupported_image", "lossless JPEG (SOF3)"),
        (cmyk_jpeg(), "unsupported_image", "4 components (CMYK or YCCK)"),
        (encoded(noise(8, 8).astype("uint16") * 257, "PNG"), "unsupported_image", "16-bit PNG"),
        (encoded(np.dstack([noise(8, 8, 3), noise(8, 8)]), "PNG"), "unsupported_image", "transparent"),
        (encoded(noise(8, 8, 3), "GIF"), "not_image", "neither a JPEG nor a PNG"),
        (b"hello", "not_image", "neither"),
        (encoded(noise(64, 64, 3), "JPEG")[:400], "corrupt_image", ""),
        (encoded(noise(64, 64, 3), "PNG")[:200], "corrupt_image", ""),
    ],
)
def test_what_cannot_be_kept_is_refused_with_its_reason(image: bytes, reason: str, words: str) -> None:
    with pytest.raises(ItemFailed) as caught:
        pixels_of(image)
    assert caught.value.reason == reason and words in caught.value.detail


def test_metadata_in_both_forms_fills_the_instance(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "PatientName": "Müller^Jörg",
            "00100020": {"vr": "LO", "Value": ["P-9"]},
            "Modality": "XC",
            "InstanceNumber": 4,
            "PixelSpacing": [0.5, 0.5],
            "ReferencedStudySequence": [
                {"ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1", "ReferencedSOPInstanceUID": "1.2.3"}
            ],
        }
    )
    image = encoded(noise(8, 8), "PNG")
    ds = check_instance(build_instance(image, "/in/x_0012.png", parse_metadata(text)).data, image, tmp_path)
    assert (str(ds.PatientName), ds.PatientID, ds.Modality, ds.InstanceNumber) == (
        "Müller^Jörg",
        "P-9",
        "XC",
        4,
    )
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.ConversionType == "WSD"
    assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"PatientNmae": "x"}', "PatientNmae: not a DICOM keyword"),
        ('{"StudyDate": "2026-11-23"}', "StudyDate"),
        ('{"Rows": 10}', "Rows: set from the image"),
        ('{"00100010": {"vr": "PN", "Value": 3}}', "PatientName"),
        ('{"SeriesNumber": "one"}', "SeriesNumber"),
        ('{"SOPInstanceUID": "1.2.3"}', "every image the same UID"),
        ('{"PatientID": "a", "00100020": {"vr": "LO", "Value": ["b"]}}', "PatientID: given twice"),
        ('{"00081110": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.x"]}}]}}', r"\[0\]"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom reading DICOM JSON warns first
def test_malformed_metadata_is_refused_with_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(MetadataError, match=words):
        parse_metadata(text, template=True)


def test_uids_are_derived_from_the_image_and_the_metadata() -> None:
    image, other = encoded(noise(8, 8), "PNG"), encoded(noise(8, 8, seed=1), "PNG")
    meta = parse_metadata(json.dumps(TEMPLATE))
    a = build_instance(image, "/in/p/a.png", meta)
    assert build_instance(image, "/in/p/a.png", meta) == a  # the same bytes: a re-run is already_present
    b = build_instance(other, "/in/q/b.png", meta)
    assert (b.ref.study, b.ref.series == a.ref.series, b.ref.sop == a.ref.sop) == (a.ref.study, False, False)
    bare = parse_metadata('{"PatientID": "P-1"}')  # no study identity: a study per directory
    c, d = build_instance(image, "/in/p/a.png", bare), build_instance(other, "/in/p/b.png", bare)
    e = build_instance(other, "/in/q/b.png", bare)
    assert c.ref.study == d.ref.study != e.ref.study and c.ref.study != a.ref.study
    given = parse_metadata('{"StudyInstanceUID": "1.2.826.0.1.3", "SOPInstanceUID": "1.2.826.0.1.4"}')
    assert build_instance(image, "/in/p/a.png", given).ref[::2] == ("1.2.826.0.1.3", "1.2.826.0.1.4")
    for uid in (*a.ref, *c.ref, *e.ref):
        assert uid.startswith("2.25.") and len(uid) <= 64


# --- the pipeline -------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Two patients' folders: good images, sidecars, and one of each kind of failure."""
    root = tmp_path / "in"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    (root / "p1" / "IMG_0001.jpg").write_bytes(real_jpeg("SC_rgb_jpeg_dcmtk.dcm"))
    (root / "p1" / "IMG_0002.jpg").write_bytes(encoded(noise(30, 40, 3), "JPEG"))
    (root / "p1" / "scan.png").write_bytes(encoded(noise(20, 25), "PNG"))
    (root / "p1" / "scan.png.json").write_text(
        json.dumps({"SeriesDescription": "scans", "InstanceNumber": 3})
    )
    (root / "p2" / "photo.png").write_bytes(encoded(noise(20, 25, 3), "PNG"))
    (root / "p2" / "photo.png.json").write_text(json.dumps({"PatientID": "P-2", "AccessionNumber": "A-8"}))
    (root / "p2" / "broken.jpg").write_bytes(encoded(noise(64, 64, 3), "JPEG")[:500])
    (root / "p2" / "progressive.jpg").write_bytes(encoded(noise(16, 16, 3), "JPEG", progressive=True))
    (root / "p2" / "odd.png").write_bytes(encoded(noise(5, 5), "PNG"))
    (root / "p2" / "odd.png.json").write_text('{"StudyDate": "23.11.2026"}')
    (tmp_path / "template.json").write_text(json.dumps(TEMPLATE))
    return root


def test_an_import_stores_every_good_image_and_dead_letters_the_rest(images: Path, tmp_path: Path) -> None:
    store, dead = tmp_path / "store", tmp_path / "dead"
    args = (f"--input={images}/**", f"--metadata={tmp_path / 'template.json'}", f"--store={store}")
    args += (f"--metadata_destination={tmp_path / 'rows'}",)  # a row per newly stored instance
    run = run_pipeline(import_images.main, *args, dead_letter=dead)
    assert run.status == 3, run.stdout
    assert run.summary | {"bytes_read": 0, "bytes_stored": 0, "failure_reasons": {}} == {
        "matched": 10,
        "sidecars": 3,
        "success": 4,
        "already_present": 0,
        "failure": 3,
        "unmatched_patterns": 0,
        "bytes_read": 0,
        "bytes_stored": 0,
        "metadata_rows": 4,
        "metadata_rows_restored": 0,
        "metadata_failures": 0,
        "failure_reasons": {},
    }
    assert run.reasons() == {
        f"{images}/p2/broken.jpg": "corrupt_image",
        f"{images}/p2/progressive.jpg": "unsupported_image",
        f"{images}/p2/odd.png": "malformed_metadata",
    }
    stored = {(ds := pydicom.dcmread(path)).InstanceNumber: ds for path in stored_instances(store).values()}
    assert set(stored) == {1, 2, 3, None}  # IMG_0001, IMG_0002, the sidecar's 3, photo (no number)
    p1 = [stored[1], stored[2], stored[3]]
    assert len({ds.StudyInstanceUID for ds in p1}) == 1 and stored[3].SeriesDescription == "scans"
    assert stored[None].PatientID == "P-2" and stored[None].StudyInstanceUID != stored[1].StudyInstanceUID
    expected = pillow_pixels((images / "p1" / "scan.png").read_bytes(), "MONOCHROME2")
    assert (stored[3].pixel_array == expected).all()

    again = run_pipeline(import_images.main, *args, dead_letter=dead)
    assert (again.status, again.summary["success"], again.summary["already_present"]) == (3, 0, 4)
    assert (again.summary["metadata_rows"], again.summary["metadata_rows_restored"]) == (0, 0)

    table = tmp_path / "table"
    rows = run_pipeline(
        export_metadata.main, f"--store={store}", f"--destination={table}", dead_letter=tmp_path / "dead2"
    )
    assert rows.status == 0, rows.stdout
    parts = sorted(table.glob("*.parquet"))
    read = [
        row for part in parts for row in pq.read_table(part, columns=["PatientID", "Modality"]).to_pylist()
    ]
    assert sorted(row["PatientID"] for row in read) == ["P-1", "P-1", "P-1", "P-2"]
    assert {row["Modality"] for row in read} == {"OT"}


def test_without_metadata_each_image_needs_its_sidecar(images: Path, tmp_path: Path) -> None:
    run = run_pipeline(
        import_images.main,
        f"--input={images}/p1/*.jpg",
        f"--store={tmp_path / 's'}",
        dead_letter=tmp_path / "d",
    )
    assert run.status == 3
    assert set(run.reasons().values()) == {"missing_metadata"} and len(run.reasons()) == 2


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("--metadata={tmp}/missing.json", "--metadata: cannot read"),
        ("--sop_class=ct", "--sop_class: must be one of"),
    ],
)
def test_a_bad_option_stops_the_run_before_it_starts(
    option: str, words: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = import_images.main(
        [f"--input={images}/**", option.format(tmp=tmp_path), f"--store={tmp_path / 's'}"]
    )
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "") and captured.err.startswith(f"error: {words}")


def test_a_malformed_template_stops_the_run_before_it_starts(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text('{"PatientID": "P", "Columns": 3}')
    status = import_images.main(
        [f"--input={images}/**", f"--metadata={tmp_path / 'bad.json'}", f"--store={tmp_path / 's'}"]
    )
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "")
    assert (
        captured.err.strip().startswith("error: --metadata:")
        and "Columns: set from the image" in captured.err
    )
    assert not (tmp_path / "s").exists()


def test_an_import_into_orthanc(images: Path, tmp_path: Path, orthanc: Orthanc) -> None:
    orthanc.clear()
    args = (
        f"--input={images}/p1/**",
        f"--metadata={tmp_path / 'template.json'}",
        f"--store={orthanc.dicomweb}",
    )
    run = run_pipeline(import_images.main, *args, dead_letter=tmp_path / "dead")
    assert (run.status, run.summary["success"], run.summary["failure"]) == (0, 3, 0), run.stdout
    assert orthanc.instance_count() == 3
    again = run_pipeline(import_images.main, *args, dead_letter=tmp_path / "dead")
    assert (again.status, again.summary["already_present"]) == (0, 3)


@pytest.mark.parametrize("kind", ["gcs", "healthcare"])
def test_images_in_cloud_storage_into_a_bucket_or_the_healthcare_api(
    kind: str, images: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Images, sidecars and the template read from gs://, into a gs:// store or a Healthcare API
    store (the stand-in of tests/healthcare_server.py)."""
    client = request.getfixturevalue("gcs")
    bucket = f"images-{kind}-{abs(hash(tmp_path)) % 10**8}"
    upload_tree(client, images.parent, bucket)
    if kind == "gcs":
        store = f"gs://{bucket}/store"
    else:
        request.getfixturevalue("healthcare")
        store = STORE
    args = (f"--input=gs://{bucket}/in/p1/**", f"--metadata=gs://{bucket}/template.json", f"--store={store}")
    run = run_pipeline(import_images.main, *args, dead_letter=tmp_path / "dead")
    assert (run.status, run.summary["sidecars"], run.summary["success"]) == (0, 1, 3), run.stdout
    again = run_pipeline(import_images.main, *args, dead_letter=tmp_path / "dead")
    assert (again.status, again.summary["already_present"]) == (0, 3)
    if kind == "gcs":
        names = [blob.name for blob in client.list_blobs(bucket, prefix="store/studies/")]
        assert len(names) == 3 and all(name.endswith(".dcm") for name in names)
