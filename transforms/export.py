"""Write each selected instance out as files: DICOM, octet-stream frames or rendered images."""

from __future__ import annotations

import os
from collections.abc import Iterator

import apache_beam as beam

from dicomlib.convert import KEEP_SYNTAX
from dicomlib.failures import item_failure
from dicomlib.isolated import Isolated, time_allowed
from dicomlib.lossy import DEFAULT_QUALITY
from dicomlib.uids import InstanceRef
from storage.export_files import convert_file
from storage.objects import is_gcs, join
from storage.staging import clean_staging
from transforms import progress
from transforms.store_dofn import StoreDoFn

STAGES = {"not_found": "read", "read_error": "read", "write_error": "write"}


class ExportInstances(StoreDoFn):
    """InstanceRef -> the files written for it, under `{output}/{study}/{series}/`.

    `dicom` writes `{sop}.dcm`, unchanged with transfer syntax `*` (copied server-side when both
    ends are in GCS) or transcoded to `transfer_syntax` (a lossy one at `quality`, as a new
    instance named by its new SOP Instance UID); the other types write one file per frame (see
    export_files.convert_file). Conversions read the instance from a local file (the stored file, or a
    temporary copy) in a child process (dicomlib/isolated.py): a codec that crashes or hangs on
    a hostile file costs that instance a `cannot_convert` dead letter, not the run.
    """

    def __init__(
        self,
        store_location: str,
        output: str,
        file_type: str,
        transfer_syntax: str = KEEP_SYNTAX,
        quality: int = DEFAULT_QUALITY,
    ) -> None:
        super().__init__(store_location)
        self.output = output
        self.file_type = file_type
        self.transfer_syntax = transfer_syntax
        self.quality = quality

    def setup(self) -> None:
        super().setup()
        self.converter = Isolated("cannot_convert")
        if not is_gcs(self.output):  # the contract: {output} exists after an export
            os.makedirs(self.output, exist_ok=True)
            clean_staging(self.output)

    def process(self, ref: InstanceRef) -> Iterator[str | beam.pvalue.TaggedOutput]:
        invalid = self.invalid_uid(ref)
        if invalid is not None:
            yield invalid
            return
        path = ref.path()
        stem = join(self.output, ref.study, ref.series, ref.sop)
        try:
            written = self._export(ref, stem)
        except FileNotFoundError as error:
            yield self._fail(path, "not_found", f"the store holds no such instance: {error}")
            return
        except BaseException as error:  # item_failure re-raises interrupts
            failed = item_failure(error, "read_error")
            yield self._fail(path, failed.reason, failed.detail)
            return
        self.count("success")
        self.count("files_written", len(written))
        progress.finished("success")
        yield from written

    def _export(self, ref: InstanceRef, stem: str) -> list[str]:
        if self.file_type == "dicom" and self.transfer_syntax == KEEP_SYNTAX:
            moved = self.store.copy_instance(ref, f"{stem}.dcm", self.output)
            self.count("bytes_through_worker", moved)
            return [f"{stem}.dcm"]
        with self.store.spool(ref) as local:
            size = os.path.getsize(local)
            self.count("bytes_through_worker", size)
            return self.converter.call(
                convert_file,
                local,
                stem,
                self.file_type,
                self.transfer_syntax,
                self.quality,
                self.output,
                timeout=time_allowed(size),
            )

    def _fail(self, path: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        return self.dead_letter(path, STAGES.get(reason, "convert"), reason, detail)

    def teardown(self) -> None:
        self.converter.close()
        super().teardown()
        clean_staging(self.output)  # the staging directory, once empty
