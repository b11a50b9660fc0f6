"""Write a de-identified copy of each selected instance into another store, with its Provenance."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from dicomlib.convert import read_instance
from dicomlib.deidentify import deidentify, parse_config
from dicomlib.deidentify.provenance import instance_resource
from dicomlib.failures import RunFailed, item_failure
from dicomlib.uids import InstanceRef, valid_uid
from storage.objects import MatchedFile
from storage.staging import spool_file
from storage.store import ALREADY_PRESENT, SUCCESS, Parsed, Store
from storage.stores import open_store
from transforms import progress
from transforms.store_dofn import StoreDoFn

PROVENANCE = "provenance"
STAGES = {
    "invalid_uid": "select",
    "not_found": "read",
    "read_error": "read",
    "cannot_deidentify": "deidentify",
}


class DeidentifyInstances(StoreDoFn):
    """InstanceRef of the source -> (dead letters, and) the instance's Provenance resource.

    Reads the instance from the source (a local spool), de-identifies it with dicomlib, writes the new
    file to a spool and hands it to the destination store's `write`, as an import does. The key is
    read from env DEID_KEY on the worker, never carried in the pipeline's graph. Counts success,
    already_present, failure and each action (deleted, reset, removed, regenerated_uid, cleaned).
    """

    def __init__(self, source: str, destination: str, config: str, operation_id: str) -> None:
        super().__init__(source)
        self.destination_location = destination
        self.config_text = config
        self.operation_id = operation_id

    def setup(self) -> None:
        super().setup()
        key = os.environ.get("DEID_KEY", "")
        if not key:
            raise RunFailed("the environment variable DEID_KEY is not set on this worker")
        self.key = key.encode("utf-8")
        self.config = parse_config(self.config_text)
        self.destination: Store = open_store(self.destination_location)

    def teardown(self) -> None:
        self.destination.close()
        super().teardown()

    def process(self, ref: InstanceRef) -> Iterator[Any]:
        path = ref.path()
        bad = next((uid for uid in ref if not valid_uid(uid)), None)
        if bad is not None:
            yield self._fail(path, "invalid_uid", f"{bad[:80]!r} is not 1-64 digits and dots")
            return
        try:
            with self.store.spool(ref) as local, open(local, "rb") as stream:
                source = read_instance(stream)  # bounded: a deflate bomb is too_large
        except FileNotFoundError as error:
            yield self._fail(path, "not_found", f"the source holds no such instance: {error}")
            return
        except BaseException as error:  # item_failure re-raises interrupts
            failed = item_failure(error, "read_error")
            yield self._fail(path, failed.reason, failed.detail)
            return
        try:
            result = deidentify(source, self.config, self.key)
            ds = result.dataset
            new = InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        except BaseException as error:
            failed = item_failure(error, "cannot_deidentify")
            yield self._fail(path, failed.reason, failed.detail)
            return
        bad = next((uid for uid in new if not valid_uid(uid)), None)
        if bad is not None:  # UIDs kept (keepList, skipIdRedaction) may still be malformed
            yield self._fail(path, "invalid_uid", f"the copy's UID {bad[:80]!r} is not 1-64 digits and dots")
            return
        with spool_file() as spooled:
            try:
                ds.save_as(spooled, enforce_file_format=True)
                size = os.path.getsize(spooled)
                [written] = self.destination.write([Parsed(MatchedFile(spooled, size), new)])
            except BaseException as error:
                failed = item_failure(error, "write_error")
                yield self.dead_letter(path, "write", failed.reason, failed.detail)
                return
        if written.outcome not in (SUCCESS, ALREADY_PRESENT):
            yield self.dead_letter(path, "write", written.reason, written.detail)
            return
        self.count(written.outcome)
        progress.finished(written.outcome)
        for action, n in result.actions.items():
            self.count(action.lower().replace(" ", "_"), n)
        self.count("findings", result.findings)
        recorded = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        yield beam.pvalue.TaggedOutput(
            PROVENANCE,
            instance_resource(
                self.operation_id,
                f"{self.store_location}{path}",
                f"{self.destination_location}{new.path()}",
                recorded,
                result,
                size,
            ),
        )

    def _fail(self, path: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        return self.dead_letter(path, STAGES.get(reason, "deidentify"), reason, detail)
