"""Write each selected instance out as files: DICOM, octet-stream frames or rendered images."""

from __future__ import annotations

import os
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import NAMESPACE
from transforms.convert import ConversionError, frames, render, transcode
from transforms.dead_letter import failure
from transforms.dicom_header import valid_uid
from transforms.objects import IO_ERRORS, is_gcs, join, write_bytes
from transforms.progress import Progress
from transforms.store import InstanceRef, open_store

FILE_TYPES = {"dicom": "dcm", "octet-stream": "bin", "jpeg": "jpg", "png": "png"}


class ExportInstances(beam.DoFn):
    """InstanceRef -> the files written for it, under `{output}/{study}/{series}/`.

    `dicom` writes `{sop}.dcm`, unchanged (copied server-side when both ends are in GCS) or
    transcoded to `transfer_syntax`; the other types write one file per frame: `{sop}.{ext}` for a
    single frame, `{sop}_{frame:04d}.{ext}` (frames counted from 1) for several.
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

    def process(self, ref: InstanceRef) -> Iterator[str | beam.pvalue.TaggedOutput]:
        path = ref.path()
        bad = next((uid for uid in ref if not valid_uid(uid)), None)
        if bad is not None:  # a UID from the store becomes a path only if it is a valid UID
            yield self._fail(path, "select", "invalid_uid", f"{bad[:80]!r} is not 1-64 digits and dots")
            return
        stem = join(self.output, ref.study, ref.series, ref.sop)
        stage = "read"
        try:
            if self.file_type == "dicom" and self.transfer_syntax is None:
                stage = "write"
                self.counters["bytes_through_worker"].inc(self.store.copy_instance(ref, f"{stem}.dcm"))
                written = [f"{stem}.dcm"]
            else:
                data = self.store.read(ref)
                self.counters["bytes_through_worker"].inc(len(data))
                stage = "convert"
                files = self._convert(data, stem)
                stage = "write"
                for name, content in files:
                    write_bytes(name, content)
                written = [name for name, _ in files]
        except ConversionError as error:
            yield self._fail(path, stage, error.reason, error.detail)
            return
        except FileNotFoundError as error:
            yield self._fail(path, stage, "not_found", f"the store holds no such instance: {error}")
            return
        except IO_ERRORS as error:
            reason = "write_error" if stage == "write" else "read_error"
            yield self._fail(path, stage, reason, f"{type(error).__name__}: {error}")
            return
        self.counters["success"].inc()
        self.counters["files_written"].inc(len(written))
        self.progress.add("success")
        yield from written

    def _convert(self, data: bytes, stem: str) -> list[tuple[str, bytes]]:
        """(file name, content) for each file this instance becomes."""
        if self.file_type == "dicom":
            return [(f"{stem}.dcm", transcode(data, self.transfer_syntax or ""))]
        parts = frames(data) if self.file_type == "octet-stream" else render(data, self.file_type)
        extension = FILE_TYPES[self.file_type]
        if len(parts) == 1:
            return [(f"{stem}.{extension}", parts[0])]
        return [(f"{stem}_{number:04d}.{extension}", part) for number, part in enumerate(parts, start=1)]

    def _fail(self, path: str, stage: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        self.counters["failure"].inc()
        self.progress.add(reason)
        return failure(path, stage, reason, detail)

    def teardown(self) -> None:
        self.store.close()
