"""The Cloud Healthcare API store against a stand-in that behaves as the API is documented and
reported to behave (tests/healthcare_server.py): single-value QIDO matching, 409/0x0110 for a UID held
with other data, Google's JSON error bodies, the paging caps, storage classes, long-running operations
and per-minute quotas, through the import, export and delete pipelines."""

from __future__ import annotations

import io
import json
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from dicomlib.stow_response import Failed, stow_answer
from dicomlib.uids import InstanceRef
from storage import dicomweb_client, healthcare_api
from storage.healthcare_api import ListingTooLarge
from storage.store import BlobInfo
from storage.stores import open_store
from tests.conftest import run_export, run_import
from tests.healthcare_server import (
    REJECTED_PATIENT_ID,
    STORE,
    TOKEN,
    HealthcareApi,
    running_healthcare_api,
)
from tests.orthanc_server import Orthanc
from tests.test_delete import run_delete

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
SOURCES = sorted(SAMPLE.rglob("*.dcm"))
CT = SAMPLE / "ct" / "CT_small.dcm"


def variant(source: Path, **changes: str) -> bytes:
    """The file with some attributes changed (UIDs included), as Part 10 bytes."""
    dataset = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in changes.items():
            setattr(dataset, keyword, value)
    out = io.BytesIO()
    dataset.save_as(out)
    return out.getvalue()


def inbox(tmp_path: Path, files: dict[str, bytes] | None = None, leave_out: Path | None = None) -> Path:
    """A directory holding the sample's files (flattened) but `leave_out`, plus `files` by name."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    for number, path in enumerate(SOURCES):
        if path != leave_out:
            (folder / f"{number:02d}.dcm").write_bytes(path.read_bytes())
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return folder


def refused() -> bytes:
    """An instance the stand-in refuses (FailureReason 0xA900), as a server may refuse any."""
    return variant(CT, PatientID=REJECTED_PATIENT_ID, SOPInstanceUID=pydicom.uid.generate_uid())


def uids(seen_query: str) -> list[str]:
    return urllib.parse.parse_qs(seen_query).get("SOPInstanceUID", [])


@pytest.fixture(params=["v1", "v1beta1"])
def versioned(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    with running_healthcare_api(tmp_path, request.param) as (api, environment):
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        yield api


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries as the store makes them, with backoff short enough for a test."""
    monkeypatch.setattr(dicomweb_client, "THROTTLE_BACKOFF", 0.01)
    monkeypatch.setattr(dicomweb_client, "BACKOFF", 0.01)


# The stand-in itself


def test_the_stand_in_answers_as_the_api_is_documented(healthcare: HealthcareApi) -> None:
    base = f"{healthcare.root}/{STORE}/dicomWeb"
    auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
    original, changed = CT.read_bytes(), variant(CT, PatientName="Someone^Else")
    sop = pydicom.dcmread(CT).SOPInstanceUID

    def stow(data: bytes) -> requests.Response:
        headers = auth | {"Content-Type": "application/dicom"}
        return requests.post(f"{base}/studies", data=data, headers=headers, timeout=10)

    def qido(query: str, level: str = "instances") -> requests.Response:
        return requests.get(f"{base}/{level}?{query}", headers=auth, timeout=10)

    first, again, other = stow(original), stow(original), stow(changed)
    assert (first.status_code, again.status_code, other.status_code) == (200, 200, 409)
    assert stow_answer(again.content) == ({sop}, {})
    detail = f"an instance with SOPInstanceUID {sop} already exists with different content"
    assert stow_answer(other.content) == (set(), {sop: Failed(0x0110, detail)})
    assert len(qido(f"SOPInstanceUID={sop}").json()) == 1
    assert qido(f"SOPInstanceUID={sop},1.2.3").json() == []  # a list is one literal value
    repeated = qido(f"SOPInstanceUID={sop}&SOPInstanceUID=1.2.3")
    assert repeated.status_code == 400 and repeated.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert qido("limit=5000", "studies").ok and qido("limit=50000").ok
    assert [qido("limit=5001", "studies").status_code, qido("offset=1000001").status_code] == [400, 400]
    healthcare.fail_next(1, 429, retry_after=7)
    throttled = qido("")
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "7")
    assert throttled.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert stow_answer(throttled.content) is None  # an error body is no STOW-RS answer


