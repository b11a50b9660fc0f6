"""Exporting a store: filters at each level, every kind of store and destination, file types,
and clear errors for bad filters and outputs."""

from __future__ import annotations

import io
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from google.cloud import storage
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicomlib.convert import MIME_TYPES
from dicomlib.uids import InstanceRef
from pipelines import export_dicom
from pipelines.options.base import EtlOptions
from storage.file_store import FileLayoutStore
from tests.conftest import Run, run_export, run_import
from tests.gcs_emulator import upload_tree
from tests.orthanc_server import Orthanc

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
JPEG_BASELINE, JPEG_2000 = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91"


@pytest.fixture(scope="module")
def corpus_store(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> FileLayoutStore:
    """A local file-layout store holding every valid instance of the corpus."""
    root = tmp_path_factory.mktemp("corpus_store")
    run_import(f"--input={corpus_dir}/**", f"--store={root}/store", dead_letter=root / "dl")
    return FileLayoutStore(str(root / "store"))


def refs(store: FileLayoutStore) -> set[InstanceRef]:
    return {ref for study in store.studies() for ref in store.instances(study)}


def exported(output: Path, extension: str = "dcm") -> set[InstanceRef]:
    """The instances an export wrote, from the contract's layout {output}/{study}/{series}/{sop}.dcm."""
    return {
        InstanceRef(path.parent.parent.name, path.parent.name, path.stem)
        for path in output.rglob(f"*.{extension}")
    }


def a_filter(store: FileLayoutStore, tmp_path: Path) -> tuple[Path, set[InstanceRef]]:
    """A filter with a study, a series and an instance line from three studies, plus overlaps;
    and the instances it selects."""
    everything = sorted(refs(store))
    studies = sorted({ref.study for ref in everything}, key=lambda s: -sum(r.study == s for r in everything))
    whole, partial, single = studies[0], studies[1], studies[2]
    series = next(ref.series for ref in everything if ref.study == partial)
    instance = next(ref for ref in everything if ref.study == single)
    inside = next(ref for ref in everything if ref.study == whole)
    lines = [
        f"/studies/{inside.study}/series/{inside.series}/instances/{inside.sop}",  # inside the study line
        f"  /studies/{whole}  ",
        "",
        f"/studies/{partial}/series/{series}",
        f"/studies/{partial}/series/{series}",
        f"/studies/{single}/series/{instance.series}/instances/{instance.sop}",
    ]
    path = tmp_path / "filter.txt"
    path.write_text("\n".join(lines) + "\n")
    selected = {
        ref
        for ref in everything
        if ref.study == whole or (ref.study, ref.series) == (partial, series) or ref == instance
    }
    return path, selected


def assert_same_bytes(store: FileLayoutStore, output: Path, selected: set[InstanceRef]) -> None:
    for ref in selected:
        assert (output / ref.study / ref.series / f"{ref.sop}.dcm").read_bytes() == store.read(ref), ref


def test_a_whole_store_exports_to_a_new_directory_byte_for_byte(
    corpus_store: FileLayoutStore, tmp_path: Path
) -> None:
    output = tmp_path / "new" / "out"

    run = run_export(f"--store={corpus_store.root}", f"--output={output}", dead_letter=tmp_path / "dl")

    stored = refs(corpus_store)
    assert (run.status, run.summary["selected"], run.summary["success"], run.summary["failure"]) == (
        0,
        len(stored),
        len(stored),
        0,
    )
    assert exported(output) == stored
    assert_same_bytes(corpus_store, output, stored)


def test_a_filter_selects_studies_series_and_instances_once_each(
    corpus_store: FileLayoutStore, tmp_path: Path
) -> None:
    filter_file, selected = a_filter(corpus_store, tmp_path)
    output = tmp_path / "out"

    run = run_export(
        f"--store={corpus_store.root}",
        f"--output={output}",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "dl",
    )

    assert run.status == 0
    assert run.summary["selected"] == run.summary["success"] == run.summary["files_written"] == len(selected)
    assert exported(output) == selected
    assert_same_bytes(corpus_store, output, selected)
    again = run_export(
        f"--store={corpus_store.root}",
        f"--output={output}",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "dl",
    )
    assert again.summary == run.summary
    assert exported(output) == selected
    assert_same_bytes(corpus_store, output, selected)


def test_local_to_gcs_and_gcs_to_gcs_copies_without_bytes_through_the_worker(
    corpus_store: FileLayoutStore, tmp_path: Path, gcs: storage.Client
) -> None:
    filter_file, selected = a_filter(corpus_store, tmp_path)
    upload_tree(gcs, Path(corpus_store.root), "export-source", "store/")
    gcs.create_bucket("export-target")
    upload_tree(gcs, tmp_path, "export-source", "filters/")  # the filter file too, from gs://

    to_gcs = run_export(
        f"--store={corpus_store.root}",
        "--output=gs://export-target/from-local",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "a",
    )
    within_gcs = run_export(
        "--store=gs://export-source/store",
        "--output=gs://export-target/from-gcs",
        "--filter_file=gs://export-source/filters/filter.txt",
        dead_letter=tmp_path / "b",
    )

    for run, prefix in ((to_gcs, "from-local"), (within_gcs, "from-gcs")):
        assert (run.status, run.summary["success"]) == (0, len(selected))
        blobs = {b.name: b for b in gcs.list_blobs("export-target", prefix=f"{prefix}/")}
        expected = {f"{prefix}/{r.study}/{r.series}/{r.sop}.dcm": r for r in selected}
        assert set(blobs) == set(expected)
        for name, ref in expected.items():
            assert blobs[name].download_as_bytes() == corpus_store.read(ref)
    assert to_gcs.summary["bytes_through_worker"] > 0
    assert within_gcs.summary["bytes_through_worker"] == 0


def test_a_dicomweb_store_exports_what_qido_finds_for_the_filter(orthanc: Orthanc, tmp_path: Path) -> None:
    local = FileLayoutStore(str(tmp_path / "local"))
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={local.root}", dead_letter=tmp_path / "a")
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "b")
    filter_file, selected = a_filter(local, tmp_path)

    run = run_export(
        f"--store={orthanc.dicomweb}",
        f"--output={tmp_path / 'out'}",
        f"--filter_file={filter_file}",
        dead_letter=tmp_path / "c",
    )

    assert (run.status, run.summary["success"]) == (0, len(selected))
    assert exported(tmp_path / "out") == selected
    assert_same_bytes(local, tmp_path / "out", selected)  # Orthanc keeps files as stored


