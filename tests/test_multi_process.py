"""Every pipeline under Beam's multi-process workers (`--direct_running_mode=multi_processing
--direct_num_workers=2`) does what it does in one process: the same stores (file lists and bytes),
metadata rows, Provenance, dead letters and summary. Worker processes get the pipeline pickled, as
Dataflow's workers do, so state that does not pickle, or that one process keeps to itself (counters,
writers, caches), shows here and not in the in-process runs of the other tests.

The sample's in-process import is run once (a module fixture) and is the store the other pipelines
read. A run that fails says the same one line from a worker process as from the launcher's.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import (
    deidentify_dicom,
    delete_dicom,
    export_dicom,
    export_metadata,
    import_dicom,
    import_images,
)
from tests.command_line import SAMPLE
from tests.conftest import Run, run_pipeline
from tests.test_import_images import TEMPLATE, encoded, noise, real_jpeg

MULTI_PROCESS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"  # refuses most of the sample's images: dead letters
KEY = "a-test-key-0123456789"
RUN_TIME_COLUMNS = ("LastUpdated",)  # when the row was written, not what it says
RUN_TIME_VALUES = (
    (r"deidentify_dicom-\d{8}T\d{6}Z-\d+", "<run>"),
    (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "<time>"),
    (r"\b[0-9a-f]{40}\b", "<id>"),
)
Main = Callable[[list[str]], int]
Arguments = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Outcome:
    """A run and the directory its outputs went to."""

    run: Run
    root: Path

    def files(self, name: str) -> dict[str, bytes]:
        """Relative path -> bytes of every file under root/name."""
        top = self.root / name
        return {p.relative_to(top).as_posix(): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}

    def rows(self, name: str) -> list[str]:
        """The Parquet table's rows under root/name, less their run-time columns, as sorted JSON."""
        parts = sorted((self.root / name).glob("*.parquet"))
        assert parts, f"no Parquet files in {self.root / name}"
        rows = [row for part in parts for row in pq.read_table(part).to_pylist()]
        return sorted(
            json.dumps(
                {k: v for k, v in row.items() if k not in RUN_TIME_COLUMNS}, sort_keys=True, default=str
            )
            for row in rows
        )

    def dead_letters(self) -> list[tuple[str, str, str]]:
        return sorted((d["uri"], d["stage"], d["reason"]) for d in self.run.dead_letters)


def tables(outcome: Outcome, name: str) -> tuple[list[str], bytes, bytes]:
    """A metadata table's rows, schema.json and view.sql; the schema's columns in the same order
    too, however the workers met them (the order is a BigQuery table's, and decides which columns
    --max_columns keeps)."""
    files = outcome.files(name)
    return outcome.rows(name), files["schema.json"], files["view.sql"]


def run(main: Main, root: Path, arguments: Arguments, *more: str) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    return Outcome(run_pipeline(main, *arguments(root), *more, dead_letter=root / "dead_letter"), root)


def multi_process(main: Main, tmp_path: Path, arguments: Arguments, single: Outcome) -> Outcome:
    """The run again in worker processes, checked to end as `single` did: the same exit status,
    summary and dead letters."""
    multi = run(main, tmp_path / "multi", arguments, *MULTI_PROCESS)
    assert multi.run.status == single.run.status, multi.run.stdout
    assert multi.run.summary == single.run.summary
    assert multi.dead_letters() == single.dead_letters()
    return multi


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("single")


# --- import_dicom: the sample and a file that is not DICOM ---------------------------------------


def import_arguments(root: Path) -> list[str]:
    return [
        f"--input={SAMPLE}/**.dcm",
        f"--input={Path(__file__)}",
        f"--store={root / 'store'}",
        f"--metadata_destination={root / 'rows'}",
    ]


@pytest.fixture(scope="module")
def imported(root: Path) -> Outcome:
    single = run(import_dicom.main, root / "import", import_arguments)
    assert (single.run.status, single.run.summary["success"]) == (3, 19), single.run.stdout
    assert single.run.reasons() == {str(Path(__file__)): "not_dicom"}
    return single


def test_import_dicom(imported: Outcome, tmp_path: Path) -> None:
    multi = multi_process(import_dicom.main, tmp_path, import_arguments, imported)
    assert multi.files("store") == imported.files("store")
    assert tables(multi, "rows") == tables(imported, "rows")


# --- export_dicom: converted to JPEG 2000, which most of the sample's images refuse --------------


def studies(imported: Outcome) -> dict[str, int]:
    """Study UID -> how many instances the sample's store holds of it."""
    top = imported.root / "store" / "studies"
    return {study.name: len(list(study.rglob("*.dcm"))) for study in sorted(top.iterdir())}


def test_export_dicom(imported: Outcome, root: Path, tmp_path: Path) -> None:
    """The studies of several instances, which JPEG 2000 refuses, and two it takes."""
    chosen = [study for study, count in studies(imported).items() if count > 1]
    chosen += [study for study in studies(imported) if study.startswith("1.3.6.1.4.1.5962.1.2.")][:2]
    filter_file = root / "export.txt"
    filter_file.write_text("".join(f"/studies/{study}\n" for study in chosen))

    def arguments(at: Path) -> list[str]:
        return [
            f"--store={imported.root / 'store'}",
            f"--output={at / 'out'}",
            f"--transfer_syntax={JPEG_2000_LOSSLESS}",
            f"--filter_file={filter_file}",
        ]

    single = run(export_dicom.main, root / "export", arguments)
    assert (single.run.status, single.run.summary["success"], single.run.summary["failure"]) == (3, 2, 10)
    multi = multi_process(export_dicom.main, tmp_path, arguments, single)
    assert multi.files("out") == single.files("out")


