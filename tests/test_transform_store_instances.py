"""ParseInstances and WriteInstances, each alone in a TestPipeline: every way a file can leave them
(the main output or the dead letter) and the counters the run's summary is made of, against real
stores: a file-layout store on disk or in the GCS emulator, Orthanc, the Healthcare API stand-in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
import requests
from google.cloud import storage as gcs_storage

from dicomlib.uids import InstanceRef
from storage import objects
from storage.file_store import FileLayoutStore
from storage.objects import MatchedFile
from storage.store import SUCCESS, Parsed
from tests.beam_support import (
    CT,
    MR,
    SAMPLE,
    closed_port_url,
    counters,
    expect_outputs,
    filled_store,
    keyed,
    letters,
    matched,
    new_pipeline,
    parsed,
    quick_retries,
    ref_of,
    run,
    variant,
    with_other_preamble,
)
from tests.conftest import stored_instances
from tests.fault_proxy import Fault, FaultProxy
from tests.healthcare_server import STORE, HealthcareApi
from tests.orthanc_server import Orthanc
from tests.synthetic import fresh_copies
from transforms.dead_letter import DEAD_LETTER
from transforms.store_instances import MAX_BATCH_INSTANCES, ParseInstances, WriteInstances

STOW = ("POST", "/dicom-web/studies")


def parse(files: list[MatchedFile]) -> tuple[beam.Pipeline, Any]:
    pipeline = new_pipeline()
    outputs = (
        pipeline | beam.Create(files) | beam.ParDo(ParseInstances()).with_outputs(DEAD_LETTER, main="parsed")
    )
    return pipeline, outputs


def write(
    location: str, elements: list[tuple[str, list[Parsed]]], **options: Any
) -> tuple[beam.Pipeline, Any]:
    pipeline = new_pipeline()
    outputs = (
        pipeline
        | beam.Create(elements)
        | beam.ParDo(WriteInstances(location, **options)).with_outputs(DEAD_LETTER, main="stored")
    )
    return pipeline, outputs


def record(item: Parsed, location: str, outcome: str, repeated: bool = False) -> dict[str, Any]:
    """What WriteInstances yields for a file it stored or found stored."""
    return {
        "uri": item.file.uri,
        "location": location,
        "outcome": outcome,
        "size": item.file.size,
        "study_uid": item.ref.study,
        "series_uid": item.ref.series,
        "sop_uid": item.ref.sop,
        "repeated": repeated,
    }


def in_layout(root: Path | str, ref: InstanceRef) -> str:
    """Where the README's file layout puts an instance."""
    return f"{root}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}.dcm"


def posts(proxy: FaultProxy) -> list:
    return [r for r in proxy.requests if (r.method, r.path) == STOW]


# ParseInstances


def test_parse_instances_keys_each_file_by_its_sop_instance_uid_and_counts_the_bytes_read() -> None:
    files = sorted(SAMPLE.rglob("*.dcm"))
    pipeline, outputs = parse([matched(path) for path in files])

    expected = [(ref_of(path).sop, parsed(path)) for path in files]
    expect_outputs(outputs.parsed, letters(outputs), expected, [])
    result = run(pipeline)

    assert counters(result) == {"bytes_read": sum(path.stat().st_size for path in files)}


