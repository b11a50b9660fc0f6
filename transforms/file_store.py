"""The file-layout store: instances kept byte-identical at a path made of their UIDs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from google.api_core import exceptions as google_errors
from pydicom.dataset import Dataset

from transforms.dicom_header import read_header
from transforms.objects import (
    IO_ERRORS,
    Lister,
    MatchedFile,
    copy,
    delete_tree,
    fingerprint,
    gcs_client,
    is_gcs,
    join,
    open_ranged,
    read_bytes,
    size_of,
    split_gcs,
)
from transforms.store import (
    ALREADY_PRESENT,
    FAILURE,
    SUCCESS,
    BlobInfo,
    InstanceRef,
    Parsed,
    Store,
    Written,
)

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
        return join(self.root, "studies", ref.study, "series", ref.series, "instances", f"{ref.sop}.dcm")

    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        return [self._put(item) for item in batch]

    def _put(self, item: Parsed) -> Written:
        """Copy the file unchanged; same size and CRC32C as a stored file is ALREADY_PRESENT.

        Existence is checked first so that a re-run copies nothing; the create-only copy still
        settles a race between two writers.
        """
        target = self.instance_uri(item.ref)
        try:
            existing = fingerprint(target)
            if existing is None and copy(item.file.uri, target, create_only=True):
                return Written(SUCCESS, target)
            same = fingerprint(item.file.uri) == (existing or fingerprint(target))
        except IO_ERRORS as error:
            return Written(FAILURE, target, "write_error", f"{type(error).__name__}: {error}")
        if same:
            return Written(ALREADY_PRESENT, target)
        detail = f"{target} holds different bytes for SOP Instance UID {item.ref.sop}"
        return Written(FAILURE, target, "conflict", detail)

    def studies(self) -> Iterator[str]:
        lister, prefix = self._lister(join(self.root, "studies") + "/")
        _, directories = lister.children(prefix)
        self.listed += lister.listed
        for directory in directories:
            yield directory.rstrip("/").rsplit("/", 1)[-1]

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        parts = ["studies", study] + (["series", series] if series else [])
        lister, prefix = self._lister(join(self.root, *parts) + "/")
        for file in lister.descendants(prefix):
            self.listed += 1
            match = INSTANCE_PATH.search(file.uri)
            if match:
                yield InstanceRef(*match.groups())

    def read(self, ref: InstanceRef) -> bytes:
        return read_bytes(self.instance_uri(ref))

    def copy_instance(self, ref: InstanceRef, destination: str) -> int:
        """A server-side copy when both ends are in GCS: no bytes pass through the worker."""
        source = self.instance_uri(ref)
        if is_gcs(source) and is_gcs(destination):  # the rewrite itself says when there is no source
            try:
                copy(source, destination)
            except google_errors.NotFound:
                raise FileNotFoundError(source) from None
            return 0
        size = size_of(source)
        if size is None:
            raise FileNotFoundError(source)
        copy(source, destination)
        return size

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

    def delete(self, study: str, series: str | None = None, sop: str | None = None) -> None:
        if sop is not None and series is not None:
            delete_tree(self.instance_uri(InstanceRef(study, series, sop)))
        else:
            delete_tree(join(self.root, "studies", study, *(["series", series] if series else [])))

    @staticmethod
    def _lister(prefix_uri: str) -> tuple[Lister, str]:
        """A Lister for the bucket (or local disk) and the name prefix inside it."""
        if is_gcs(prefix_uri):
            bucket, name = split_gcs(prefix_uri)
            return Lister(bucket), name
        return Lister(None), prefix_uri
