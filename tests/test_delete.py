"""Deleting studies, series and instances from a store, by targets or a filter file."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.file_store import FileLayoutStore
from storage.stores import open_store
from tests.conftest import Run, run_import, run_pipeline
from tests.orthanc_server import Orthanc

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def run_delete(*args: str, dead_letter: Path) -> Run:
    from pipelines import delete_dicom

    return run_pipeline(delete_dicom.main, *args, dead_letter=dead_letter)


@pytest.fixture
def store(tmp_path: Path) -> FileLayoutStore:
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={tmp_path / 'store'}", dead_letter=tmp_path / "import")
    return FileLayoutStore(str(tmp_path / "store"))


def everything(store: FileLayoutStore) -> set:
    return {ref for study in store.studies() for ref in store.instances(study)}


def test_a_filter_file_deletes_what_its_lines_name_and_nothing_else(
    store: FileLayoutStore, tmp_path: Path
) -> None:
    before = everything(store)
    by_study: dict[str, list] = {}
    for ref in sorted(before):
        by_study.setdefault(ref.study, []).append(ref)
    studies = sorted(by_study, key=lambda s: -len(by_study[s]))
    one_series = by_study[studies[1]][0]
    one_instance = by_study[studies[2]][0]
    (tmp_path / "filter.txt").write_text(
        f"/studies/{studies[0]}\n/studies/{one_series.study}/series/{one_series.series}\n{one_instance.path()}\n"
    )
    gone = {
        ref
        for ref in before
        if ref.study == studies[0] or ref.series == one_series.series or ref == one_instance
    }

    run = run_delete(
        f"--store={store.root}", f"--filter_file={tmp_path / 'filter.txt'}", dead_letter=tmp_path / "dl"
    )

    assert (run.status, run.summary["selected"], run.summary["success"]) == (0, len(gone), len(gone))
    assert everything(store) == before - gone


def test_targets_that_match_nothing_are_dead_letters(store: FileLayoutStore, tmp_path: Path) -> None:
    ref = sorted(everything(store))[0]

    run = run_delete(
        f"--store={store.root}",
        "--target=/studies/9.9",
        f"--target={ref.path()}",
        dead_letter=tmp_path / "dl",
    )

    assert (run.status, run.summary["success"], run.summary["unmatched_targets"]) == (3, 1, 1)
    assert run.reasons() == {"/studies/9.9": "no_match"}
    assert ref not in everything(store)


def test_a_server_without_dicomweb_delete_stops_the_run_and_keeps_everything(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_import(f"--input={SAMPLE}/ct/*.dcm", f"--store={orthanc.dicomweb}", dead_letter=tmp_path / "a")
    held = orthanc.instance_count()
    study = next(open_store(orthanc.dicomweb).studies())

    run = run_delete(f"--store={orthanc.dicomweb}", f"--target=/studies/{study}", dead_letter=tmp_path / "dl")

    assert run.status == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the pipeline failed: the DICOMweb server at {orthanc.dicomweb} does not support DELETE"
    ]
    assert orthanc.instance_count() == held


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        ([], "--target", "either --target lines or --filter_file"),
        (["--target=/studies/1.2", "--filter_file=f.txt"], "--target", "one of them"),
        (["--target=/studies/1.2/instances/3"], "--target", "is not /studies/UID"),
        (
            ["--target=/studies/1.2", "--metadata_destination=bq://p"],
            "--metadata_destination",
            "project.dataset",
        ),
    ],
)
def test_bad_options_delete_nothing(
    store: FileLayoutStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    option: str,
    words: str,
) -> None:
    before = everything(store)
    run = run_delete(f"--store={store.root}", *args, dead_letter=tmp_path / "dl")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert run.status == 2 and line.startswith(f"error: {option}: ") and words in line
    assert everything(store) == before