def test_parse_instances_sends_each_unreadable_or_invalid_file_to_the_dead_letter(tmp_path: Path) -> None:
    """Not DICOM, cut short, a UID missing or unusable as a path, or gone since it was listed: each
    is one counted dead letter of the parse stage, and the good file still goes on."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 40)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(CT.read_bytes()[:20_000])  # inside Pixel Data
    hostile = variant(MR, tmp_path / "hostile.dcm", SOPInstanceUID="1.2..3")
    no_sop = tmp_path / "no-sop.dcm"  # its SOP Instance UID element retagged (0008,0019)
    no_sop.write_bytes(MR.read_bytes().replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x19\x00UI"))
    gone = MatchedFile(str(tmp_path / "gone.dcm"), 2048)  # listed, then removed
    files = [matched(text), matched(cut), matched(hostile), matched(no_sop), gone, matched(MR)]
    pipeline, outputs = parse(files)

    expected = [
        (str(text), "parse", "not_dicom"),
        (str(cut), "parse", "truncated"),
        (str(hostile), "parse", "invalid_uid"),
        (str(no_sop), "parse", "missing_uid"),
        (gone.uri, "parse", "read_error"),
    ]
    expect_outputs(outputs.parsed, letters(outputs), [(ref_of(MR).sop, parsed(MR))], expected)
    result = run(pipeline)

    assert counters(result)["failure"] == 5


# WriteInstances on a file-layout store


def test_write_instances_stores_each_instance_and_records_where_it_went(tmp_path: Path) -> None:
    store = tmp_path / "store"
    files = sorted(SAMPLE.rglob("*.dcm"))
    pipeline, outputs = write(str(store), keyed(files))

    expected = [record(parsed(path), in_layout(store, ref_of(path)), "success") for path in files]
    expect_outputs(outputs.stored, letters(outputs), expected, [])
    result = run(pipeline)

    assert counters(result) == {"success": 19, "bytes_stored": sum(path.stat().st_size for path in files)}
    stored = stored_instances(store)
    assert {sop: path.read_bytes() for sop, path in stored.items()} == {
        ref_of(path).sop: path.read_bytes() for path in files
    }


def test_write_instances_finds_what_the_store_holds_already_present_and_stores_nothing(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    files = sorted(SAMPLE.rglob("*.dcm"))
    filled_store(store, files)
    pipeline, outputs = write(str(store), keyed(files))

    expected = [record(parsed(path), in_layout(store, ref_of(path)), "already_present") for path in files]
    expect_outputs(outputs.stored, letters(outputs), expected, [])
    result = run(pipeline)

    assert counters(result) == {"already_present": 19}  # no bytes stored
    assert len(stored_instances(store)) == 19


def test_write_instances_writes_files_sharing_a_sop_instance_uid_one_after_the_other(tmp_path: Path) -> None:
    """The first file (by name) is stored; a later one with the same bytes is `already_present`
    and marked `repeated`, one with other bytes is a conflict; the store keeps the first."""
    store = tmp_path / "store"
    first_ct = tmp_path / "in" / "1-ct.dcm"
    first_ct.parent.mkdir()
    shutil.copy(CT, first_ct)
    again_ct = shutil.copy(CT, tmp_path / "in" / "2-ct.dcm")
    first_mr = Path(shutil.copy(MR, tmp_path / "in" / "1-mr.dcm"))
    changed_mr = variant(MR, tmp_path / "in" / "2-mr.dcm", PatientName="Someone^Else")
    elements = [
        (ref_of(CT).sop, [parsed(Path(again_ct)), parsed(first_ct)]),
        (ref_of(MR).sop, [parsed(changed_mr), parsed(first_mr)]),
    ]
    pipeline, outputs = write(str(store), elements)

    expected = [
        record(parsed(first_ct), in_layout(store, ref_of(CT)), "success"),
        record(parsed(Path(again_ct)), in_layout(store, ref_of(CT)), "already_present", True),
        record(parsed(first_mr), in_layout(store, ref_of(MR)), "success"),
    ]
    expect_outputs(outputs.stored, letters(outputs), expected, [(str(changed_mr), "store", "conflict")])
    result = run(pipeline)

    sizes = CT.stat().st_size + MR.stat().st_size
    assert counters(result) == {"success": 2, "already_present": 1, "failure": 1, "bytes_stored": sizes}
    stored = stored_instances(store)
    assert stored[ref_of(MR).sop].read_bytes() == MR.read_bytes()


def test_write_instances_finds_a_sop_instance_uid_stored_under_another_study_a_conflict(
    tmp_path: Path,
) -> None:
    """The SOP Instance UID alone names an instance: filed again under another study, it is a
    conflict naming where the store holds it, and nothing is stored twice."""
    store = tmp_path / "store"
    filled_store(store, [CT])
    moved = variant(CT, tmp_path / "moved.dcm", StudyInstanceUID="1.2.826.0.1.3680043.2.1125.1")
    pipeline, outputs = write(str(store), keyed([moved]))

    held = ref_of(CT).path()
    names_it = outputs[DEAD_LETTER] | beam.Map(lambda r: (r["uri"], r["reason"], held in r["detail"]))
    expect_outputs(outputs.stored, names_it, [], [(str(moved), "conflict", True)])
    result = run(pipeline)

    assert counters(result) == {"failure": 1}
    assert list(stored_instances(store)) == [ref_of(CT).sop]


def test_write_instances_dead_letters_a_file_removed_after_parsing_and_leaves_no_claim(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    source = Path(shutil.copy(CT, tmp_path / "ct.dcm"))
    elements = keyed([source])
    source.unlink()
    pipeline, outputs = write(str(store), elements)

    expect_outputs(outputs.stored, letters(outputs), [], [(str(source), "store", "write_error")])
    result = run(pipeline)

    assert counters(result) == {"failure": 1}
    assert stored_instances(store) == {}  # no index entry left claiming the UID
    shutil.copy(CT, source)
    assert [w.outcome for w in FileLayoutStore(str(store)).write(elements[0][1])] == [SUCCESS]


# WriteInstances on a DICOMweb store (Orthanc, through the fault proxy)


def test_write_instances_sends_at_most_max_batch_instances_in_one_stow_request(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    files = fresh_copies(MR, MAX_BATCH_INSTANCES + 3, tmp_path / "in")
    with FaultProxy(orthanc.rest) as proxy:
        pipeline, outputs = write(f"{proxy.url}/dicom-web", keyed(files))
        outcomes = outputs.stored | beam.Map(lambda r: r["outcome"])
        expect_outputs(outcomes, letters(outputs), [SUCCESS] * len(files), [])
        result = run(pipeline)

    assert len(posts(proxy)) == 2  # MAX_BATCH_INSTANCES, then 3
    assert counters(result)["success"] == len(files)
    assert orthanc.instance_count() == len(files)


def test_write_instances_splits_a_batch_the_server_refuses_as_too_large(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """413 for a batch of several instances: the halves are sent, and their halves, until each
    request fits; every instance is stored once."""
    files = fresh_copies(CT, 8, tmp_path / "in")  # 39 KB each: two fit in 100 KB, four do not
    limit = 100_000
    with FaultProxy(orthanc.rest, max_body=limit) as proxy:
        pipeline, outputs = write(f"{proxy.url}/dicom-web", keyed(files))
        expected = [record(parsed(f), f"{proxy.url}/dicom-web{ref_of(f).path()}", "success") for f in files]
        expect_outputs(outputs.stored, letters(outputs), expected, [])
        result = run(pipeline)

    refused = [r.size for r in posts(proxy) if r.fault == Fault.status(413)]
    forwarded = [r.size for r in posts(proxy) if r.fault is None]
    assert len(refused) == 3 and min(refused) > limit  # eight instances, then each half of four
    assert len(forwarded) == 4 and max(forwarded) <= limit  # four requests of two
    assert counters(result) == {"success": 8, "bytes_stored": 8 * CT.stat().st_size}
    assert orthanc.sop_instance_uids() == {ref_of(f).sop for f in files}


def test_write_instances_rejects_an_instance_too_large_for_the_server_even_alone(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """413 for one instance alone is the server's refusal of it: a `rejected` dead letter; the
    rest of its batch is stored."""
    small = fresh_copies(MR, 3, tmp_path / "in")  # 10 KB each
    with FaultProxy(orthanc.rest, max_body=20_000) as proxy:
        pipeline, outputs = write(f"{proxy.url}/dicom-web", keyed([CT, *small]))
        expect_outputs(
            outputs.stored | beam.Map(lambda r: (r["uri"], r["outcome"])),
            outputs[DEAD_LETTER]
            | beam.Map(lambda r: (r["uri"], r["reason"], r["detail"].startswith("HTTP 413"))),
            [(str(path), SUCCESS) for path in small],
            [(str(CT), "rejected", True)],
        )
        result = run(pipeline)

    assert counters(result)["success"] == 3 and counters(result)["failure"] == 1
    assert orthanc.sop_instance_uids() == {ref_of(path).sop for path in small}


def test_write_instances_retries_a_stow_answered_503_or_429_and_stores_each_instance_once(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    files = sorted(SAMPLE.glob("mr/98892003/*.dcm"))
    faults = [Fault.status(503), Fault.status(429, retry_after=0)]
    with FaultProxy(orthanc.rest, faults, when=lambda method, _: method == "POST") as proxy:
        pipeline, outputs = write(f"{proxy.url}/dicom-web", keyed(files))
        outcomes = outputs.stored | beam.Map(lambda r: r["outcome"])
        expect_outputs(outcomes, letters(outputs), [SUCCESS] * len(files), [])
        result = run(pipeline)

    assert [r.fault for r in posts(proxy)] == [*faults, None]
    assert counters(result)["success"] == len(files)
    assert orthanc.instance_count() == len(files)


def test_write_instances_leaves_write_errors_to_retry_when_the_server_keeps_failing(
    orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5xx after every retry is not the instances' fault: `write_error` (worth a re-run), never
    `rejected`."""
    quick_retries(monkeypatch)
    files = sorted(SAMPLE.glob("mr/98892003/*.dcm"))[:3]
    faults = [Fault.status(503)] * 100
    with FaultProxy(orthanc.rest, faults, when=lambda method, _: method == "POST") as proxy:
        pipeline, outputs = write(f"{proxy.url}/dicom-web", keyed(files))
        expect_outputs(
            outputs.stored,
            outputs[DEAD_LETTER]
            | beam.Map(lambda r: (r["uri"], r["reason"], r["detail"].startswith("HTTP 503"))),
            [],
            [(str(path), "write_error", True) for path in files],
        )
        result = run(pipeline)

    assert counters(result) == {"failure": len(files)}
    assert orthanc.instance_count() == 0


