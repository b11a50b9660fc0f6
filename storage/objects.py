"""Files on local disks and objects in GCS behind one small set of functions.

Everything works on URIs: a local path or `gs://bucket/name`. GCS goes through
google-cloud-storage rather than Beam's gcsio because we need what gcsio does not expose: delimiter
listings, small ranged reads (gcsio reads 16 MB buffers, more than most DICOM files) and
create-only uploads (`if_generation_match=0`).

Every GCS call passes GCS_RETRY (429, 5xx and connection errors, with exponential backoff) where
repeating it is harmless: reads, and writes to a fixed name (an upload or server-side rewrite there
ends with the same object however often it is repeated; a create-only one fails the repeat with 412,
which reads as "exists"). google-cloud-storage retries uploads and deletes by default only since 3.0,
and `Blob.rewrite` only with a generation precondition in any version, hence explicit retries.

Local files are never seen half written: each is written under its root's staging directory
(`{root}/.dicom-etl-tmp/`, the root being a store, an export output, a table or a dead-letter
directory) and then linked or renamed into place, with the modes the umask gives. A staging file is
named after its host and process, so `clean_staging` can remove what a killed run left without
touching the files of a run still going.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
import shutil
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple

import google_crc32c
from google.api_core import exceptions as gcs_errors
from google.cloud import storage  # type: ignore[attr-defined]  # a namespace package mypy misses
from google.cloud.storage.retry import DEFAULT_RETRY

from dicomlib.failures import ItemFailed, SourceReadError, describe
from dicomlib.filters import Target, filter_targets
from storage.staging import place

GCS_RETRY = DEFAULT_RETRY  # google-cloud-storage's own: 429, 5xx, connection errors; 120 s in all
IO_ERRORS = (OSError, gcs_errors.GoogleAPIError)  # what reading or writing a file or object may raise
READ_BUFFER = 64 * 1024  # one ranged request covers the header of most instances
READ_WHOLE_BELOW = 256 * 1024  # smaller files are read in one request: round trips cost more than bytes


class MatchedFile(NamedTuple):
    """A file found by pattern expansion; its size comes from the listing, saving a request."""

    uri: str
    size: int


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://") :].partition("/")
    return bucket, name


def join(root: str, *parts: str) -> str:
    """Join with `/` for both kinds; local roots are kept as given."""
    return "/".join([root.rstrip("/"), *parts])


@functools.cache
def gcs_client() -> storage.Client:
    """One client per process: Application Default Credentials, or anonymous on an emulator."""
    return storage.Client()


def _blob(uri: str) -> storage.Blob:
    bucket, name = split_gcs(uri)
    return gcs_client().bucket(bucket).blob(name)


class RangedFile(io.RawIOBase):
    """A seekable read-only file that fetches byte ranges on demand and counts the bytes fetched."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[int, int], bytes],
        size: int,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.name = name  # pydicom reads it
        self._fetch = fetch
        self._on_close = on_close
        self.size = size
        self.position = 0
        self.bytes_fetched = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            self._on_close()
        super().close()

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.position)
        if count <= 0:
            return 0
        try:
            data = self._fetch(self.position, self.position + count)
        except Exception as error:
            raise SourceReadError(f"cannot read {self.name} at byte {self.position}: {error}") from error
        buffer[: len(data)] = data
        self.position += len(data)
        self.bytes_fetched += len(data)
        return len(data)


def open_ranged(file: MatchedFile, buffer_size: int = READ_BUFFER) -> io.BufferedReader:
    """Open for reading only the bytes asked for, `buffer_size` at a time (a small file at once);
    `.raw.bytes_fetched` tells how many were read."""
    buffer_size = max(file.size, 1) if file.size <= READ_WHOLE_BELOW else buffer_size
    if is_gcs(file.uri):
        blob = _blob(file.uri)

        def fetch(start: int, end: int) -> bytes:
            return blob.download_as_bytes(
                start=start, end=end - 1, raw_download=True, checksum=None, retry=GCS_RETRY
            )

        return io.BufferedReader(RangedFile(file.uri, fetch, file.size), buffer_size)
    descriptor = os.open(file.uri, os.O_RDONLY)

    def read_local(start: int, end: int) -> bytes:
        return os.pread(descriptor, end - start, start)

    raw = RangedFile(file.uri, read_local, file.size, on_close=lambda: os.close(descriptor))
    return io.BufferedReader(raw, buffer_size)


