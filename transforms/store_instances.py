"""Parse, validate and store each matched file; every file ends as an outcome or a dead letter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from google.api_core import exceptions as google_errors

from transforms import NAMESPACE
from transforms.dead_letter import failure
from transforms.dicom_header import InvalidInstance, read_header
from transforms.file_store import CONFLICT, SUCCESS, FileLayoutStore
from transforms.objects import MatchedFile, open_ranged
from transforms.progress import Progress

READ_ERRORS = (OSError, google_errors.GoogleAPIError)


class StoreInstances(beam.DoFn):
    """MatchedFile -> {uri, path, outcome, uids}; failures to the dead letter with their reason."""

    def __init__(self, store_root: str) -> None:
        self.store_root = store_root
        self.counters = {
            name: Metrics.counter(NAMESPACE, name)
            for name in ("success", "already_present", "failure", "bytes_read", "bytes_stored")
        }

    def setup(self) -> None:
        self.store = FileLayoutStore(self.store_root)
        self.progress = Progress("import_dicom")

    def process(self, file: MatchedFile) -> Iterator[dict[str, Any] | beam.pvalue.TaggedOutput]:
        stage = "parse"
        try:
            with open_ranged(file) as stream:
                header = read_header(stream, file.size)
                self.counters["bytes_read"].inc(stream.raw.bytes_fetched)
            stage = "store"
            outcome, path = self.store.put(file, header)
        except InvalidInstance as error:
            yield self._fail(file.uri, stage, error.reason, error.detail)
            return
        except READ_ERRORS as error:
            reason = "read_error" if stage == "parse" else "write_error"
            yield self._fail(file.uri, stage, reason, f"{type(error).__name__}: {error}")
            return
        if outcome == CONFLICT:
            detail = f"{path} holds different bytes for SOP Instance UID {header.sop_uid}"
            yield self._fail(file.uri, stage, CONFLICT, detail)
            return
        self.counters[outcome].inc()
        if outcome == SUCCESS:
            self.counters["bytes_stored"].inc(file.size)
        self.progress.add(outcome)
        yield {
            "uri": file.uri,
            "path": path,
            "outcome": outcome,
            "study_uid": header.study_uid,
            "series_uid": header.series_uid,
            "sop_uid": header.sop_uid,
        }

    def _fail(self, uri: str, stage: str, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
        self.counters["failure"].inc()
        self.progress.add("failure")
        return failure(uri, stage, reason, detail)