# --- export_metadata: a filter file with a line that names nothing -------------------------------


def test_export_metadata(imported: Outcome, root: Path, tmp_path: Path) -> None:
    filter_file = root / "metadata.txt"
    filter_file.write_text(
        "".join(f"/studies/{study}\n" for study in studies(imported)) + "/studies/1.2.3.4\n"
    )

    def arguments(at: Path) -> list[str]:
        return [
            f"--store={imported.root / 'store'}",
            f"--destination={at / 'table'}",
            f"--filter_file={filter_file}",
        ]

    single = run(export_metadata.main, root / "metadata", arguments)
    assert single.run.summary["success"] > 0 and single.run.reasons() == {"/studies/1.2.3.4": "no_match"}
    multi = multi_process(export_metadata.main, tmp_path, arguments, single)
    assert tables(multi, "table") == tables(single, "table")


# --- delete_dicom: a study, a series and a target that names nothing, from copies of the store ---


def test_delete_dicom(imported: Outcome, root: Path, tmp_path: Path) -> None:
    instances = sorted((imported.root / "store" / "studies").rglob("*.dcm"))
    study = instances[0].relative_to(imported.root / "store").parts[1]
    series = instances[-1].relative_to(imported.root / "store").parts[1:4]

    def arguments(at: Path) -> list[str]:
        shutil.copytree(imported.root / "store", at / "store")
        return [
            f"--store={at / 'store'}",
            f"--target=/studies/{study}",
            f"--target=/studies/{series[0]}/series/{series[2]}",
            "--target=/studies/1.2.3.4",
            f"--metadata_destination={at / 'rows'}",
        ]

    single = run(delete_dicom.main, root / "delete", arguments)
    assert single.run.summary["success"] > 1 and single.run.reasons() == {"/studies/1.2.3.4": "no_match"}
    multi = multi_process(delete_dicom.main, tmp_path, arguments, single)
    assert multi.files("store") == single.files("store")
    assert tables(multi, "rows") == tables(single, "rows")


# --- deidentify_dicom: part of the sample into another store, with Provenance --------------------


def provenance(outcome: Outcome) -> list[str]:
    """The Provenance resources, less what differs between any two runs: the run's name, its
    times, resource ids (made from the run's name) and where the run wrote."""
    text = (
        (outcome.root / "provenance" / "Provenance.ndjson").read_text().replace(str(outcome.root), "<root>")
    )
    for pattern, stands_for in RUN_TIME_VALUES:
        text = re.sub(pattern, stands_for, text)
    return sorted(text.splitlines())


@pytest.fixture
def deid_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DEID_KEY", KEY)  # the worker processes inherit it
    yield


@pytest.mark.usefixtures("deid_key")
def test_deidentify_dicom(imported: Outcome, root: Path, tmp_path: Path) -> None:
    """The studies of several instances, and a target that names nothing."""
    chosen = [f"--target=/studies/{study}" for study, count in studies(imported).items() if count > 1]

    def arguments(at: Path) -> list[str]:
        return [
            f"--source={imported.root / 'store'}",
            f"--destination={at / 'store'}",
            f"--provenance_destination={at / 'provenance'}",
            *chosen,
            "--target=/studies/1.2.3.4",
        ]

    single = run(deidentify_dicom.main, root / "deidentify", arguments)
    assert (single.run.summary["success"], single.run.reasons()) == (10, {"/studies/1.2.3.4": "no_match"})
    multi = multi_process(deidentify_dicom.main, tmp_path, arguments, single)
    assert multi.files("store") == single.files("store")
    assert provenance(multi) == provenance(single)


# --- import_images: a JPEG, a PNG with its sidecar, a broken JPEG ---------------------------------


def test_import_images(root: Path, tmp_path: Path) -> None:
    images = root / "images"
    images.mkdir()
    (images / "IMG_0001.jpg").write_bytes(real_jpeg("SC_rgb_jpeg_dcmtk.dcm"))
    (images / "scan.png").write_bytes(encoded(noise(20, 25), "PNG"))
    (images / "scan.png.json").write_text(json.dumps({"SeriesDescription": "scans"}))
    (images / "broken.jpg").write_bytes(encoded(noise(64, 64, 3), "JPEG")[:500])
    (root / "template.json").write_text(json.dumps(TEMPLATE))

    def arguments(at: Path) -> list[str]:
        return [
            f"--input={images}/**",
            f"--metadata={root / 'template.json'}",
            f"--store={at / 'store'}",
            f"--metadata_destination={at / 'rows'}",
        ]

    single = run(import_images.main, root / "import_images", arguments)
    assert (single.run.status, single.run.summary["success"], single.run.summary["failure"]) == (3, 2, 1)
    multi = multi_process(import_images.main, tmp_path, arguments, single)
    assert multi.files("store") == single.files("store")
    assert tables(multi, "rows") == tables(single, "rows")


# --- a run that fails: the same line, whichever process the error came from ----------------------


def test_a_failed_run_says_the_same_line(imported: Outcome, root: Path, tmp_path: Path) -> None:
    """A worker process's error reaches the launcher as the text of its traceback; the line on
    stderr and the summary's "error" are still the cause alone, as from a run in one process
    (tests/test_cli.py). Here the table to write (WRITE_EMPTY, the default) has rows."""
    table = root / "full"
    shutil.copytree(imported.root / "rows", table)

    def arguments(at: Path) -> list[str]:
        return [f"--store={imported.root / 'store'}", f"--destination={table}"]

    multi = run(export_metadata.main, tmp_path / "multi", arguments, *MULTI_PROCESS)
    assert multi.run.status == 1
    assert (
        multi.run.summary["error"]
        == f"the pipeline failed: {table} is not empty (--write_disposition=WRITE_EMPTY)"
    )
