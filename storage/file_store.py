"""The file-layout store: instances kept byte-identical at a path made of their UIDs.

The SOP Instance UID alone identifies an instance, as in a DICOMweb server, but the layout puts
two other UIDs in its path. So the store keeps an index with one small file per instance,
`{root}/index/sop/{xx}/{SOP Instance UID}` (xx: two hex digits of its SHA-1, spreading the files
over 256 directories), holding the instance's path `/studies/S/series/R/instances/I`. A write first
claims the UID by creating its index file, create-only: two writers (workers or runs) can never
both claim it, and finding the claim of another study or series takes one read, whatever the size
of the store. Deleting an instance releases its claim.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from google.api_core import exceptions as google_errors
from pydicom.dataset import Dataset

from dicomlib.failures import ItemFailed, describe
from dicomlib.header import read_header
from dicomlib.uids import InstanceRef
from storage.listing import NOT_A_FILE, lister_for
from storage.objects import (
    IO_ERRORS,
    MatchedFile,
    copy,
    delete_tree,
    download,
    failing_as_write_error,
    fingerprint,
    gcs_client,
    is_gcs,
    join,
    open_ranged,
    read_bytes,
    size_of,
    split_gcs,
    write_bytes,
)
from storage.staging import clean_staging, spool_file
from storage.store import FAILURE, SUCCESS, BlobInfo, Parsed, Store, Written, verdict

INSTANCE_PATH = re.compile(r"studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)\.dcm")


class FileLayoutStore(Store):
    """`{root}/studies/{study}/series/{series}/instances/{sop}.dcm` under a directory or gs:// prefix.

    Writes are create-only, so concurrent workers storing the same instance cannot clobber each
    other: the loser finds the file present and compares bytes.
    """

    def __init__(self, root: str) -> None:
        self.location = self.root = root.rstrip("/")

    def instance_uri(self, ref: InstanceRef) -> str:
        """The path of an instance; the UIDs must already be validated (see valid_uid)."""
        return join(self.root, ref.path().lstrip("/") + ".dcm")

    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        return [self._put(item) for item in batch]

    def remove_leftovers(self) -> None:
        clean_staging(self.root)

    def _put(self, item: Parsed) -> Written:
        """Claim the SOP Instance UID, then copy the file unchanged; the same size and CRC32C as
        the stored file is ALREADY_PRESENT, a claim by another study or series a conflict.

        Where the claim was there already, the stored file's existence is checked first, so that
        a re-run copies nothing; the create-only copy still settles a race between two writers.
        """
        target = self.instance_uri(item.ref)
        try:
            holder, claimed_now = self._claim(item.ref)
            if holder != item.ref.path():
                return Written(FAILURE, target, "conflict", self._claimed_elsewhere(item.ref, holder))
            existing = None if claimed_now else fingerprint(target)
            if existing is None and self._copy_claimed(item, target, claimed_now):
                return Written(SUCCESS, target)
            same = fingerprint(item.file.uri) == (existing or fingerprint(target))
        except IO_ERRORS as error:
            return Written(FAILURE, target, "write_error", describe(error))
        return verdict(target, item.ref.sop, same, "different bytes")

    def _claim(self, ref: InstanceRef) -> tuple[str, bool]:
        """The instance path that holds the SOP Instance UID's claim, and whether we made it now."""
        index = self._index_uri(ref.sop)
        if write_bytes(index, ref.path().encode(), root=self.root, create_only=True):
            return ref.path(), True
        return read_bytes(index).decode("utf-8", "replace"), False

    def _copy_claimed(self, item: Parsed, target: str, claimed_now: bool) -> bool:
        """The create-only copy; a claim made for a copy that failed is released again."""
        try:
            return copy(item.file.uri, target, root=self.root, create_only=True)
        except BaseException:
            if claimed_now:
                with contextlib.suppress(*IO_ERRORS):
                    delete_tree(self._index_uri(item.ref.sop))
            raise

    def _claimed_elsewhere(self, ref: InstanceRef, holder: str) -> str:
        detail = f"SOP Instance UID {ref.sop} is already stored as {holder[:300]} in {self.root}"
        match = INSTANCE_PATH.fullmatch(holder.lstrip("/") + ".dcm")
        if match is None or fingerprint(self.instance_uri(InstanceRef(*match.groups()))) is None:
            index = self._index_uri(ref.sop)
            detail += f", but no file is there (an interrupted import: re-run it, or remove {index})"
        return detail

    def _index_uri(self, sop: str) -> str:
        shard = hashlib.sha1(sop.encode()).hexdigest()[:2]
        return join(self.root, "index", "sop", shard, sop)

    def studies(self) -> Iterator[str]:
        lister, prefix = lister_for(join(self.root, "studies") + "/")
        _, directories = lister.children(prefix)
        self.listed += lister.listed
        for directory in directories:
            yield directory.rstrip("/").rsplit("/", 1)[-1]

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        parts = ["studies", study] + (["series", series] if series else [])
        lister, prefix = lister_for(join(self.root, *parts) + "/")
        for file in lister.descendants(prefix):
            self.listed += 1
            match = INSTANCE_PATH.search(file.uri)
            if match and file.size != NOT_A_FILE:  # the store writes regular files only
                yield InstanceRef(*match.groups())

    def copy_instance(self, ref: InstanceRef, destination: str, root: str) -> int:
        """A server-side copy when both ends are in GCS: no bytes pass through the worker."""
        source = self.instance_uri(ref)
        if is_gcs(source) and is_gcs(destination):  # the rewrite itself says when there is no source
            try:
                copy(source, destination, root=root)
            except google_errors.NotFound:
                raise FileNotFoundError(source) from None
            except IO_ERRORS as error:
                raise ItemFailed("write_error", describe(error)) from error
            return 0
        size = size_of(source)
        if size is None:
            raise FileNotFoundError(source)
        with failing_as_write_error():
            copy(source, destination, root=root)
        return size

    @contextlib.contextmanager
    def spool(self, ref: InstanceRef) -> Iterator[str]:
        """The stored file itself when local, else a temporary download of it."""
        source = self.instance_uri(ref)
        if not is_gcs(source):
            if not os.path.isfile(source):
                raise FileNotFoundError(source)
            yield source
            return
        with spool_file() as local:
            download(source, local)
            yield local

    def blob_info(self, ref: InstanceRef) -> BlobInfo:
        """The file's size; on gs:// the object's size and storage class (a local file has none).
        FileNotFoundError if there is no such instance."""
        uri = self.instance_uri(ref)
        if not is_gcs(uri):
            return BlobInfo(os.path.getsize(uri), None)
        bucket, name = split_gcs(uri)
        blob = gcs_client().bucket(bucket).get_blob(name)
        if blob is None:
            raise FileNotFoundError(uri)
        return BlobInfo(blob.size, blob.storage_class)

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        return self.dataset(ref).to_json_dict()

    def dataset(self, ref: InstanceRef) -> Dataset:
        """Parsed from the file's header only (file meta included): Pixel Data is never read."""
        uri = self.instance_uri(ref)
        size = size_of(uri)
        if size is None:
            raise FileNotFoundError(uri)
        with open_ranged(MatchedFile(uri, size)) as stream:
            return read_header(stream, size).dataset

    def delete(
        self,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        listed: Sequence[InstanceRef] | None = None,
    ) -> None:
        """Each instance file, then its claim; then what is left under a study or series."""
        if sop is not None and series is not None:
            refs: Sequence[InstanceRef] = [InstanceRef(study, series, sop)]
        else:
            refs = list(self.instances(study, series)) if listed is None else listed
        for ref in refs:
            delete_tree(self.instance_uri(ref))
            index = self._index_uri(ref.sop)
            with contextlib.suppress(FileNotFoundError):
                if read_bytes(index).decode("utf-8", "replace") == ref.path():
                    delete_tree(index)
        if sop is None:
            delete_tree(join(self.root, "studies", study, *(["series", series] if series else [])))
