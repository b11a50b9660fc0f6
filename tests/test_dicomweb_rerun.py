"""Re-running an import into a DICOMweb store: present instances are compared by reading their series
whole, a request a series instead of one an instance, and the verdicts stay exact (a changed
attribute or a changed pixel byte under the same UIDs is a conflict)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomlib.header import DataSetDigester, data_set_digest
from storage.multipart import split_parts
from storage.store import ALREADY_PRESENT, SUCCESS
from storage.stores import open_store
from tests.conftest import run_import
from tests.fault_proxy import FaultProxy
from tests.healthcare_server import STORE, HealthcareApi
from tests.orthanc_server import Orthanc
from tests.test_stores import parsed

CT = Path(__file__).resolve().parents[1] / "sample" / "ct" / "CT_small.dcm"


def make_series(folder: Path, series: int, each: int) -> list[Path]:
    """`series` series of `each` instances (CT_small.dcm with fresh UIDs), one file each."""
    folder.mkdir(parents=True)
    dataset = pydicom.dcmread(CT)
    study = generate_uid()
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for number in range(series):
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, generate_uid()
            for index in range(each):
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                dataset.InstanceNumber = index + 1
                path = folder / f"{number}-{index:03d}.dcm"
                dataset.save_as(path)
                paths.append(path)
    return paths


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def ref(path: Path) -> str:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return f"/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}/instances/{sop(path)}"


def change_name(path: Path) -> None:
    dataset = pydicom.dcmread(path)
    dataset.PatientName = "Someone^Else"
    dataset.save_as(path)


def change_a_pixel(path: Path) -> None:
    dataset = pydicom.dcmread(path)
    pixels = bytearray(dataset.PixelData)
    pixels[len(pixels) // 2] ^= 0x01
    dataset.PixelData = bytes(pixels)
    dataset.save_as(path)


def test_a_rerun_reads_each_series_once_and_finds_exactly_the_changed_instances_conflicts(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = make_series(tmp_path / "inbox", series=4, each=50)
    first = run_import(
        f"--input={tmp_path}/inbox/*.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "a"
    )
    named, pixel = paths[10], paths[120]
    change_name(named)
    change_a_pixel(pixel)

    with FaultProxy(orthanc.rest) as proxy:
        again = run_import(
            f"--input={tmp_path}/inbox/*.dcm", f"--store={proxy.url}/dicom-web", dead_letter=tmp_path / "b"
        )
        requests = [(request.method, request.path.split("?")[0]) for request in proxy.requests]

    assert (first.status, first.summary["success"]) == (0, 200)
    assert again.status == 3
    assert (again.summary["already_present"], again.summary["success"]) == (198, 0)
    assert again.reasons() == {str(named): "conflict", str(pixel): "conflict"}
    assert orthanc.instance_count() == 200
    assert len(requests) <= 0.1 * 200  # a QIDO-RS query a batch, the size and the reading of each series
    assert not [path for method, path in requests if method == "POST"]
    read_alone = {path.rsplit("/", 1)[-1] for _, path in requests if "/instances/" in path}
    assert read_alone == {sop(named), sop(pixel)}  # each conflict confirmed by the instance itself
    series_read = [
        path for _, path in requests if path.endswith(tuple("0123456789")) and "/instances/" not in path
    ]
    assert len(series_read) == 4


def test_a_few_instances_of_a_large_stored_series_are_read_alone_not_the_series(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = make_series(tmp_path / "inbox", series=1, each=60)
    run_import(f"--input={tmp_path}/inbox/*.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "a")
    few = tmp_path / "few"
    few.mkdir()
    for path in paths[:2]:
        (few / path.name).write_bytes(path.read_bytes())

    with FaultProxy(orthanc.rest) as proxy:
        again = run_import(
            f"--input={few}/*.dcm", f"--store={proxy.url}/dicom-web", dead_letter=tmp_path / "b"
        )
        gets = [request.path.split("?")[0] for request in proxy.requests if request.method == "GET"]

    assert (again.status, again.summary["already_present"]) == (0, 2)
    assert len([path for path in gets if "/instances/" in path]) == 2  # 2 of 60: each alone
    assert not [path for path in gets if path.endswith(tuple("0123456789")) and "/instances/" not in path]


def test_a_rerun_into_the_healthcare_api_lists_and_reads_each_series_once(
    healthcare: HealthcareApi, tmp_path: Path
) -> None:
    paths = make_series(tmp_path / "inbox", series=2, each=30)
    run_import(f"--input={tmp_path}/inbox/*.dcm", f"--store={STORE}", dead_letter=tmp_path / "a")
    change_a_pixel(paths[40])
    before = len(healthcare.dicomweb("GET"))

    again = run_import(f"--input={tmp_path}/inbox/*.dcm", f"--store={STORE}", dead_letter=tmp_path / "b")

    gets = [seen.path for seen in healthcare.dicomweb("GET")[before:]]
    assert (again.summary["already_present"], again.summary["success"]) == (59, 0)
    assert again.reasons() == {str(paths[40]): "conflict"}
    assert len(gets) == 2 + 2 + 1  # each series listed, then read whole; the conflict read alone
    assert [path for path in gets if "/instances/" in path] == [f"/v1/{STORE}/dicomWeb{ref(paths[40])}"]
    assert len(healthcare.dicomweb("POST")) == 1  # the first run's STOW-RS only


def test_a_series_spread_one_instance_a_batch_is_read_whole_once_enough_of_it_was_asked_for(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """As on a distributed runner, where the shuffle on the SOP Instance UID scatters each series."""
    paths = make_series(tmp_path / "inbox", series=3, each=8)
    items = [parsed(path) for path in paths]
    by_series = [items[number * 8 : (number + 1) * 8] for number in range(3)]
    assert {result.outcome for result in open_store(orthanc.dicomweb).write(items)} == {SUCCESS}

    with FaultProxy(orthanc.rest) as proxy:
        store = open_store(f"{proxy.url}/dicom-web")
        outcomes, made = [], []
        for batch in zip(*by_series, strict=True):  # one instance of each series a batch
            before = len(proxy.requests)
            outcomes += [result.outcome for result in store.write(list(batch))]
            made.append([request.path.split("?")[0] for request in proxy.requests[before:]])
        store.close()

    assert outcomes == [ALREADY_PRESENT] * 24
    assert len(made[0]) == 1 + 3  # the query; each asked about once: read alone
    assert len(made[1]) == 1 + 3 + 3  # the query; each series' size, then each read whole
    assert len([path for path in made[1] if path.endswith("/series")]) == 3
    assert len([path for path in made[1] if path.endswith(tuple("0123456789"))]) == 3
    assert not [path for path in made[1] if "/instances/" in path]
    assert made[2:] == [[]] * 6  # found in the series read: no query, no read


@pytest.mark.parametrize("size", [1, 5, 131, 133, 4096])
def test_a_digest_fed_piece_by_piece_is_the_digest_of_the_whole_file(size: int) -> None:
    for path in [CT, *sorted(CT.parent.parent.rglob("*.dcm"))[:4]]:
        data = path.read_bytes()
        digester = DataSetDigester()
        for start in range(0, len(data), size):
            digester.update(data[start : start + size])

        assert digester.result() == (sop(path), data_set_digest(io.BytesIO(data)))
    short = DataSetDigester()
    short.update(b"not DICOM")
    assert short.result() == (None, data_set_digest(io.BytesIO(b"not DICOM")))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_multipart_parts_are_split_byte_exact_whatever_the_chunks(size: int) -> None:
    boundary = "b0undary"
    payloads = [b"", b"\r\n--b0undar", b"x" * 300 + b"\r\n--b0undaR\r\n-", bytes(range(256))]
    body = b""
    for payload in payloads:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + payload + b"\r\n"
    body += f"--{boundary}--\r\nepilogue".encode()

    class Sink:
        def __init__(self) -> None:
            self.parts: list[io.BytesIO] = []

        def begin(self) -> None:
            self.parts.append(io.BytesIO())

        def write(self, data: bytes) -> None:
            self.parts[-1].write(data)

        def end(self) -> None:
            pass

    sink = Sink()
    chunks = (body[start : start + size] for start in range(0, len(body), size))
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'

    assert split_parts(chunks, content_type, sink) == len(payloads)
    assert [part.getvalue() for part in sink.parts] == payloads
    with pytest.raises(ValueError, match="closing delimiter"):
        split_parts(iter([body[: len(body) // 2]]), content_type, Sink())
