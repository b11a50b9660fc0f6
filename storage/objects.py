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
import errno
import functools
import io
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple

import google_crc32c
from google.api_core import exceptions as gcs_errors
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from dicomlib.failures import SourceReadError
from dicomlib.filters import Target, filter_targets

GCS_RETRY = DEFAULT_RETRY  # google-cloud-storage's own: 429, 5xx, connection errors; 120 s in all
IO_ERRORS = (OSError, gcs_errors.GoogleAPIError)  # what reading or writing a file or object may raise
READ_BUFFER = 64 * 1024  # one ranged request covers the header of most instances
READ_WHOLE_BELOW = 256 * 1024  # smaller files are read in one request: round trips cost more than bytes
STAGING = ".dicom-etl-tmp"
STALE_AFTER = 24 * 3600  # seconds: a staging file this old is left over, even from another host
HOST = socket.gethostname().replace(".", "_")
SPOOL_ROOT = tempfile.gettempdir()  # its staging directory holds the spools
_spool_cleaned: list[bool] = []  # whether this process has cleaned SPOOL_ROOT yet


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


class Lister:
    """Lists one directory level or one whole subtree under a name prefix, counting what it lists."""

    def __init__(self, bucket: str | None) -> None:
        self.bucket = bucket
        self.listed = 0

    def uri(self, name: str) -> str:
        return name if self.bucket is None else f"gs://{self.bucket}/{name}"

    def children(self, prefix: str) -> tuple[list[MatchedFile], list[str]]:
        """Files and sub-directory prefixes (ending in `/`) directly under `prefix`."""
        if self.bucket is not None:
            pages = gcs_client().list_blobs(self.bucket, prefix=prefix, delimiter="/")
            files = [MatchedFile(b.name, b.size) for b in pages if not b.name.endswith("/")]
            dirs = sorted(pages.prefixes)
        else:
            files, dirs = [], []
            for path, entry in _scan(prefix):
                if entry.is_dir():
                    dirs.append(path + "/")
                elif entry.is_file():
                    files.append(MatchedFile(path, entry.stat().st_size))
        self.listed += len(files) + len(dirs)
        return files, dirs

    def descendants(self, prefix: str, glob: str | None = None) -> Iterator[MatchedFile]:
        """Every file whose name starts with `prefix`, at any depth.

        `glob` narrows a GCS listing on the server; callers still filter, because emulators (and
        any server that ignores it) return everything under the prefix.
        """
        if self.bucket is not None:
            for blob in gcs_client().list_blobs(self.bucket, prefix=prefix, match_glob=glob):
                self.listed += 1
                if not blob.name.endswith("/"):
                    yield MatchedFile(blob.name, blob.size)
            return
        for path, entry in _scan(prefix):
            self.listed += 1
            if entry.is_file():
                yield MatchedFile(path, entry.stat().st_size)
            elif entry.is_dir():
                for top, dirs, names in os.walk(path):
                    dirs.sort()
                    for name in sorted(names):
                        self.listed += 1
                        path = os.path.join(top, name)
                        if os.path.isfile(path):
                            yield MatchedFile(path, os.path.getsize(path))

    def file(self, name: str) -> MatchedFile | None:
        """The file with exactly this name, if there is one."""
        if self.bucket is not None:
            blob = gcs_client().bucket(self.bucket).get_blob(name)
            found = blob is not None and not name.endswith("/")
            return MatchedFile(name, blob.size) if found else None
        return MatchedFile(name, os.path.getsize(name)) if os.path.isfile(name) else None


def _scan(prefix: str) -> list[tuple[str, os.DirEntry[str]]]:
    """(path, entry) for entries of the directory part of `prefix` whose names start with the rest."""
    directory, slash, start = prefix.rpartition("/")
    head = directory + slash
    try:
        with os.scandir(head or ".") as entries:
            found = [(head + e.name, e) for e in entries if e.name.startswith(start)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


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

    def readinto(self, buffer) -> int:  # type: ignore[override]
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

    return _place(fill, destination, root, create_only)


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
    return _place(lambda handle: handle.write(data), uri, root, create_only)


def _place(
    fill: Callable[[io.BufferedWriter], object], destination: str, root: str, create_only: bool
) -> bool:
    """Write a staging file under `root` with `fill`, then move it to `destination`."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    staged = _staging_file(root)
    try:
        with open(staged, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        (os.link if create_only else os.replace)(staged, destination)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def _staging_file(root: str) -> str:
    """A new, empty staging file under `root`, created with the modes the umask gives (0644 under
    umask 022); its name says which host and process own it."""
    directory = os.path.join(root, STAGING)
    path = os.path.join(directory, f"{HOST}.{os.getpid()}.{uuid.uuid4().hex}")
    for attempt in range(3):  # a concurrent clean_staging may remove the empty directory between
        os.makedirs(directory, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def spool_file() -> Iterator[str]:
    """A path for a local temporary copy of an instance on its way through (a download, a transcoded
    file), removed after use. It is a staging file under SPOOL_ROOT, named for this process, so
    what a killed run left there is removed by the first spool of any later process."""
    if not _spool_cleaned:
        clean_staging(SPOOL_ROOT)
        _spool_cleaned.append(True)
    path = _staging_file(SPOOL_ROOT)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # only when empty; a writer recreates it


def clean_staging(root: str) -> int:
    """Remove the staging files under a local `root` that no live writer owns; how many.

    A file is left over when its process (on this host) is gone, or when it is older than
    STALE_AFTER whatever its host. The staging directory goes too once empty.
    """
    if is_gcs(root):
        return 0
    directory = os.path.join(root, STAGING)
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        host, _, rest = entry.name.partition(".")
        pid = rest.partition(".")[0]
        with contextlib.suppress(FileNotFoundError):
            modified = entry.stat().st_mtime
            mine = host == HOST and pid.isdigit()
            if time.time() - modified > STALE_AFTER or (mine and not _writing(int(pid), modified)):
                os.unlink(entry.path)
                removed += 1
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only when empty; a writer recreates it
    return removed


def _writing(pid: int, since: float) -> bool:
    """Whether process `pid` may still be writing a file last modified at `since`: it is alive and
    started before then (a pid reused by a newer process is not the writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return os.stat(f"/proc/{pid}").st_ctime <= since + 1
    except OSError as error:
        return error.errno != errno.ENOENT


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