def test_write_instances_stops_the_run_when_the_store_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable store fails every instance alike: the run stops with one line naming the
    store, rather than dead-lettering everything."""
    quick_retries(monkeypatch)
    location = closed_port_url()
    pipeline, outputs = write(location, keyed([CT, MR]))

    with pytest.raises(Exception, match=f"cannot reach the DICOMweb store {location}: .*Connection refused"):
        run(pipeline)


# A concurrent writer storing the same instance first


@pytest.mark.parametrize(
    ("theirs", "outcome"), [("same data set", "already_present"), ("changed data set", "conflict")]
)
def test_write_instances_compares_with_what_a_concurrent_writer_stored_during_its_stow(
    healthcare: HealthcareApi, tmp_path: Path, theirs: str, outcome: str
) -> None:
    """The Healthcare API answers 409 for a UID it holds with other bytes: the instance another
    writer stored between our check and our STOW-RS is read back and compared."""
    if theirs == "same data set":
        other = with_other_preamble(CT, tmp_path / "theirs.dcm")  # other bytes, the same data set
    else:
        other = variant(CT, tmp_path / "theirs.dcm", PatientName="Someone^Else")

    def other_writer() -> None:
        healthcare.before_stow = None
        healthcare.add(other.read_bytes())

    healthcare.before_stow = other_writer
    pipeline, outputs = write(STORE, keyed([CT, MR]))

    location = f"{healthcare.root}/{STORE}/dicomWeb"
    stored = [record(parsed(MR), location + ref_of(MR).path(), SUCCESS)]
    if outcome == "already_present":
        stored.append(record(parsed(CT), location + ref_of(CT).path(), outcome))
    conflicts = [(str(CT), "store", "conflict")] if outcome == "conflict" else []
    expect_outputs(outputs.stored, letters(outputs), stored, conflicts)
    result = run(pipeline)

    assert counters(result).get("failure" if outcome == "conflict" else outcome) == 1
    assert healthcare.instances[ref_of(CT).sop].data == other.read_bytes()  # theirs, untouched


@pytest.fixture
def gcs_behind_proxy(gcs: gcs_storage.Client, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The GCS emulator reached through a fault proxy (its `before` hook set by the test)."""
    with FaultProxy(os.environ["STORAGE_EMULATOR_HOST"]) as proxy:  # where the gcs fixture put it
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        objects.gcs_client.cache_clear()
        try:
            yield proxy
        finally:
            objects.gcs_client.cache_clear()


