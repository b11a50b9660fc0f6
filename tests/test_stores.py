"""The store interface behaves the same on every kind of store: write, list, read, metadata, delete."""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from dicomlib.header import data_set_digest, read_header
from dicomlib.stow_response import parse_stow_response
from dicomlib.uids import InstanceRef
from storage.multipart import MultipartBody
from storage.objects import MatchedFile, open_ranged
from storage.store import ALREADY_PRESENT, FAILURE, SUCCESS, Parsed, Store, StoreUnavailable
from storage.stores import open_store
from tests.healthcare_server import STORE
from tests.orthanc_server import Orthanc

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def data_set(part10: bytes) -> str:
    """A digest of the data set, the file meta group (which servers may rewrite) aside."""
    return data_set_digest(io.BytesIO(part10))


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
        assert data_set(store.read(item.ref)) == data_set(Path(item.file.uri).read_bytes())


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
    assert data_set(store.read(ct.ref)) == data_set(Path(ct.file.uri).read_bytes())


def moved(item: Parsed, target: Path, **uids: str) -> Parsed:
    """The same instance (same SOP Instance UID) filed under another study or series."""
    dataset = pydicom.dcmread(item.file.uri)
    for keyword, value in uids.items():
        setattr(dataset, keyword, value)
    dataset.save_as(target)
    return parsed(target)


def test_the_sop_instance_uid_alone_identifies_an_instance(
    store: Store, sample: list[Parsed], tmp_path: Path
) -> None:
    ct = next(item for item in sample if item.file.uri.endswith("CT_small.dcm"))
    elsewhere = [
        moved(ct, tmp_path / "study.dcm", StudyInstanceUID="1.2.826.0.1.3680043.99.1"),
        moved(ct, tmp_path / "series.dcm", SeriesInstanceUID="1.2.826.0.1.3680043.99.2"),
    ]
    store.write([ct])

    results = store.write(elsewhere)

    assert [(r.outcome, r.reason) for r in results] == [(FAILURE, "conflict")] * 2
    assert all(ct.ref.path() in r.detail for r in results)
    assert {ref for study in store.studies() for ref in store.instances(study)} == {ct.ref}


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_racing_writers_of_one_sop_instance_uid_store_it_once(
    kind: str, sample: list[Parsed], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight writers (threads here; workers or runs alike) store one SOP Instance UID filed under
    eight studies at once: the create-only claim lets exactly one of them store it."""
    ct = next(item for item in sample if item.file.uri.endswith("CT_small.dcm"))
    rivals = [
        moved(ct, tmp_path / f"{n}.dcm", StudyInstanceUID=f"1.2.826.0.1.3680043.98.{n}") for n in range(8)
    ]
    if kind == "gcs":
        request.getfixturevalue("gcs").create_bucket("race")
        location = "gs://race/store"
    else:
        location = str(tmp_path / "store")
    stores = [open_store(location) for _ in rivals]
    with concurrent.futures.ThreadPoolExecutor(len(rivals)) as pool:
        results = list(pool.map(lambda pair: pair[0].write([pair[1]])[0], zip(stores, rivals, strict=True)))

    assert sorted(r.reason for r in results) == [""] + ["conflict"] * 7
    winner = rivals[[r.outcome for r in results].index(SUCCESS)]
    assert [ref for study in stores[0].studies() for ref in stores[0].instances(study)] == [winner.ref]


def test_deleting_an_instance_frees_its_uid_for_another_study(
    store: Store, sample: list[Parsed], tmp_path: Path
) -> None:
    if "dicom-web" in store.location:  # Orthanc's DICOMweb plugin has no DELETE (HTTP 405)
        return
    ct = next(item for item in sample if item.file.uri.endswith("CT_small.dcm"))
    refiled = moved(ct, tmp_path / "refiled.dcm", StudyInstanceUID="1.2.826.0.1.3680043.99.3")
    store.write([ct])
    store.delete(ct.ref.study)

    [result] = store.write([refiled])

    assert result.outcome == SUCCESS
    assert list(store.instances(refiled.ref.study)) == [refiled.ref]


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


def test_orthanc_answers_stow_rs_in_xml_as_well_as_json(orthanc: Orthanc, tmp_path: Path) -> None:
    ct, text = SAMPLE / "ct" / "CT_small.dcm", tmp_path / "text.dcm"
    text.write_bytes(b"not DICOM at all")
    stream = MultipartBody([MatchedFile(str(path), path.stat().st_size) for path in (ct, text)])
    body, content_type = stream.read(), stream.content_type
    sop = pydicom.dcmread(ct).SOPInstanceUID

    for accept in ("application/dicom+json", "application/dicom+xml"):
        response = requests.post(
            f"{orthanc.dicomweb}/studies",
            data=body,
            headers={"Content-Type": content_type, "Accept": accept},
            auth=orthanc.auth,
            timeout=30,
        )
        assert parse_stow_response(response.content) == ({sop}, {}), accept
