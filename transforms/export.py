"""Write each selected instance out as files: DICOM, octet-stream frames or rendered images."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import NAMESPACE
from transforms.convert import frame_count, frames, read_instance, render, transcode
from transforms.dead_letter import failure
from transforms.dicom_header import valid_uid
from transforms.failures import ItemFailed, describe, item_failure
from transforms.objects import IO_ERRORS, clean_staging, copy, delete_tree, is_gcs, join, write_bytes
from transforms.progress import Progress
from transforms.store import InstanceRef, open_store

FILE_TYPES = {"dicom": "dcm", "octet-stream": "bin", "jpeg": "jpg", "png": "png"}
STAGES = {"invalid_uid": "select", "not_found": "read", "read_error": "read", "write_error": "write"}


class ExportInstances(beam.DoFn):
    """InstanceRef -> the files written for it, under `{output}/{study}/{series}/`.

    `dicom` writes `{sop}.dcm`, unchanged (copied server-side when both ends are in GCS) or
    transcoded to `transfer_syntax`; the other types write one file per frame: `{sop}.{ext}` for a
    single frame, `{sop}_{frame:04d}.{ext}` (frames counted from 1) for several. The instance is
    read from a local file (the stored file, or a temporary copy) and its output written a frame
    at a time, so memory holds one instance as stored plus a frame. An instance that fails leaves
    none of its files behind.
    """

    def __init__(self, store_location: str, output: str, file_type: str, transfer_syntax: str | None) -> None:
        self.store_location = store_location
        self.output = output
        self.file_type = file_type
        self.transfer_syntax = transfer_syntax
        self.counters = {
            name: Metrics.counter(NAMESPACE, name)
            for name in ("success", "failure", "files_written", "bytes_through_worker")
        }

    def setup(self) -> None:
        self.store = open_store(self.store_location)
        self.progress = Progress("export_dicom")
        if not is_gcs(self.output):  # the contract: {output} exists after an export
            os.makedirs(self.output, exist_ok=True)
            clean_staging(self.output)

    def process(self, ref: InstanceRef) -> Iterator[str | beam.pvalue.TaggedOutput]:
        path = ref.path()
        bad = next((uid for uid in ref if not valid_uid(uid)), None)
        if bad is not None:  # a UID from the store becomes a path only if it is a valid UID
            yield self._fail(path, "invalid_uid", f"{bad[:80]!r} is not 1-64 digits and dots")
            return
        stem = join(self.output, ref.study, ref.series, ref.sop)
        written: list[str] = []
        try:
            if self.file_type == "dicom" and self.transfer_syntax is None:
                with _failing_as("write_error"):
                    moved = self.store.copy_instance(ref, f"{stem}.dcm", self.output)
                written.append(f"{stem}.dcm")
                self.counters["bytes_through_worker"].inc(moved)
            else:
                with self.store.spool(ref) as local:
                    self.counters["bytes_through_worker"].inc(os.path.getsize(local))
                    self._convert(local, stem, written)
        except BaseException as error:  # item_failure re-raises interrupts
            with contextlib.suppress(*IO_ERRORS):  # an instance is exported whole or not at all
                for name in written:
                    delete_tree(name)
            if isinstance(error, FileNotFoundError):
                yield self._fail(path, "not_found", f"the store holds no such instance: {error}")
            else:
                failed = item_failure(error, "read_error")
                yield self._fail(path, failed.reason, failed.detail)
            return
        self.counters["success"].inc()
        self.counters["files_written"].inc(len(written))
        self.progress.add("success")
        yield from written

    def _convert(self, local: str, stem: str, written: list[str]) -> None:
        """Write the files the instance in `local` becomes, adding each name to `written`."""
        ds = read_instance(local)
        if self.file_type == "dicom":
            target = self.transfer_syntax or ""
            with tempfile.TemporaryDirectory(prefix="dicom-etl-") as directory:
                source = local
                if ds.file_meta.get("TransferSyntaxUID") != target:  # else unchanged, like a copy
                    source = os.path.join(directory, "transcoded.dcm")
                    with open(source, "wb") as out:
                        transcode(ds, target, out)
                with _failing_as("write_error"):
                    copy(source, f"{stem}.dcm", root=self.output)
            written.append(f"{stem}.dcm")
            return
        parts = frames(ds) if self.file_type == "octet-stream" else render(ds, self.file_type)
        extension = FILE_TYPES[self.file_type]
        several = frame_count(ds) > 1
        for number, part in enumerate(parts, start=1):
            name = f"{stem}_{number:04d}.{extension}" if several else f"{stem}.{extension}"
            with _failing_as("write_error"):
                write_bytes(name, part, root=self.output)
            written.append(name)

    def _fail(self, path: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        self.counters["failure"].inc()
        self.progress.add(reason)
        return failure(path, STAGES.get(reason, "convert"), reason, detail)

    def teardown(self) -> None:
        self.store.close()


@contextlib.contextmanager
def _failing_as(reason: str) -> Iterator[None]:
    """File and object errors (but a missing source) as ItemFailed(reason): where a step both
    reads and writes, which of the two failed."""
    try:
        yield
    except FileNotFoundError:
        raise
    except IO_ERRORS as error:
        raise ItemFailed(reason, describe(error)) from error
