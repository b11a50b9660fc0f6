"""RowsFromStore, RowsOfImported and WithoutCurrentRow alone in a TestPipeline: the CREATE rows they
make, and each way a row cannot be made (an instance missing or unreadable in the store, a store
whose metadata or storage info keeps failing, an imported file changed or gone since it was stored,
a store that cannot be reached)."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

import apache_beam as beam
import pydicom
import pytest
from apache_beam.testing.util import assert_that, equal_to

from dicomlib.flatten import flatten
from dicomlib.uids import InstanceRef
from schemas.rows import Flat, delete_row, with_event
from storage.staging import SPOOL_ROOT
from tests.beam_support import (
    CT,
    MR,
    SAMPLE,
    closed_port_url,
    counters,
    expect_outputs,
    filled_store,
    letters,
    new_pipeline,
    orthanc_store,
    parsed,
    quick_retries,
    ref_of,
    run,
)
from tests.fault_proxy import Fault, FaultProxy
from tests.healthcare_server import STORE, HealthcareApi
from tests.orthanc_server import Orthanc
from transforms.dead_letter import DEAD_LETTER
from transforms.metadata_rows import RowsFromStore, RowsOfImported, WithoutCurrentRow
from transforms.write_metadata import WriteMetadata

SERIES = sorted(SAMPLE.glob("ct/77654033/*.dcm"))  # one CT series of four
ABSENT = "1.2.826.0.1.3680043.2.1125.404"


def rows_of(dofn: beam.DoFn, elements: list[Any]) -> tuple[beam.Pipeline, Any]:
    pipeline = new_pipeline()
    outputs = pipeline | beam.Create(elements) | beam.ParDo(dofn).with_outputs(DEAD_LETTER, main="rows")
    return pipeline, outputs


def summary(flat: Flat) -> tuple:
    """What a test can expect of a row: its instance, event, stored size and class, and a name."""
    row = flat.row
    return (
        row["SOPInstanceUID"],
        row["Type"],
        row.get("BlobStorageSize"),
        row.get("StorageClass"),
        "PatientName" in row,
    )


def stored_record(path: Path, uri: Path | None = None) -> dict[str, Any]:
    """The record WriteInstances yields for a file it stored (its uri: where the file was read)."""
    item = parsed(path)
    return {
        "uri": str(uri or path),
        "location": "",
        "outcome": "success",
        "size": item.file.size,
        "study_uid": item.ref.study,
        "series_uid": item.ref.series,
        "sop_uid": item.ref.sop,
        "repeated": False,
    }


def in_layout(root: str, ref: InstanceRef) -> Path:
    return Path(f"{root}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}.dcm")


# RowsFromStore


def test_rows_from_store_reads_each_stored_header_and_dead_letters_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    """A row per instance with the stored file's size and no excluded VR; an instance the store
    lacks is `not_found`, a stored file that no longer parses keeps its parser's reason."""
    store = filled_store(tmp_path / "store", [CT, MR, SERIES[0]])
    broken = ref_of(SERIES[0])
    stored = in_layout(store.location, broken)
    stored.write_bytes(b"\0" * stored.stat().st_size)  # damaged on disk since it was stored
    missing = InstanceRef(ref_of(CT).study, ref_of(CT).series, ABSENT)
    refs = [ref_of(CT), ref_of(MR), broken, missing]
    pipeline, outputs = rows_of(RowsFromStore(store.location, ["PN"]), refs)

    expected = [(ref_of(path).sop, "CREATE", path.stat().st_size, None, False) for path in (CT, MR)]
    letters_expected = [(broken.path(), "read", "not_dicom"), (missing.path(), "read", "not_found")]
    expect_outputs(outputs.rows | beam.Map(summary), letters(outputs), expected, letters_expected)
    result = run(pipeline)

    assert counters(result) == {"success": 2, "failure": 2}


