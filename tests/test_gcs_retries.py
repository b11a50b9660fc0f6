"""Cloud Storage writes survive throttling and server errors: fake-gcs-server behind the fault proxy
answers 429 and 503 to the copies, uploads and deletes of real pipeline runs, which retry them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.cloud import storage

from storage import objects
from storage.file_store import FileLayoutStore
from tests.conftest import run_export, run_import
from tests.fault_proxy import Fault, FaultProxy
from tests.gcs_emulator import upload_tree
from tests.test_delete import run_delete

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
FAULTS = [Fault.status(429), Fault.status(503)]


def rewrites(method: str, path: str) -> bool:
    return "/rewriteTo/" in path


def uploads(method: str, path: str) -> bool:
    return path.startswith("/upload/storage/")


def deletes(method: str, path: str) -> bool:
    return method == "DELETE"


@pytest.fixture
def flaky_gcs(
    gcs: storage.Client, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[str, str], bool]], FaultProxy]]:
    """Routes this process's GCS client through a FaultProxy whose FAULTS go to the requests picked."""
    proxies: list[FaultProxy] = []

    def start(when: Callable[[str, str], bool]) -> FaultProxy:
        proxy = FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], FAULTS, when=when).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        objects.gcs_client.cache_clear()
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__(None, None, None)
    objects.gcs_client.cache_clear()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> FileLayoutStore:
    root = tmp_path_factory.mktemp("retries")
    run_import(f"--input={SAMPLE}/**.dcm", f"--store={root}/store", dead_letter=root / "dl")
    return FileLayoutStore(str(root / "store"))


def files_in(client: storage.Client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Object names (less `prefix`) and contents."""
    return {b.name[len(prefix) :]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix)}


def by_sop(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same contents by SOP Instance UID, the name of every instance file in either layout."""
    return {Path(name).stem: data for name, data in files.items()}


@pytest.mark.parametrize(("source", "when"), [("gcs", rewrites), ("local", uploads)])
def test_an_export_to_gcs_survives_429_and_503_on_its_copies(
    gcs: storage.Client,
    flaky_gcs: Callable,
    local_store: FileLayoutStore,
    tmp_path: Path,
    source: str,
    when: Callable[[str, str], bool],
) -> None:
    bucket = f"export-retries-{source}"
    gcs.create_bucket(bucket)
    upload_tree(gcs, Path(local_store.root), bucket, "store/")
    store = f"gs://{bucket}/store" if source == "gcs" else local_store.root
    proxy = flaky_gcs(when)

    run = run_export(f"--store={store}", f"--output=gs://{bucket}/out", dead_letter=tmp_path / "dl")

    assert (run.status, run.summary["success"], run.dead_letters) == (0, 19, [])
    assert [request.fault for request in proxy.requests if request.fault] == FAULTS
    exported = files_in(gcs, bucket, "out/")
    assert len(exported) == 19
    assert by_sop(exported) == by_sop(files_in(gcs, bucket, "store/studies/"))


def test_an_import_within_gcs_survives_429_and_503_on_its_create_only_copies(
    gcs: storage.Client, flaky_gcs: Callable, tmp_path: Path
) -> None:
    gcs.create_bucket("import-retries")
    upload_tree(gcs, SAMPLE, "import-retries", "landing/")
    proxy = flaky_gcs(rewrites)

    run = run_import(
        "--input=gs://import-retries/landing/**.dcm",
        "--store=gs://import-retries/store",
        dead_letter=tmp_path / "dl",
    )

    assert (run.status, run.summary["success"], run.dead_letters) == (0, 19, [])
    assert [request.fault for request in proxy.requests if request.fault] == FAULTS
    landed = files_in(gcs, "import-retries", "landing/")
    stored = files_in(gcs, "import-retries", "store/studies/")
    assert sorted(stored.values()) == sorted(data for name, data in landed.items() if name.endswith(".dcm"))


def test_a_delete_in_gcs_survives_429_and_503_on_its_deletes(
    gcs: storage.Client, flaky_gcs: Callable, local_store: FileLayoutStore, tmp_path: Path
) -> None:
    gcs.create_bucket("delete-retries")
    upload_tree(gcs, Path(local_store.root), "delete-retries", "store/")
    study = max(local_store.studies(), key=lambda uid: len(list(local_store.instances(uid))))
    held = len(list(local_store.instances(study)))
    proxy = flaky_gcs(deletes)

    run = run_delete(
        "--store=gs://delete-retries/store", f"--target=/studies/{study}", dead_letter=tmp_path / "dl"
    )

    assert (run.status, run.summary["success"]) == (0, held)
    assert [request.fault for request in proxy.requests if request.fault] == FAULTS
    assert not [name for name in files_in(gcs, "delete-retries", "store/studies/") if f"/{study}/" in name]