def test_lines_that_match_nothing_are_dead_letters_and_the_rest_is_exported(
    corpus_store: FileLayoutStore, tmp_path: Path
) -> None:
    some = sorted(refs(corpus_store))[0]
    (tmp_path / "filter.txt").write_text(
        f"/studies/{some.study}/series/{some.series}/instances/{some.sop}\n"
        "/studies/9.9.9\n"
        f"/studies/{some.study}/series/9.9\n"
        f"/studies/{some.study}/series/{some.series}/instances/9.9.9.9\n"
    )

    run = run_export(
        f"--store={corpus_store.root}",
        f"--output={tmp_path / 'out'}",
        f"--filter_file={tmp_path / 'filter.txt'}",
        dead_letter=tmp_path / "dl",
    )

    assert run.status == 3
    assert (run.summary["success"], run.summary["failure"], run.summary["unmatched_targets"]) == (1, 1, 2)
    assert run.reasons() == {
        "/studies/9.9.9": "no_match",
        f"/studies/{some.study}/series/9.9": "no_match",
        f"/studies/{some.study}/series/{some.series}/instances/9.9.9.9": "not_found",
    }
    assert exported(tmp_path / "out") == {some}


@pytest.mark.parametrize(
    ("content", "option", "words"),
    [
        ("/studies/1.2\n/studies/1.2/series/x\n", "--filter_file", "filter file line 2: 'x' is not a UID"),
        ("/studies/1.2\n\n/series/1.2\n", "--filter_file", "filter file line 3:"),
        ("\n  \n", "--filter_file", "names no study, series or instance"),
    ],
)
def test_a_bad_filter_file_stops_before_any_work(
    corpus_store: FileLayoutStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    option: str,
    words: str,
) -> None:
    (tmp_path / "filter.txt").write_text(content)

    run = run_export(
        f"--store={corpus_store.root}",
        f"--output={tmp_path / 'out'}",
        f"--filter_file={tmp_path / 'filter.txt'}",
        dead_letter=tmp_path / "dl",
    )

    [line] = capsys.readouterr().err.strip().splitlines()
    assert run.status == 2 and run.stdout == ""
    assert line.startswith(f"error: {option}: ") and words in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--output=OUTFILE"], "--output", "is a file, not a directory"),
        (["--output=out", "--file_type=tiff"], "--file_type", "not one of dicom, octet-stream, jpeg, png"),
        (["--output=out", "--file_type=image/tiff"], "--file_type", "application/dicom, application/octet"),
        (["--output=out", "--transfer_syntax=1.2.3"], "--transfer_syntax", "is not * or one of"),
        (["--output=out", "--quality=50"], "--quality", "applies to a lossy --transfer_syntax only"),
        (
            ["--output=out", "--transfer_syntax=1.2.840.10008.1.2.4.90", "--quality=50"],
            "--quality",
            "1.2.840.10008.1.2.4.50 (jpeg-baseline), 1.2.840.10008.1.2.4.91 (jpeg-2000)",
        ),
        (
            ["--output=out", f"--transfer_syntax={JPEG_BASELINE}", "--quality=0"],
            "--quality",
            "between 1",
        ),
        (
            ["--output=out", f"--transfer_syntax={JPEG_2000}", "--quality=101"],
            "--quality",
            "and 100",
        ),
        (
            ["--output=out", f"--transfer_syntax={JPEG_BASELINE}", "--quality=high"],
            "--quality",
            "whole number",
        ),
        (
            ["--output=out", "--file_type=png", "--transfer_syntax=1.2.840.10008.1.2.1"],
            "--transfer_syntax",
            "dicom",
        ),
        (["--output=out", "--filter_file=missing.txt"], "--filter_file", "cannot read"),
        ([], "--output", "required"),
    ],
)
def test_bad_options_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str, words: str
) -> None:
    (tmp_path / "OUTFILE").write_text("a file, not a directory")
    (tmp_path / "store").mkdir()
    args = [
        arg.replace("OUTFILE", str(tmp_path / "OUTFILE")).replace("=out", f"={tmp_path}/out") for arg in args
    ]
    args = [arg.replace("missing.txt", str(tmp_path / "missing.txt")) for arg in args]

    run = run_export(f"--store={tmp_path / 'store'}", *args, dead_letter=tmp_path / "dl")

    [line] = capsys.readouterr().err.strip().splitlines()
    assert run.status == 2
    assert line.startswith(f"error: {option}: ") and words in line


