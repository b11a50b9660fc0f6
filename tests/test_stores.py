"""The store interface behaves the same on every kind of store: write, list, read, metadata, delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from tests.healthcare_server import STORE
from tests.orthanc_server import Orthanc
from transforms.dicom_header import read_header
from transforms.dicomweb import data_set_bytes, multipart, parse_stow_response
from transforms.objects import MatchedFile, open_ranged
from transforms.store import (
    ALREADY_PRESENT,
    FAILURE,
    SUCCESS,
    InstanceRef,
    Parsed,
    Store,
    StoreUnavailable,
    open_store,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def parsed(path: Path) -> Parsed:
    file = MatchedFile(str(path), path.stat().st_size)
    with open_ranged(file) as stream:
        header = read_header(stream, file.size)
    return Parsed(file, InstanceRef(header.study_uid, header.series_uid, header.sop_uid))


@pytest.fixture(scope="module")
def sample() -> list[Parsed]:
    return [parsed(path) for path in sorted(SAMPLE.rglob("*.dcm"))]


@pytest.fixture(params=["local", "gcs", "orthanc", "healthcare"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store of each kind (the Healthcare API's is the stand-in of tests/healthcare_server.py)."""
    if request.param == "local":
        location = str(tmp_path / "store")
    elif request.param == "gcs":
        client = request.getfixturevalue("gcs")
        bucket = f"store-{abs(hash(tmp_path)) % 10**8}"
        client.create_bucket(bucket)
        location = f"gs://{bucket}/stores/one"
    elif request.param == "orthanc":
        location = request.getfixturevalue("orthanc").dicomweb
    else:
        request.getfixturevalue("healthcare")
        location = STORE
    store = open_store(location)
    yield store
    store.close()


def test_written_instances_are_listed_by_study_and_series_and_read_back(
    store: Store, sample: list[Parsed]
) -> None:
    results = store.write(sample)

    assert [written.outcome for written in results] == [SUCCESS] * len(sample)
    assert set(store.studies()) == {item.ref.study for item in sample}
    for study in {item.ref.study for item in sample}:
        assert set(store.instances(study)) == {item.ref for item in sample if item.ref.study == study}
    one = sample[0]
    assert list(store.instances(one.ref.study, one.ref.series)) == [
        item.ref for item in sample if item.ref.series == one.ref.series
    ]
    for item in sample:
        assert data_set_bytes(store.read(item.ref)) == data_set_bytes(Path(item.file.uri).read_bytes())


def test_metadata_is_dicom_json_without_the_pixels(store: Store, sample: list[Parsed]) -> None:
    ct = next(item for item in sample if item.file.uri.endswith("CT_small.dcm"))
    store.write([ct])

    metadata = store.metadata(ct.ref)

    assert metadata["00080018"] == {"vr": "UI", "Value": [ct.ref.sop]}
    assert metadata["00100010"]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]
    assert "InlineBinary" not in metadata.get("7FE00010", {})  # absent, or a BulkDataURI


def test_writing_again_finds_the_same_data_present_and_different_data_a_conflict(
    store: Store, sample: list[Parsed], tmp_path: Path
) -> None:
    ct = next(item for item in sample if item.file.uri.endswith("CT_small.dcm"))
    changed = tmp_path / "changed.dcm"
    dataset = pydicom.dcmread(ct.file.uri)
    dataset.PatientName = "Someone^Else"
    dataset.save_as(changed)
    store.write([ct])

    same, other = store.write([ct]) + store.write([parsed(changed)])

    assert same.outcome == ALREADY_PRESENT
    assert (other.outcome, other.reason) == (FAILURE, "conflict")
    assert data_set_bytes(store.read(ct.ref)) == data_set_bytes(Path(ct.file.uri).read_bytes())


def test_deleting_an_instance_a_series_and_a_study(store: Store, sample: list[Parsed]) -> None:
    store.write(sample)
    refs = {item.ref for item in sample}
    first = max(refs, key=lambda ref: sum(other.study == ref.study for other in refs))
    if "dicom-web" in store.location:  # Orthanc's DICOMweb plugin has no DELETE (HTTP 405)
        with pytest.raises(StoreUnavailable, match="does not support DELETE"):
            store.delete(first.study, first.series, first.sop)
        return

    store.delete(first.study, first.series, first.sop)
    refs.remove(first)
    assert set(store.instances(first.study)) == {ref for ref in refs if ref.study == first.study}
    store.delete(first.study, first.series)
    refs = {ref for ref in refs if ref.series != first.series}
    assert set(store.instances(first.study)) == {ref for ref in refs if ref.study == first.study}
    store.delete(first.study)
    store.delete(first.study)  # already gone: not an error
    refs = {ref for ref in refs if ref.study != first.study}
    assert {ref for study in store.studies() for ref in store.instances(study)} == refs


def test_orthanc_answers_stow_rs_in_xml_as_well_as_json(orthanc: Orthanc) -> None:
    data = (SAMPLE / "ct" / "CT_small.dcm").read_bytes()
    body, content_type = multipart([data, b"not DICOM at all"])
    sop = pydicom.dcmread(SAMPLE / "ct" / "CT_small.dcm").SOPInstanceUID

    for accept in ("application/dicom+json", "application/dicom+xml"):
        response = requests.post(
            f"{orthanc.dicomweb}/studies",
            data=body,
            headers={"Content-Type": content_type, "Accept": accept},
            auth=orthanc.auth,
            timeout=30,
        )
        assert parse_stow_response(response) == ({sop}, {}), accept