def test_the_apis_xml_failure_answer_is_read_with_its_failure_detail() -> None:
    """The shape of the answer reported in dcmjs-org/dcmjs#249 (FailureDetail under creator GOOGLE)."""
    answer = requests.Response()
    answer.status_code = 409
    answer._content = (
        b'<NativeDicomModel><DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">'
        b'<Item number="1"><DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID">'
        b'<Value number="1">1.2.3.4</Value></DicomAttribute>'
        b'<DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">272</Value>'
        b'</DicomAttribute><DicomAttribute tag="00090097" vr="LT" keyword="FailureDetail" '
        b'privateCreator="GOOGLE"><Value number="1">already exists</Value></DicomAttribute></Item>'
        b"</DicomAttribute></NativeDicomModel>"
    )

    assert stow_answer(answer.content) == (set(), {"1.2.3.4": Failed(0x0110, "already exists")})


# Importing


def test_import_stores_with_the_bearer_token_and_makes_the_storage_class_the_one_asked_for(
    versioned: HealthcareApi, tmp_path: Path
) -> None:
    """v1 documents no Storage-Class header (the stand-in ignores it there): the store finds that
    out from the first instance and sets the class of each; v1beta1 applies the header."""
    folder = inbox(tmp_path, {"refused.dcm": refused()})
    versioned.polls_until_done = 1  # setBlobStorageSettings operations are done when first asked

    run = run_import(
        f"--input={folder}/*.dcm", f"--store={STORE}", "--storage_class=nearline", dead_letter=tmp_path / "dl"
    )

    assert (run.status, run.summary["success"], run.summary["failure"]) == (3, len(SOURCES), 1)
    (letter,) = run.dead_letters
    assert (letter["uri"], letter["reason"]) == (str(folder / "refused.dcm"), "rejected")
    assert letter["detail"] == "FailureReason 0xa900 (data set does not match SOP class), HTTP 202"
    assert len(versioned.instances) == len(SOURCES)
    assert {instance.storage_class for instance in versioned.instances.values()} == {"NEARLINE"}
    stows = [seen for seen in versioned.dicomweb("POST") if seen.path.endswith("/dicomWeb/studies")]
    assert stows and all(seen.headers["storage-class"] == "NEARLINE" for seen in stows)
    settings = [seen for seen in versioned.dicomweb("POST") if seen.path.endswith(":setBlobStorageSettings")]
    asked = [seen for seen in versioned.dicomweb("GET") if seen.path.endswith(":getStorageInfo")]
    assert (len(settings), len(asked)) == ((len(SOURCES), 1) if versioned.version == "v1" else (0, 1))
    assert all(
        seen.headers["authorization"] == f"Bearer {TOKEN}" for seen in versioned.dicomweb("GET") + stows
    )
    assert any(seen.path == "/token" and seen.method == "POST" for seen in versioned.requests)
    assert TOKEN not in run.stdout + json.dumps(run.dead_letters)


def test_a_reimport_is_already_present_found_by_listing_each_series_once_per_batch(
    healthcare: HealthcareApi, tmp_path: Path
) -> None:
    folder = inbox(tmp_path)
    first = run_import(f"--input={folder}/*.dcm", f"--store={STORE}", dead_letter=tmp_path / "a")
    stows, first_gets = len(healthcare.dicomweb("POST")), healthcare.dicomweb("GET")

    again = run_import(f"--input={folder}/*.dcm", f"--store={STORE}", dead_letter=tmp_path / "b")

    assert (first.status, first.summary["success"]) == (0, len(SOURCES))
    assert (again.status, again.summary["already_present"], again.summary["success"]) == (0, len(SOURCES), 0)
    assert len(healthcare.dicomweb("POST")) == stows  # nothing sent twice
    gets = [seen.path for seen in healthcare.dicomweb("GET")[len(first_gets) :]]
    listings = [path for path in gets if path.endswith("/instances")]  # the rest read instances back
    series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in folder.glob("*.dcm")}
    assert all("/series/" in path for path in listings)  # a series' instances: no UID list query
    assert len(listings) == len(series)  # one batch: each series listed once


