"""Importing into a real DICOMweb server (Orthanc): the same verdicts as the file-layout store,
re-imports that add nothing, a server that refuses instances, faults on the wire, bad credentials."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest

from storage import dicomweb
from storage.file_store import FileLayoutStore
from storage.store import Store
from storage.stores import open_store
from tests.conftest import run_import
from tests.fault_proxy import Fault, FaultProxy
from tests.orthanc_server import REJECTED_PATIENT_ID, Orthanc
from tests.test_stores import data_set

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def everything(store: Store) -> set:
    """Every instance the store lists, study by study."""
    return {ref for study in store.studies() for ref in store.instances(study)}


def test_the_corpus_lands_in_orthanc_as_in_a_file_store_and_again_finds_it_there(
    corpus_dir: Path, orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = run_import(
        f"--input={corpus_dir}/**", f"--store={tmp_path / 'store'}", dead_letter=tmp_path / "a"
    )
    web = run_import(f"--input={corpus_dir}/**", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "b")

    assert web.status == files.status == 3
    refused = {uri for uri, reason in web.reasons().items() if reason == "rejected"}
    assert refused == {str(corpus_dir / "data" / "explicit_VR-UN.dcm")}  # Orthanc answers 400 for it
    assert web.reasons() == files.reasons() | dict.fromkeys(refused, "rejected")  # conflicts included
    assert web.summary["success"] == files.summary["success"] - len(refused)
    assert web.summary["already_present"] == files.summary["already_present"]
    assert web.summary["matched"] == web.summary["success"] + web.summary["already_present"] + len(
        web.dead_letters
    )
    assert orthanc.instance_count() == web.summary["success"]

    again = run_import(f"--input={corpus_dir}/**", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "c")
    assert again.reasons() == web.reasons()
    assert again.summary["already_present"] == web.summary["success"] + web.summary["already_present"]
    assert orthanc.instance_count() == web.summary["success"]

    monkeypatch.setattr(dicomweb, "PAGE", 7)  # QIDO listing must page through everything
    server, local = open_store(orthanc.dicomweb), FileLayoutStore(str(tmp_path / "store"))
    stored = everything(server)
    assert len(stored) == web.summary["success"]
    assert stored <= everything(local)
    for ref in stored:
        assert data_set(server.read(ref)) == data_set(local.read(ref)), ref


def test_a_reimport_finds_everything_already_present_and_adds_nothing(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    first = run_import(f"--input={SAMPLE}/**.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "a")
    again = run_import(f"--input={SAMPLE}/**.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "b")

    assert (first.status, first.summary["success"], first.summary["failure"]) == (0, 19, 0)
    assert (again.status, again.summary["already_present"], again.summary["success"]) == (0, 19, 0)
    assert orthanc.instance_count() == 19


def test_a_changed_instance_under_a_stored_uid_is_a_conflict_and_changes_nothing(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    original = SAMPLE / "ct" / "CT_small.dcm"
    changed = tmp_path / "changed" / "CT_small.dcm"
    changed.parent.mkdir()
    dataset = pydicom.dcmread(original)
    dataset.PatientName = "Someone^Else"
    dataset.save_as(changed)
    run_import(f"--input={original}", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "a")

    run = run_import(f"--input={changed}", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "b")

    assert run.status == 3
    assert run.reasons() == {str(changed): "conflict"}
    (ref,) = everything(open_store(orthanc.dicomweb))
    assert data_set(open_store(orthanc.dicomweb).read(ref)) == data_set(original.read_bytes())


def test_instances_the_server_refuses_are_dead_letters_and_the_rest_are_stored(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Orthanc's filter drops the instance while its DICOMweb plugin reports it stored; the
    QIDO check after STOW-RS (--verify_stored) catches that."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for path in sorted(SAMPLE.glob("ct/**/*.dcm"))[:5]:
        (inbox / path.name).write_bytes(path.read_bytes())
    refused = inbox / "refused.dcm"
    dataset = pydicom.dcmread(SAMPLE / "ct" / "CT_small.dcm")
    dataset.PatientID = REJECTED_PATIENT_ID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(refused)

    store = f"--store={orthanc.dicomweb}"
    run = run_import(f"--input={inbox}/*.dcm", store, "--verify_stored", dead_letter=tmp_path / "dl")

    assert run.status == 3
    assert (run.summary["success"], run.summary["failure"]) == (5, 1)
    (letter,) = run.dead_letters
    assert (letter["uri"], letter["stage"], letter["reason"]) == (str(refused), "store", "rejected")
    assert "not found by QIDO-RS" in letter["detail"]
    assert orthanc.instance_count() == 5


def test_errors_and_dropped_connections_are_retried_and_each_instance_is_stored_once(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    faults = [
        Fault.status(503),
        Fault.status(429, retry_after=1),
        Fault.drop_before(),
        Fault.status(502),
        Fault.drop_after(),  # the server has processed this one; the retry must not duplicate it
        Fault.status(500),
    ]
    with FaultProxy(orthanc.rest, faults) as proxy:
        run = run_import(
            f"--input={SAMPLE}/**.dcm", f"--store={proxy.url}/dicom-web", dead_letter=tmp_path / "dl"
        )
        applied = [request.fault for request in proxy.requests if request.fault is not None]

    assert (run.status, run.summary["success"], run.summary["failure"]) == (0, 19, 0)
    assert applied == faults
    assert orthanc.instance_count() == 19
    assert len(orthanc.sop_instance_uids()) == 19


def test_a_wrong_password_stops_the_run_with_one_line_naming_the_store_not_the_secret(
    orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DICOMWEB_PASSWORD", "not-the-password")

    run = run_import(f"--input={SAMPLE}/**.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "dl")

    [error] = capsys.readouterr().err.strip().splitlines()
    assert run.status == 1
    assert run.summary["success"] == 0  # nothing is claimed stored
    refused = f"the DICOMweb store {orthanc.dicomweb} refused our credentials (HTTP 401)"
    assert error == f"error: the pipeline failed: {refused}"
    assert orthanc.instance_count() == 0