def fingerprint(uri: str) -> tuple[int, str] | None:
    """(size, base64 CRC32C) of a file or object, or None if it does not exist.

    GCS keeps the CRC32C in the object's metadata, so comparing never downloads the object.
    """
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        blob = gcs_client().bucket(bucket).get_blob(name)
        return None if blob is None else (blob.size, blob.crc32c)
    try:
        with open(uri, "rb") as handle:
            checksum = google_crc32c.Checksum()
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                checksum.update(chunk)
    except FileNotFoundError:
        return None
    return os.path.getsize(uri), base64.b64encode(checksum.digest()).decode()


def copy(source: str, destination: str, *, root: str, create_only: bool = False) -> bool:
    """Copy bytes unchanged; with `create_only`, False (and nothing changed) if `destination` exists.

    No partial file is ever visible at `destination`: locally the copy is written to a staging file
    under `root` and then renamed into place, or hard-linked when `create_only` (a link, unlike a
    rename, fails when the name exists); on GCS an upload, or a server-side rewrite when the source
    is in GCS too (no bytes through this process), appears only once complete, and
    `if_generation_match=0` makes it create-only.
    """
    if is_gcs(destination):
        return _copy_to_gcs(source, destination, create_only)
    if create_only and os.path.lexists(destination):  # the usual answer on a re-run: copy nothing
        return False

    def fill(handle: BinaryIO) -> None:
        if is_gcs(source):
            _blob(source).download_to_file(handle, raw_download=True, retry=GCS_RETRY)
        else:
            with open(source, "rb") as original:
                shutil.copyfileobj(original, handle, 1 << 20)

    return place(fill, destination, root, create_only)


def write_bytes(uri: str, data: bytes, *, root: str, create_only: bool = False) -> bool:
    """Create or replace a file or object (a reader never sees it half written); with
    `create_only`, False (and nothing changed) if it exists."""
    if is_gcs(uri):
        condition = {"if_generation_match": 0} if create_only else {}
        try:
            _blob(uri).upload_from_string(
                data, content_type="application/octet-stream", retry=GCS_RETRY, **condition
            )
        except gcs_errors.PreconditionFailed:
            return False
        return True
    return place(lambda handle: handle.write(data), uri, root, create_only)


def _copy_to_gcs(source: str, destination: str, create_only: bool) -> bool:
    target = _blob(destination)
    condition = {"if_generation_match": 0} if create_only else {}
    try:
        if is_gcs(source):
            token, _, _ = target.rewrite(_blob(source), retry=GCS_RETRY, **condition)
            while token is not None:
                token, _, _ = target.rewrite(_blob(source), token=token, retry=GCS_RETRY, **condition)
        else:
            target.upload_from_filename(source, retry=GCS_RETRY, **condition)
    except gcs_errors.PreconditionFailed:
        return False
    return True


def download(uri: str, path: str) -> None:
    """An object, unchanged, into a local file; FileNotFoundError if there is none."""
    try:
        _blob(uri).download_to_filename(path, raw_download=True, retry=GCS_RETRY)
    except gcs_errors.NotFound:
        raise FileNotFoundError(uri) from None


def size_of(uri: str) -> int | None:
    """The size in bytes of a file or object, or None if it does not exist."""
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        blob = gcs_client().bucket(bucket).get_blob(name)
        return None if blob is None else blob.size
    return os.path.getsize(uri) if os.path.isfile(uri) else None


def read_bytes(uri: str) -> bytes:
    """The whole file or object; FileNotFoundError if there is none."""
    if is_gcs(uri):
        try:
            return _blob(uri).download_as_bytes(raw_download=True, retry=GCS_RETRY)
        except gcs_errors.NotFound:
            raise FileNotFoundError(uri) from None
    with open(uri, "rb") as handle:
        return handle.read()


def delete_tree(uri: str) -> None:
    """Delete a file, or everything under a directory or `gs://` prefix; nothing there is fine."""
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        client = gcs_client()
        for blob in client.list_blobs(bucket, prefix=name):
            if blob.name == name or blob.name.startswith(name.rstrip("/") + "/"):
                with contextlib.suppress(gcs_errors.NotFound):  # gone already, or by a repeat
                    blob.delete(retry=GCS_RETRY)
        return
    if os.path.isdir(uri):
        shutil.rmtree(uri)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)


def read_filter(uri: str) -> Iterator[Target]:
    """The targets of a local or gs:// filter file, line by line (see filter_targets)."""
    return filter_targets(read_bytes(uri))


@contextlib.contextmanager
def failing_as_write_error() -> Iterator[None]:
    """An I/O error writing an item's output is that item's write_error (not a read_error)."""
    try:
        yield
    except IO_ERRORS as error:
        raise ItemFailed("write_error", describe(error)) from error