def decoded(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data)).pixel_array


def test_transcoded_exports_decode_to_the_same_pixels(tmp_path: Path) -> None:
    """OpenJPEG refuses images under 32 pixels (the sample's 16x16 series), so those are left out."""
    store = FileLayoutStore(str(tmp_path / "store"))
    inputs = ["ct/CT_small.dcm", "mr/MR_small.dcm", "other/*.dcm", "rt/rtdose.dcm"]
    run_import(
        *(f"--input={SAMPLE}/{name}" for name in inputs), f"--store={store.root}", dead_letter=tmp_path / "a"
    )
    images = {ref for ref in refs(store) if "PixelData" in pydicom.dcmread(io.BytesIO(store.read(ref)))}

    for syntax in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"):
        output = tmp_path / syntax
        run = run_export(
            f"--store={store.root}",
            f"--output={output}",
            f"--transfer_syntax={syntax}",
            dead_letter=tmp_path / "b",
        )
        refused = {record["uri"] for record in run.dead_letters}
        assert {record["reason"] for record in run.dead_letters} <= {"cannot_convert"}
        assert len(refused) <= 2, run.dead_letters  # the codecs refuse 1-bit and 32-bit pixels
        for ref in images:
            if ref.path() in refused:
                continue
            data = (output / ref.study / ref.series / f"{ref.sop}.dcm").read_bytes()
            assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
            assert np.array_equal(decoded(data), decoded(store.read(ref))), (syntax, ref)