def test_rows_from_store_dead_letters_an_instance_whose_metadata_the_server_keeps_failing(
    orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WADO-RS metadata answered 503 after every retry is a `read_error`; the other instance's
    row comes from its metadata (a DICOMweb store tells no stored size or class)."""
    quick_retries(monkeypatch)
    for path in (CT, MR):
        orthanc_store(orthanc, path)
    failing = ref_of(CT)
    faults = [Fault.status(503)] * 50
    with FaultProxy(
        orthanc.rest, faults, when=lambda method, path: f"{failing.sop}/metadata" in path
    ) as proxy:
        pipeline, outputs = rows_of(RowsFromStore(f"{proxy.url}/dicom-web", []), [failing, ref_of(MR)])
        expect_outputs(
            outputs.rows | beam.Map(summary),
            outputs[DEAD_LETTER] | beam.Map(lambda r: (r["uri"], r["reason"], "HTTP 503" in r["detail"])),
            [(ref_of(MR).sop, "CREATE", None, None, True)],
            [(failing.path(), "read_error", True)],
        )
        result = run(pipeline)

    assert counters(result) == {"success": 1, "failure": 1}


def test_rows_from_a_store_that_cannot_be_reached_stop_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    quick_retries(monkeypatch)
    location = closed_port_url()
    pipeline, _ = rows_of(RowsFromStore(location, []), [ref_of(MR)])

    with pytest.raises(Exception, match=f"cannot reach the DICOMweb store {location}: .*Connection refused"):
        run(pipeline)


# RowsOfImported


def test_rows_of_imported_reads_each_imported_file_and_takes_size_and_class_from_the_store(
    tmp_path: Path,
) -> None:
    """The row comes from the file that was imported, its size from the stored object; a local
    store has no storage class, so the one given is used."""
    store = filled_store(tmp_path / "store", [CT, MR])
    pipeline, outputs = rows_of(
        RowsOfImported(store.location, ["PN"], "NEARLINE"), [stored_record(CT), stored_record(MR)]
    )

    expected = [(ref_of(path).sop, "CREATE", path.stat().st_size, "NEARLINE", False) for path in (CT, MR)]
    expect_outputs(outputs.rows | beam.Map(summary), letters(outputs), expected, [])
    result = run(pipeline)

    assert counters(result) == {}  # rows are counted where they are written (WriteMetadata)


def test_rows_of_imported_dead_letters_a_file_changed_or_removed_since_it_was_stored(tmp_path: Path) -> None:
    """Each is a `metadata` dead letter, counted as a metadata failure (the run then exits 3):
    a file overwritten since, a file removed since, an instance no longer in the store."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    changed, removed = Path(shutil.copy(CT, inbox / "ct.dcm")), Path(shutil.copy(MR, inbox / "mr.dcm"))
    store = filled_store(tmp_path / "store", [changed, removed])
    changed.write_bytes(b"\0" * changed.stat().st_size)
    removed.unlink()
    records = [stored_record(CT, changed), stored_record(MR, removed), stored_record(SERIES[0])]
    pipeline, outputs = rows_of(RowsOfImported(store.location, [], None), records)

    expected = [
        (str(changed), "metadata", "not_dicom"),
        (str(removed), "metadata", "read_error"),
        (str(SERIES[0]), "metadata", "read_error"),  # read, but the store does not hold it
    ]
    expect_outputs(outputs.rows, letters(outputs), [], expected)
    result = run(pipeline)

    assert counters(result) == {"metadata_failures": 3}


def test_rows_of_imported_asks_the_healthcare_api_for_size_and_class_and_dead_letters_its_failures(
    healthcare: HealthcareApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick_retries(monkeypatch)
    healthcare.add(CT.read_bytes(), "COLDLINE")
    healthcare.add(MR.read_bytes())
    healthcare.fail_next(100, 503, path=f"{ref_of(MR).sop}:getStorageInfo")
    pipeline, outputs = rows_of(RowsOfImported(STORE, [], "ARCHIVE"), [stored_record(CT), stored_record(MR)])

    expected = [(ref_of(CT).sop, "CREATE", CT.stat().st_size, "COLDLINE", True)]
    expect_outputs(
        outputs.rows | beam.Map(summary), letters(outputs), expected, [(str(MR), "metadata", "read_error")]
    )
    result = run(pipeline)

    assert counters(result) == {"metadata_failures": 1}


def test_rows_of_imported_stops_the_run_when_the_healthcare_api_cannot_be_reached(
    healthcare: HealthcareApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick_retries(monkeypatch)
    api = closed_port_url("/v1")
    monkeypatch.setenv("HEALTHCARE_API_ROOT", api)
    pipeline, _ = rows_of(RowsOfImported(STORE, [], None), [stored_record(CT)])

    with pytest.raises(Exception, match=f"cannot reach the DICOMweb store {api}/{STORE}/dicomWeb"):
        run(pipeline)


# WithoutCurrentRow


def test_without_current_row_passes_on_the_records_whose_instance_has_no_current_row(tmp_path: Path) -> None:
    """Against the destination's view: a CREATE row is current, a later DELETE row ends it, and a
    destination not written yet has no rows at all."""
    deleted, never = ref_of(SERIES[1]), ref_of(SERIES[2])
    then = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    table = tmp_path / "table"
    flats = [create_row(SERIES[0], then), create_row(SERIES[1], then)]
    flats.append(delete_row(*deleted, then + datetime.timedelta(hours=1)))
    writing = new_pipeline()
    _ = writing | beam.Create(flats) | WriteMetadata([str(table)], "WRITE_APPEND", 1000, "seed", SPOOL_ROOT)
    run(writing)
    records = [stored_record(path) for path in SERIES[:3]]
    pipeline = new_pipeline()
    batch = pipeline | beam.Create([records])
    missing = batch | "WithTable" >> beam.ParDo(WithoutCurrentRow(str(table)))
    everything = batch | "WithoutTable" >> beam.ParDo(WithoutCurrentRow(str(tmp_path / "not-yet")))

    both = (
        missing | "Table" >> beam.Map(lambda r: ("table", r["sop_uid"])),
        everything | "NoTable" >> beam.Map(lambda r: ("no table", r["sop_uid"])),
    ) | beam.Flatten()
    expected = [("table", deleted.sop), ("table", never.sop)]
    assert_that(both, equal_to(expected + [("no table", record["sop_uid"]) for record in records]))
    result = run(pipeline)

    assert counters(result) == {"metadata_rows_restored": 2 + 3}


def create_row(path: Path, when: datetime.datetime) -> Flat:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return with_event(flatten(dataset, frozenset()), "CREATE", when, None, path.stat().st_size)
