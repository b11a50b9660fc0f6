"""Bad input gets a clear dead letter and nothing is written outside the store."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import run_import

CT = Path(get_testdata_file("CT_small.dcm"))


def with_uids(target: Path, **uids: str) -> Path:
    dataset = pydicom.dcmread(CT)
    with warnings.catch_warnings():  # pydicom warns about the bad UIDs these tests need
        warnings.simplefilter("ignore")
        for keyword, value in uids.items():
            setattr(dataset, keyword, value)
    dataset.save_as(target)
    return target


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Files of every kind of bad input, with the reason each must be dead-lettered for."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = CT.read_bytes()
    (inbox / "notes.dcm").write_text("this is a text file with a .dcm name\n" * 20)
    (inbox / "empty.dcm").write_bytes(b"")
    (inbox / "preamble_only.dcm").write_bytes(data[:132])
    (inbox / "cut_in_meta.dcm").write_bytes(data[:200])
    (inbox / "cut_in_uid.dcm").write_bytes(data[:500])  # inside the SOP Instance UID's value
    (inbox / "cut_in_pixels.dcm").write_bytes(data[: len(data) - 5000])
    with_uids(inbox / "study_escape.dcm", StudyInstanceUID="../../evil")
    with_uids(inbox / "sop_slash.dcm", SOPInstanceUID="1.2.3/../../4")
    with_uids(inbox / "series_dots.dcm", SeriesInstanceUID="..")
    with_uids(inbox / "too_long.dcm", SOPInstanceUID="1." + "2" * 70)
    with_uids(inbox / "no_sop.dcm", SOPInstanceUID="")
    expected = {
        "notes.dcm": "not_dicom",
        "empty.dcm": "not_dicom",
        "preamble_only.dcm": "truncated",
        "cut_in_meta.dcm": "truncated",
        "cut_in_uid.dcm": "truncated",
        "cut_in_pixels.dcm": "truncated",
        "study_escape.dcm": "invalid_uid",
        "sop_slash.dcm": "invalid_uid",
        "series_dots.dcm": "invalid_uid",
        "too_long.dcm": "invalid_uid",
        "no_sop.dcm": "missing_uid",
    }
    return inbox, expected


def test_each_bad_file_is_a_dead_letter_with_its_reason(hostile, tmp_path: Path) -> None:
    inbox, expected = hostile
    store = tmp_path / "area" / "store"
    run = run_import(f"--input={inbox}/*.dcm", f"--store={store}", dead_letter=tmp_path / "dl")
    assert {Path(uri).name: reason for uri, reason in run.reasons().items()} == expected
    assert all(r["stage"] == "parse" and r["detail"] for r in run.dead_letters)
    assert run.summary["failure"] == len(expected) and run.summary["success"] == 0
    assert run.status == 3
    assert not list((tmp_path / "area").rglob("*.dcm")), "nothing may be written for a bad file"
    assert not (tmp_path / "evil").exists()


def test_a_different_file_under_the_same_uid_is_a_conflict(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.dcm").write_bytes(CT.read_bytes())
    store = tmp_path / "store"
    assert run_import(f"--input={inbox}/a.dcm", f"--store={store}", dead_letter=tmp_path / "dl").status == 0
    changed = pydicom.dcmread(CT)
    changed.PatientName = "Someone^Else"
    changed.save_as(inbox / "b.dcm")
    run = run_import(f"--input={inbox}/b.dcm", f"--store={store}", dead_letter=tmp_path / "dl")
    assert run.status == 3
    assert [(r["reason"], r["stage"]) for r in run.dead_letters] == [("conflict", "store")]
    [kept] = store.rglob("*.dcm")
    assert kept.read_bytes() == CT.read_bytes()


def test_a_pattern_that_matches_nothing_fails_the_run(tmp_path: Path) -> None:
    run = run_import(f"--input={tmp_path}/nothing/**", f"--store={tmp_path}/s", dead_letter=tmp_path / "dl")
    assert run.status == 3
    assert run.summary["matched"] == 0 and run.summary["unmatched_patterns"] == 1
    assert [r["reason"] for r in run.dead_letters] == ["no_match"]


def test_a_store_that_cannot_be_written_fails_the_instances(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "studies").write_text("a file where the store's directory should be")
    run = run_import(f"--input={CT}", f"--store={tmp_path / 'store'}", dead_letter=tmp_path / "dl")
    assert run.status == 3
    assert [r["reason"] for r in run.dead_letters] == ["write_error"]


def test_an_input_bucket_that_does_not_exist_fails_the_pipeline(gcs, tmp_path: Path, capsys) -> None:
    run = run_import("--input=gs://no-such-bucket/**", f"--store={tmp_path}/s", dead_letter=tmp_path / "dl")
    assert run.status == 1 and run.summary["success"] == 0 and "cannot list" in run.summary["error"]
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the pipeline failed: cannot list --input gs://no-such-bucket/**")