def tree(output: Path) -> dict[str, bytes]:
    return {str(path.relative_to(output)): path.read_bytes() for path in output.rglob("*") if path.is_file()}


def test_mime_types_are_read_as_the_file_types(tmp_path: Path) -> None:
    for mime, short in MIME_TYPES.items():
        options = export_dicom.PIPELINE.parse(
            [f"--store={tmp_path}", f"--output={tmp_path / 'out'}", f"--file_type={mime}"]
        )
        assert options.view_as(EtlOptions).file_type == short


@pytest.mark.parametrize(
    ("short", "mime", "more"),
    [("dicom", "application/dicom", ["--transfer_syntax=*"]), ("jpeg", "image/jpeg", [])],
)
def test_mime_types_write_the_same_files(
    tmp_path: Path, short: str, mime: str, more: list[str], sample_store: FileLayoutStore
) -> None:
    """`*`, as the default, keeps every instance byte for byte as stored."""
    runs = {
        name: run_export(
            f"--store={sample_store.root}",
            f"--output={tmp_path / name.replace('/', '_')}",
            f"--file_type={name}",
            *more,
            dead_letter=tmp_path / "dl",
        )
        for name in (short, mime)
    }
    assert runs[short].summary == runs[mime].summary and runs[short].summary["files_written"] > 0
    assert tree(tmp_path / short) == tree(tmp_path / mime.replace("/", "_"))
    if short == "dicom":
        assert runs[mime].status == 0
        assert_same_bytes(sample_store, tmp_path / mime.replace("/", "_"), refs(sample_store))


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> FileLayoutStore:
    """The sample data (16-bit CT and MR, 8-bit RLE colour, a 16-bit JPEG 2000, 1- and 32-bit
    pixels, an SR and an RT plan) and an 8-bit grey image."""
    root = tmp_path_factory.mktemp("sample_store")
    grey = get_testdata_file("image_dfl.dcm")  # deflated, 512x512
    run = run_import(
        f"--input={SAMPLE}/**.dcm", f"--input={grey}", f"--store={root}/store", dead_letter=root / "dl"
    )
    assert run.status == 0
    return FileLayoutStore(str(root / "store"))