@pytest.mark.parametrize(
    ("theirs", "outcome"), [("same bytes", "already_present"), ("other bytes", "conflict")]
)
def test_write_instances_loses_the_race_for_the_object_to_a_concurrent_writer_gracefully(
    gcs: gcs_storage.Client, gcs_behind_proxy: FaultProxy, tmp_path: Path, theirs: str, outcome: str
) -> None:
    """A file-layout store in GCS: another writer of the same instance (which found our claim on
    the UID, and no object yet) uploads it just before our create-only upload lands. Ours then
    compares with theirs, and the store holds theirs, once."""
    bucket = f"race-{outcome.replace('_', '-')}"
    gcs.create_bucket(bucket)
    location = f"gs://{bucket}/store"
    other = Path(shutil.copy(CT, tmp_path / "theirs.dcm"))
    if theirs == "other bytes":
        other = variant(CT, other, PatientName="Someone^Else")
    sop = ref_of(CT).sop
    theirs_written, ours = [], []

    def other_writer(method: str, path: str, body: bytes) -> None:
        """Once, at our upload of the instance (theirs passes through here too)."""
        if method == "POST" and f"/instances/{sop}.dcm".encode() in body:
            gcs_behind_proxy.before = None
            ours.append(gcs_behind_proxy.requests[-1])
            theirs_written.extend(FileLayoutStore(location).write([parsed(other)]))

    gcs_behind_proxy.before = other_writer
    pipeline, outputs = write(location, keyed([CT]))

    target = in_layout(location, ref_of(CT))
    if outcome == "already_present":
        expect_outputs(outputs.stored, letters(outputs), [record(parsed(CT), target, outcome)], [])
    else:
        expect_outputs(outputs.stored, letters(outputs), [], [(str(CT), "store", "conflict")])
    result = run(pipeline)

    assert [written.outcome for written in theirs_written] == [SUCCESS]
    assert [request.upstream_status for request in ours] == [412]  # ours came second: create-only
    assert counters(result).get("failure" if outcome == "conflict" else outcome) == 1
    blobs = {blob.name: blob for blob in gcs.list_blobs(bucket)}
    assert blobs[target.removeprefix(f"gs://{bucket}/")].download_as_bytes() == other.read_bytes()
    assert sum(name.endswith(".dcm") for name in blobs) == 1