@pytest.mark.parametrize("arrives", ["before the run", "during the STOW-RS"])
def test_a_changed_instance_in_a_batch_of_new_ones_is_one_conflict_and_the_rest_are_stored(
    healthcare: HealthcareApi, tmp_path: Path, arrives: str
) -> None:
    """Another writer stored the original: QIDO-RS finds it before the batch is sent, or the
    API answers 409 with FailureReason 0x0110; either way the compare step says `conflict`."""
    original = CT.read_bytes()
    folder = inbox(tmp_path, {"changed.dcm": variant(CT, PatientName="Someone^Else")}, leave_out=CT)
    sop = pydicom.dcmread(CT).SOPInstanceUID
    if arrives == "before the run":
        healthcare.add(original)
    else:

        def other_writer() -> None:
            healthcare.before_stow = None
            healthcare.add(original)

        healthcare.before_stow = other_writer

    run = run_import(f"--input={folder}/*.dcm", f"--store={STORE}", dead_letter=tmp_path / "dl")

    assert run.status == 3
    assert (run.summary["success"], run.summary["failure"]) == (len(SOURCES) - 1, 1)
    (letter,) = run.dead_letters
    assert (letter["uri"], letter["reason"]) == (str(folder / "changed.dcm"), "conflict")
    if arrives == "during the STOW-RS":
        assert letter["detail"].endswith(
            f"(STOW-RS: FailureReason 0x0110 (processing failure): an instance with SOPInstanceUID {sop} "
            "already exists with different content, HTTP 202)"
        )
    assert healthcare.instances[sop].data == original
    assert len(healthcare.instances) == len(SOURCES)


def test_verify_stored_rejects_nothing_that_was_stored(healthcare: HealthcareApi, tmp_path: Path) -> None:
    folder = inbox(tmp_path, {"refused.dcm": refused()})

    run = run_import(
        f"--input={folder}/*.dcm", f"--store={STORE}", "--verify_stored", dead_letter=tmp_path / "dl"
    )

    assert (run.status, run.summary["success"], run.summary["failure"]) == (3, len(SOURCES), 1)
    assert run.reasons() == {str(folder / "refused.dcm"): "rejected"}
    assert "FailureReason 0xa900" in run.dead_letters[0]["detail"]


def test_a_429_storm_is_waited_out_and_every_instance_stored(
    healthcare: HealthcareApi, tmp_path: Path, quick_retries: None
) -> None:
    healthcare.fail_next(3, 429, method="POST", retry_after=1)

    run = run_import(f"--input={SAMPLE}/**.dcm", f"--store={STORE}", dead_letter=tmp_path / "dl")

    assert (run.status, run.summary["success"], run.dead_letters) == (0, len(SOURCES), [])
    assert healthcare.failures == []  # all three were answered, and retried
    assert len(healthcare.instances) == len(SOURCES)


@pytest.mark.parametrize("status", [429, 503])
def test_a_storm_that_outlasts_the_retries_leaves_write_errors_to_retry_never_rejections(
    healthcare: HealthcareApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    quick_retries: None,
    status: int,
) -> None:
    monkeypatch.setattr(dicomweb_client, "THROTTLE_ATTEMPTS", 2)
    monkeypatch.setattr(dicomweb_client, "STATUS_RETRIES", 2)
    healthcare.fail_next(1000, status, method="POST")

    run = run_import(f"--input={SAMPLE}/**.dcm", f"--store={STORE}", dead_letter=tmp_path / "a")
    healthcare.failures.clear()
    again = run_import(f"--input={SAMPLE}/**.dcm", f"--store={STORE}", dead_letter=tmp_path / "b")

    assert (run.status, run.summary["failure"]) == (3, len(SOURCES))
    assert set(run.reasons().values()) == {"write_error"}
    assert all(letter["detail"].startswith(f"HTTP {status} ") for letter in run.dead_letters)
    assert (again.status, again.summary["success"]) == (0, len(SOURCES))


def test_requests_in_flight_stay_within_the_cap_of_each_worker(
    healthcare: HealthcareApi, tmp_path: Path
) -> None:
    healthcare.latency = 0.02  # so that concurrent requests overlap

    run = run_import(
        f"--input={SAMPLE}/**.dcm",
        f"--store={STORE}",
        "--max_requests_in_flight=2",
        "--verify_stored",
        dead_letter=tmp_path / "dl",
    )

    assert (run.status, run.summary["success"]) == (0, len(SOURCES))
    assert 1 <= healthcare.most_in_flight <= 2


# Listing within the paging limits


def synthetic(study: str, series: str, sop: str, date: str) -> bytes:
    return variant(CT, StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, StudyDate=date)


@pytest.fixture
def small_caps(healthcare: HealthcareApi, monkeypatch: pytest.MonkeyPatch) -> HealthcareApi:
    """The documented caps, shrunk: offset at most 6, at most 4 results a page, on both sides."""
    healthcare.max_offset = 6
    healthcare.max_limit = {"studies": 4, "series": 4, "instances": 4}
    monkeypatch.setattr(healthcare_api, "MAX_OFFSET", 6)
    monkeypatch.setattr(healthcare_api, "MAX_LIMIT", dict(healthcare.max_limit))
    monkeypatch.setattr(healthcare_api, "PAGE", 4)
    return healthcare


