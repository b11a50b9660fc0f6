"""Metadata rows from instances: read each one's attributes (never its pixels) and flatten them."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import NAMESPACE
from transforms.dead_letter import failure
from transforms.dicom_header import InvalidInstance, read_header
from transforms.flatten import Flat, flatten
from transforms.metadata_sink import with_event
from transforms.objects import IO_ERRORS, MatchedFile, open_ranged
from transforms.progress import Progress
from transforms.store import InstanceRef, open_store


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class StoreRows(beam.DoFn):
    """InstanceRef -> a CREATE row of the instance as the store holds it (export_metadata).

    A file-layout store's instances are parsed from their headers; a DICOMweb store's come from
    WADO-RS metadata, never from whole instances.
    """

    def __init__(self, store_location: str, exclude_vrs: Collection[str]) -> None:
        self.store_location = store_location
        self.exclude_vrs = frozenset(exclude_vrs)
        self.success = Metrics.counter(NAMESPACE, "success")
        self.failures = Metrics.counter(NAMESPACE, "failure")

    def setup(self) -> None:
        self.store = open_store(self.store_location)
        self.progress = Progress("export_metadata")

    def process(self, ref: InstanceRef) -> Iterator[Flat | beam.pvalue.TaggedOutput]:
        try:
            dataset = self.store.dataset(ref)
            blob = self.store.blob_info(ref)
        except FileNotFoundError as error:
            yield self._fail(ref, "not_found", f"the store holds no such instance: {error}")
            return
        except (*IO_ERRORS, InvalidInstance, ValueError) as error:
            yield self._fail(ref, "read_error", f"{type(error).__name__}: {error}")
            return
        self.success.inc()
        self.progress.add("success")
        flat = flatten(dataset, self.exclude_vrs)
        yield with_event(flat, "CREATE", now(), blob.storage_class, blob.size)

    def _fail(self, ref: InstanceRef, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        self.failures.inc()
        self.progress.add(reason)
        return failure(ref.path(), "read", reason, detail)

    def teardown(self) -> None:
        self.store.close()


class StoredRows(beam.DoFn):
    """A record of a newly stored instance (import) -> its CREATE row, from the imported file's
    header (the file is the instance, byte for byte), with the stored object's size and storage
    class as the store reports them; else the file's size and the `--storage_class` given."""

    def __init__(self, store_location: str, exclude_vrs: Collection[str], storage_class: str | None) -> None:
        self.store_location = store_location
        self.exclude_vrs = frozenset(exclude_vrs)
        self.storage_class = storage_class

    def setup(self) -> None:
        self.store = open_store(self.store_location)

    def process(self, stored: dict[str, Any]) -> Iterator[Flat | beam.pvalue.TaggedOutput]:
        if stored["outcome"] != "success":  # already there: its row was written when it was stored
            return
        ref = InstanceRef(stored["study_uid"], stored["series_uid"], stored["sop_uid"])
        try:
            with open_ranged(MatchedFile(stored["uri"], stored["size"])) as stream:
                dataset = read_header(stream, stored["size"]).dataset
            blob = self.store.blob_info(ref)
        except (*IO_ERRORS, InvalidInstance) as error:  # the file changed since it was stored
            yield failure(stored["uri"], "metadata", "read_error", f"{type(error).__name__}: {error}")
            return
        flat = flatten(dataset, self.exclude_vrs)
        size = stored["size"] if blob.size is None else blob.size
        yield with_event(flat, "CREATE", now(), blob.storage_class or self.storage_class, size)

    def teardown(self) -> None:
        self.store.close()
