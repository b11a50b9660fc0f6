"""Metadata rows from instances: read each one's attributes (never its pixels) and flatten them."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from pydicom.dataset import Dataset

from dicomlib import NAMESPACE
from dicomlib.failures import item_failure
from dicomlib.flatten import flatten
from dicomlib.header import read_header
from dicomlib.uids import InstanceRef
from schemas.rows import Flat, with_event
from storage.objects import MatchedFile, open_ranged
from storage.tables import current_keys
from transforms import progress
from transforms.store_dofn import StoreDoFn


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RowsFromStore(StoreDoFn):
    """InstanceRef -> a CREATE row of the instance as the store holds it (export_metadata).

    A file-layout store's instances are parsed from their headers; a DICOMweb store's come from
    WADO-RS metadata, never from whole instances.
    """

    def __init__(self, store_location: str, exclude_vrs: Collection[str]) -> None:
        super().__init__(store_location)
        self.exclude_vrs = frozenset(exclude_vrs)

    def process(self, ref: InstanceRef) -> Iterator[Flat | beam.pvalue.TaggedOutput]:
        try:
            flat = flatten(self.store.dataset(ref), self.exclude_vrs)
            blob = self.store.blob_info(ref)
        except BaseException as error:  # item_failure re-raises interrupts
            missing = isinstance(error, FileNotFoundError)
            failed = item_failure(error, "not_found" if missing else "read_error")
            yield self.dead_letter(ref.path(), "read", failed.reason, failed.detail)
            return
        self.count("success")
        progress.finished("success")
        yield with_event(flat, "CREATE", now(), blob.storage_class, blob.size)


class WithoutCurrentRow(beam.DoFn):
    """Batches of import records of already-present instances -> those whose instance has no
    current row at `destination`: stored by a run that was stopped before it wrote their rows (or
    before this destination was added). A re-run writes their rows, so after any interruption the
    view again shows every stored instance, and a clean re-run adds no row."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.missing = Metrics.counter(NAMESPACE, "metadata_rows_restored")

    def process(self, batch: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        present = current_keys(self.destination, {record["sop_uid"] for record in batch})
        for record in batch:
            if (record["study_uid"], record["series_uid"], record["sop_uid"]) not in present:
                self.missing.inc()
                yield record


class RowsOfImported(StoreDoFn):
    """A record of a stored instance (import) -> its CREATE row, from the imported file's header
    (the file is the instance, byte for byte), with the stored object's size and storage class as
    the store reports them, else the file's size and the `--storage_class` given. A row that
    cannot be made is a dead letter and counted: the run then exits 3."""

    def __init__(
        self,
        store_location: str,
        exclude_vrs: Collection[str],
        storage_class: str | None,
        max_requests_in_flight: int | None = None,
    ) -> None:
        super().__init__(store_location, max_requests_in_flight=max_requests_in_flight)
        self.exclude_vrs = frozenset(exclude_vrs)
        self.storage_class = storage_class

    def process(self, stored: dict[str, Any]) -> Iterator[Flat | beam.pvalue.TaggedOutput]:
        ref = InstanceRef(stored["study_uid"], stored["series_uid"], stored["sop_uid"])
        try:
            flat = flatten(self.dataset(stored, ref), self.exclude_vrs)
            blob = self.store.blob_info(ref)
        except BaseException as error:  # the file changed since it was stored; interrupts re-raised
            failed = item_failure(error, "read_error")
            yield self.dead_letter(
                stored["uri"], "metadata", failed.reason, failed.detail, "metadata_failures"
            )
            return
        size = stored["size"] if blob.size is None else blob.size
        yield with_event(flat, "CREATE", now(), blob.storage_class or self.storage_class, size)

    def dataset(self, stored: dict[str, Any], ref: InstanceRef) -> Dataset:
        """The stored instance's header: the imported file's, which is the instance byte for byte."""
        with open_ranged(MatchedFile(stored["uri"], stored["size"])) as stream:
            return read_header(stream, stored["size"]).dataset
