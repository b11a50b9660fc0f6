"""One small interface over the three kinds of store, chosen from the location string.

- a local directory or `gs://bucket/prefix`: the file-layout store (storage/file_store.py);
- `http://...` or `https://...`: any DICOMweb server's service root (storage/dicomweb.py);
- `projects/P/locations/L/datasets/D/dicomStores/S`: a Cloud Healthcare API store, through its
  DICOMweb endpoint with Application Default Credentials.

Every pipeline reaches a store only through this interface, so each works on all three.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

from dicomlib.failures import RunFailed
from dicomlib.uids import InstanceRef
from storage.objects import MatchedFile, copy, failing_as_write_error

STORAGE_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
SUCCESS, ALREADY_PRESENT, FAILURE = "success", "already_present", "failure"


class StoreUnavailable(RunFailed):
    """The store as a whole cannot be used (unreachable, credentials refused, no such store)."""


class Parsed(NamedTuple):
    """A file whose header was read and validated, ready to be stored."""

    file: MatchedFile
    ref: InstanceRef


class BlobInfo(NamedTuple):
    """What a store reports of an instance's stored object, for the metadata table's columns."""

    size: int | None  # BlobStorageSize: bytes, None if the store cannot tell
    storage_class: str | None  # StorageClass: STANDARD, NEARLINE, ...; None if the store has none


class Written(NamedTuple):
    """What became of one instance given to `Store.write`."""

    outcome: str  # SUCCESS, ALREADY_PRESENT or FAILURE
    location: str  # where the instance is (or would be) stored
    reason: str = ""  # the dead letter's reason, for FAILURE
    detail: str = ""


class Store(abc.ABC):
    """Write instances in batches; list, read and delete them."""

    location: str
    listed: int = 0  # objects or QIDO results listed so far: the cost of selection

    @abc.abstractmethod
    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        """Store a batch of instances with distinct SOP Instance UIDs; one result per instance.

        An instance already stored with the same data is ALREADY_PRESENT; one stored with other
        data is a FAILURE with reason `conflict` and changes nothing.
        """

    @abc.abstractmethod
    def studies(self) -> Iterator[str]:
        """Every Study Instance UID in the store, page by page."""

    @abc.abstractmethod
    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        """The instances of one study, or of one series of it, page by page."""

    def read(self, ref: InstanceRef) -> bytes:
        """The instance as a DICOM Part 10 file, in its stored transfer syntax, in memory (for
        small instances: the pipelines use `spool`); FileNotFoundError if the store lacks it."""
        with self.spool(ref) as path, open(path, "rb") as handle:
            return handle.read()

    def dataset(self, ref: InstanceRef) -> Dataset:
        """The instance's attributes as a pydicom Dataset without Pixel Data, for flattening; odd
        values are kept as they are (flattening reports them; dicomlib silences pydicom's warnings)."""
        metadata = self.metadata(ref)
        return Dataset.from_json(metadata, bulk_data_uri_handler=lambda *_: b"")

    def copy_instance(self, ref: InstanceRef, destination: str, root: str) -> int:
        """Write the instance, unchanged, to a local or gs:// file under `root` (an export's
        output); the bytes that passed through this worker (stores that can copy without them
        override this)."""
        with self.spool(ref) as path, failing_as_write_error():
            copy(path, destination, root=root)
            return os.path.getsize(path)

    @abc.abstractmethod
    def spool(self, ref: InstanceRef) -> contextlib.AbstractContextManager[str]:
        """The instance as a local file, in its stored transfer syntax, to read it without holding
        it in memory; removed after use unless it is the stored file itself. FileNotFoundError if
        the store does not hold it."""

    def remove_leftovers(self) -> None:  # noqa: B027 - only stores that stage files need it
        """Remove what a killed run of ours left in the store (staging files), not a live run's."""

    def blob_info(self, ref: InstanceRef) -> BlobInfo:
        """The stored object's size and storage class, as far as this kind of store can tell."""
        return BlobInfo(None, None)

    @abc.abstractmethod
    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        """The instance's attributes as a DICOM JSON object; Pixel Data is left out or given as a
        BulkDataURI (as WADO-RS metadata does), never inline."""

    @abc.abstractmethod
    def delete(
        self,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        listed: Sequence[InstanceRef] | None = None,
    ) -> None:
        """Delete a study, a series or an instance; deleting what is not there is not an error.

        `listed`: the instances the caller found under the study or series, if it listed them, so
        that a store which deletes instance by instance need not list again.
        """

    def close(self) -> None:  # noqa: B027 - only stores holding connections need it
        """Release connections."""


def verdict(location: str, sop: str, same: bool, difference: str, note: str = "") -> Written:
    """An instance whose SOP Instance UID the store holds already: the same content is
    ALREADY_PRESENT, other content a conflict. `difference` names what differs (the bytes, or the
    data set without its file meta group); `note` adds what the server said, if anything."""
    if same:
        return Written(ALREADY_PRESENT, location)
    detail = f"{location} holds {difference} for SOP Instance UID {sop}{note}"
    return Written(FAILURE, location, "conflict", detail)
