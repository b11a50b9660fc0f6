"""Shared fixtures: the DICOM corpus, a GCS emulator on loopback, and running a pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from google.cloud import storage

from tests.command_line import SilentServer
from tests.gcs_emulator import running_emulator
from tests.healthcare_server import HealthcareApi, running_healthcare_api
from tests.orthanc_server import Orthanc, running_orthanc


def corpus_roots() -> list[Path]:
    """pydicom's bundled test and charset files, plus the pydicom-data package."""
    import data_store  # installed by pydicom-data

    package = Path(pydicom.__file__).parent / "data"
    return [
        package / "test_files",
        package / "charset_files",
        Path(data_store.__file__).parent / "data",
    ]


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    files = sorted(p for root in corpus_roots() for p in root.rglob("*") if p.is_file())
    assert len(files) > 230, f"the corpus looks incomplete: {len(files)} files"
    return files


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Path:
    """The corpus in one tree, with pydicom-data under its own folder."""
    target = tmp_path_factory.mktemp("corpus")
    for root in corpus_roots():
        shutil.copytree(root, target / root.name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="session")
def gcs() -> Iterator[storage.Client]:
    with running_emulator() as client:
        yield client


@pytest.fixture(scope="session")
def orthanc_server() -> Iterator[Orthanc]:
    with running_orthanc() as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server: Orthanc, monkeypatch: pytest.MonkeyPatch) -> Orthanc:
    """An empty Orthanc, and its credentials in the environment as the contract says."""
    orthanc_server.clear()
    monkeypatch.setenv("DICOMWEB_USERNAME", orthanc_server.username)
    monkeypatch.setenv("DICOMWEB_PASSWORD", orthanc_server.password)
    return orthanc_server


@pytest.fixture
def silent_store() -> Iterator[SilentServer]:
    """A DICOMweb store that never answers (tests/command_line.py)."""
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def healthcare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HealthcareApi]:
    """The Healthcare API stand-in (v1) on loopback, and credentials and an API root pointing at it."""
    with running_healthcare_api(tmp_path) as (api, environment):
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        yield api


def stored_instances(store: Path) -> dict[str, Path]:
    """SOP Instance UID -> file of a local file-layout store, checking the store is whole: every
    file is an instance at its UIDs' path or the index entry naming it, one entry per instance, and
    nothing else (no staging file, no temporary file)."""
    instances = (
        {p.stem: p for p in (store / "studies").rglob("*.dcm")} if (store / "studies").is_dir() else {}
    )
    index = {p.name: p.read_text() for p in (store / "index").rglob("*") if p.is_file()}
    for sop, path in instances.items():
        assert index.get(sop) == "/" + path.relative_to(store).with_suffix("").as_posix(), sop
    others = [
        p
        for p in store.rglob("*")
        if p.is_file() and p.suffix != ".dcm" and p.relative_to(store).parts[0] != "index"
    ]
    assert not others, f"not instances nor index entries: {others[:5]}"
    assert set(index) == set(instances), "index entries without instances, or instances without"
    assert len(instances) == len(list(store.rglob("*.dcm"))), "an instance stored twice"
    return instances


class Run:
    """The outcome of one pipeline run: exit status, summary line, dead-letter records."""

    def __init__(self, status: int, stdout: str, dead_letter: Path) -> None:
        self.status = status
        self.stdout = stdout
        self.summary = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
        files = sorted(dead_letter.glob("*.jsonl")) if dead_letter.is_dir() else []
        self.dead_letters = [json.loads(line) for f in files for line in f.read_text().splitlines()]

    def reasons(self) -> dict[str, str]:
        """uri -> reason for every dead letter."""
        return {record["uri"]: record["reason"] for record in self.dead_letters}


def run_pipeline(main: Callable[[list[str]], int], *args: str, dead_letter: Path) -> Run:
    """Run a pipeline's main in this process (the CLI tests run them as subprocesses)."""
    shutil.rmtree(dead_letter, ignore_errors=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([*args, f"--dead_letter={dead_letter}"])
    return Run(status, out.getvalue(), dead_letter)


def run_import(*args: str, dead_letter: Path) -> Run:
    from pipelines import import_dicom

    return run_pipeline(import_dicom.main, *args, dead_letter=dead_letter)


def run_export(*args: str, dead_letter: Path) -> Run:
    from pipelines import export_dicom

    return run_pipeline(export_dicom.main, *args, dead_letter=dead_letter)