def psnr(source: np.ndarray, result: np.ndarray, bits: int) -> float:
    mse = float(np.mean((source.astype(np.float64) - result.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10((2**bits - 1) ** 2 / mse)


@pytest.mark.parametrize(
    ("syntax", "decoded_by"),
    [(JPEG_BASELINE, "dcmdjpeg"), (JPEG_2000, "pydicom")],
    ids=["jpeg-baseline", "jpeg-2000"],
)
def test_lossy_exports_are_new_instances_named_by_their_uid(
    tmp_path: Path, sample_store: FileLayoutStore, syntax: str, decoded_by: str
) -> None:
    """Each image the syntax encodes becomes a new instance, `{new SOP}.dcm`, that references its
    source and decodes (with dcmtk's dcmdjpeg for JPEG Baseline) close to it; JPEG Baseline refuses
    every image but the 8-bit ones as cannot_convert, JPEG 2000 images under 32 pixels a side and
    1- and 32-bit pixels; instances without pixels, or already in the syntax, are copied as stored."""
    output = tmp_path / "out"
    run = run_export(
        f"--store={sample_store.root}",
        f"--output={output}",
        f"--transfer_syntax={syntax}",
        dead_letter=tmp_path / "dl",
    )

    sources = {ref: pydicom.dcmread(io.BytesIO(sample_store.read(ref))) for ref in refs(sample_store)}
    refused = {record["uri"]: record for record in run.dead_letters}
    assert run.status == 3 and {record["reason"] for record in refused.values()} == {"cannot_convert"}
    assert run.summary["success"] == run.summary["files_written"] == len(sources) - len(refused)
    written = {path.name: path for path in output.rglob("*.dcm")}
    assert len(written) == run.summary["files_written"]
    eight_bit = {ref for ref, ds in sources.items() if ds.get("BitsAllocated") == 8}
    assert len(eight_bit) == 2 and not {ref.path() for ref in eight_bit} & set(refused)
    if syntax == JPEG_BASELINE:
        images = {ref for ref, ds in sources.items() if "PixelData" in ds}
        assert set(refused) == {ref.path() for ref in images - eight_bit}
    for ref, source in sources.items():
        if ref.path() in refused:
            assert source.get("BitsAllocated") != 8
            if syntax.endswith(".50"):
                assert (
                    "JPEG Baseline encodes 8-bit unsigned grey or RGB pixels" in refused[ref.path()]["detail"]
                )
            continue
        if "PixelData" not in source or source.file_meta.TransferSyntaxUID == syntax:  # as stored
            assert (output / ref.study / ref.series / f"{ref.sop}.dcm").is_file()
            continue
        [path] = [path for path in written.values() if source_of(path) == ref.sop]
        result = pydicom.dcmread(path)
        assert path == output / ref.study / ref.series / f"{result.SOPInstanceUID}.dcm"
        assert result.SOPInstanceUID != ref.sop and result.file_meta.TransferSyntaxUID == syntax
        dump = subprocess.run(
            ["dcmdump", "+P", "0028,2110", "+P", "0028,2114", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "[01]" in dump and ("ISO_10918_1" if syntax.endswith(".50") else "ISO_15444_1") in dump, dump
        pixels = decoded_with(decoded_by, path, tmp_path)
        value = psnr(source.pixel_array, pixels, int(source.BitsStored))
        print(f"{syntax} {source.get('PhotometricInterpretation')}: {value:.1f} dB ({decoded_by})")
        assert value >= 30


def source_of(path: Path) -> str:
    """The SOP Instance UID a lossy export's file says it was made from (none: a file as stored)."""
    sources = pydicom.dcmread(path, stop_before_pixels=True).get("SourceImageSequence") or [Dataset()]
    return sources[-1].get("ReferencedSOPInstanceUID")


def decoded_with(decoder: str, path: Path, tmp_path: Path) -> np.ndarray:
    if decoder == "pydicom":
        return pydicom.dcmread(path).pixel_array
    native = tmp_path / f"{path.stem}-native.dcm"
    subprocess.run([decoder, str(path), str(native)], check=True, capture_output=True)  # YBR to RGB too
    return pydicom.dcmread(native).pixel_array


def test_images_are_one_file_per_frame_and_instances_without_pixels_are_dead_letters(tmp_path: Path) -> None:
    store = FileLayoutStore(str(tmp_path / "store"))
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={store.root}", dead_letter=tmp_path / "a")

    run = run_export(
        f"--store={store.root}", f"--output={tmp_path / 'png'}", "--file_type=png", dead_letter=tmp_path / "b"
    )

    datasets = {
        ref: pydicom.dcmread(io.BytesIO(store.read(ref)), stop_before_pixels=True) for ref in refs(store)
    }
    without = {ref for ref, ds in datasets.items() if "Rows" not in ds}
    assert run.status == 3
    assert run.reasons() == {ref.path(): "no_pixel_data" for ref in without}
    for ref, ds in datasets.items():
        if ref in without:
            continue
        count = int(ds.get("NumberOfFrames", 1) or 1)
        names = [f"{ref.sop}.png"] if count == 1 else [f"{ref.sop}_{n:04d}.png" for n in range(1, count + 1)]
        for name in names:
            with Image.open(tmp_path / "png" / ref.study / ref.series / name) as image:
                assert image.size == (ds.Columns, ds.Rows)
    assert run.summary["files_written"] == sum(
        int(ds.get("NumberOfFrames", 1) or 1) for ref, ds in datasets.items() if ref not in without
    )


def test_an_empty_store_exports_nothing_and_still_creates_the_output(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run: Run = run_export(
        f"--store={tmp_path / 'empty'}", f"--output={tmp_path / 'out'}", dead_letter=tmp_path / "dl"
    )
    assert run.status == 0
    assert run.summary["selected"] == 0 and (tmp_path / "out").is_dir()