def test_write_instances_reports_a_conflict_when_a_concurrent_writer_stored_other_data_during_its_stow(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Orthanc keeps the instance it holds and answers STOW-RS success for a changed one: another
    writer's changed copy landing between our QIDO-RS check and our STOW-RS must still make ours
    a conflict (even with --verify_stored), not a success the store does not hold."""
    theirs = variant(CT, tmp_path / "theirs.dcm", PatientName="Someone^Else")

    def other_writer(method: str, path: str, body: bytes) -> None:
        if (method, path) == ("POST", "/dicom-web/studies"):
            proxy.before = None
            requests.post(
                f"{orthanc.rest}/instances", data=theirs.read_bytes(), auth=orthanc.auth, timeout=30
            ).raise_for_status()

    with FaultProxy(orthanc.rest, before=other_writer) as proxy:
        pipeline = new_pipeline()
        outputs = (
            pipeline
            | beam.Create(keyed([CT, MR]))
            | beam.ParDo(WriteInstances(f"{proxy.url}/dicom-web", verify_stored=True)).with_outputs(
                DEAD_LETTER, main="stored"
            )
        )
        expect_outputs(
            outputs.stored | beam.Map(lambda r: (r["uri"], r["outcome"])),
            outputs[DEAD_LETTER] | beam.Map(lambda r: (r["uri"], r["reason"])),
            [(str(MR), "success")],
            [(str(CT), "conflict")],
        )
        run(pipeline)
