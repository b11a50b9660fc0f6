"""Write a de-identified copy of each selected instance into another store, with its Provenance."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from dicomlib.deidentify.provenance import instance_resource
from dicomlib.failures import RunFailed, item_failure
from dicomlib.isolated import Isolated, time_allowed
from dicomlib.uids import InstanceRef
from storage.deidentify_file import Deidentified, deidentify_file
from storage.objects import MatchedFile
from storage.secrets import access_secret
from storage.staging import spool_file
from storage.store import ALREADY_PRESENT, FAILURE, SUCCESS, Parsed, Store, Written
from storage.stores import open_store
from transforms import progress
from transforms.store_dofn import StoreDoFn

PROVENANCE = "provenance"
STAGES = {"not_found": "read", "read_error": "read"}


class DeidentifyInstances(StoreDoFn):
    """InstanceRef of the source -> (dead letters, and) the instance's Provenance resource.

    Reads the instance from the source (a local spool), de-identifies it into another spool in a child
    process (storage/deidentify_file.py, dicomlib/isolated.py: pixel codecs and OCR run there) and hands
    the copy to the destination store's `write`, as an import does. The key is read on the worker, from
    env DEID_KEY or the Secret Manager version `key_secret` names; it is never carried in the pipeline's
    graph. Counts success, already_present, failure and each action (deleted, reset, removed,
    regenerated_uid, cleaned).
    """

    def __init__(
        self, source: str, destination: str, config: str, operation_id: str, key_secret: str | None = None
    ) -> None:
        super().__init__(source)
        self.destination_location = destination
        self.config_text = config
        self.operation_id = operation_id
        self.key_secret = key_secret

    def setup(self) -> None:
        super().setup()
        if self.key_secret is not None:
            self.key = access_secret(self.key_secret)
        else:
            key = os.environ.get("DEID_KEY", "")
            if not key:
                raise RunFailed("the environment variable DEID_KEY is not set on this worker")
            self.key = key.encode("utf-8")
        self.isolated = Isolated("cannot_deidentify")
        self.destination: Store = open_store(self.destination_location)

    def teardown(self) -> None:
        self.isolated.close()
        self.destination.close()
        super().teardown()

    def process(self, ref: InstanceRef) -> Iterator[Any]:
        invalid = self.invalid_uid(ref)
        if invalid is not None:
            yield invalid
            return
        path = ref.path()
        with contextlib.ExitStack() as stack:
            try:
                local = stack.enter_context(self.store.spool(ref))
            except FileNotFoundError as error:
                yield self._fail(path, "not_found", f"the source holds no such instance: {error}")
                return
            except BaseException as error:  # item_failure re-raises interrupts and run failures
                failed = item_failure(error, "read_error")
                yield self._fail(path, failed.reason, failed.detail)
                return
            spooled = stack.enter_context(spool_file())
            try:  # a source that is not whole, valid DICOM keeps its reason (truncated, malformed...)
                done: Deidentified = self.isolated.call(
                    deidentify_file,
                    local,
                    spooled,
                    self.config_text,
                    self.key,
                    timeout=time_allowed(os.path.getsize(local)),
                )
            except BaseException as error:
                failed = item_failure(error, "cannot_deidentify")
                yield self._fail(path, failed.reason, failed.detail)
                return
            written = self._write(path, done, spooled)
        if written.outcome not in (SUCCESS, ALREADY_PRESENT):
            yield self.dead_letter(path, "write", written.reason, written.detail)
            return
        self.count(written.outcome)
        progress.finished(written.outcome)
        for action, n in done.result.actions.items():
            self.count(action.lower().replace(" ", "_"), n)
        self.count("findings", done.result.findings)
        recorded = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        yield beam.pvalue.TaggedOutput(
            PROVENANCE,
            instance_resource(
                self.operation_id,
                f"{self.store_location}{path}",
                f"{self.destination_location}{done.ref.path()}",
                recorded,
                done.result,
                done.size,
            ),
        )

    def _write(self, path: str, done: Deidentified, spooled: str) -> Written:
        """The destination's verdict on the copy; a failure to write is the item's write_error."""
        try:
            [written] = self.destination.write([Parsed(MatchedFile(spooled, done.size), done.ref)])
        except BaseException as error:
            failed = item_failure(error, "write_error")
            return Written(path, FAILURE, failed.reason, failed.detail)
        return written

    def _fail(self, path: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        return self.dead_letter(path, STAGES.get(reason, "deidentify"), reason, detail)