def test_a_store_too_large_to_page_through_is_listed_in_parts_and_exported_whole(
    small_caps: HealthcareApi, tmp_path: Path
) -> None:
    """21 studies (over the offset cap) over six days, one of them holding 9 instances in 3 series."""
    held = []
    for day in range(1, 6):
        for number in range(4):
            held.append(
                small_caps.add(
                    synthetic(
                        f"1.2.{day}.{number}",
                        f"1.2.{day}.{number}.1",
                        f"1.2.{day}.{number}.1.1",
                        f"2020010{day}",
                    )
                )
            )
    for series in range(3):
        for sop in range(3):
            held.append(small_caps.add(synthetic("1.3", f"1.3.{series}", f"1.3.{series}.{sop}", "20200106")))

    run = run_export(f"--store={STORE}", f"--output={tmp_path / 'out'}", dead_letter=tmp_path / "dl")

    assert (run.status, run.summary["selected"], run.summary["success"]) == (0, len(held), len(held))
    for instance in held:
        path = tmp_path / "out" / instance.study / instance.series / f"{instance.sop}.dcm"
        assert path.read_bytes() == instance.data
    searches = [
        urllib.parse.parse_qs(seen.query) for seen in small_caps.dicomweb("GET") if "limit=" in seen.query
    ]
    assert max(int(query["offset"][0]) for query in searches) <= 6
    assert any("StudyDate" in query for query in searches)


def test_what_cannot_be_split_within_the_caps_stops_the_run_with_one_line(
    small_caps: HealthcareApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for number in range(7):  # seven studies on one day: more than the offset cap
        small_caps.add(synthetic(f"1.4.{number}", f"1.4.{number}.1", f"1.4.{number}.1.1", "20200101"))
    for sop in range(7):  # seven instances in one series
        small_caps.add(synthetic("1.5", "1.5.1", f"1.5.1.{sop}", "20200102"))

    run = run_export(f"--store={STORE}", f"--output={tmp_path / 'out'}", dead_letter=tmp_path / "dl")
    with pytest.raises(ListingTooLarge, match="studies/1.5/series/1.5.1/instances: more than 6 results"):
        list(open_store(STORE).instances("1.5"))

    assert run.status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: the pipeline failed: {small_caps.root}/{STORE}/dicomWeb/studies: more than 6 studies dated "
        "20200101; QIDO-RS cannot list them (name them in a filter file)"
    )


# Storage information and long-running operations


def test_blob_info_is_what_get_storage_info_reports_and_nothing_on_a_plain_dicomweb_server(
    healthcare: HealthcareApi, orthanc: Orthanc
) -> None:
    instance = healthcare.add(CT.read_bytes(), "COLDLINE")
    ref = InstanceRef(instance.study, instance.series, instance.sop)

    assert open_store(STORE).blob_info(ref) == BlobInfo(len(instance.data), "COLDLINE")
    with pytest.raises(FileNotFoundError):
        open_store(STORE).blob_info(InstanceRef(instance.study, instance.series, "1.2.3"))
    assert open_store(orthanc.dicomweb).blob_info(ref) == BlobInfo(None, None)


def test_deleting_a_study_polls_its_operation_through_retries_and_a_token_refresh(
    healthcare: HealthcareApi, tmp_path: Path, quick_retries: None
) -> None:
    kept, doomed = healthcare.add(CT.read_bytes()), healthcare.add(synthetic("1.6", "1.6.1", "1.6.1.1", ""))
    for status in (503, 401, 429):
        healthcare.fail_next(1, status, method="GET", path="/operations/")

    run = run_delete(f"--store={STORE}", f"--target=/studies/{doomed.study}", dead_letter=tmp_path / "dl")

    assert (run.status, run.summary["success"]) == (0, 1)
    assert list(healthcare.instances) == [kept.sop]
    assert healthcare.failures == []
    assert list(healthcare.operations.values()) == [2]  # polled until done
    assert sum(seen.path == "/token" for seen in healthcare.requests) == 2  # refreshed after the 401


def test_an_operation_that_never_finishes_fails_its_targets_at_the_deadline(
    healthcare: HealthcareApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dicomweb_client, "OPERATION_DEADLINE", 1.0)
    healthcare.polls_until_done = None
    doomed = healthcare.add(CT.read_bytes())

    run = run_delete(f"--store={STORE}", f"--target=/studies/{doomed.study}", dead_letter=tmp_path / "dl")

    assert (run.status, run.summary["failure"]) == (3, 1)
    (letter,) = run.dead_letters
    assert letter["reason"] == "delete_error"
    assert letter["detail"].endswith("not done after 1 s")
