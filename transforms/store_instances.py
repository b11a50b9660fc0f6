"""Parse and validate each matched file, then store it in batches; every file ends counted.

Parsing reads only the header. Storing happens after a GroupByKey on the SOP Instance UID, so files
that share one are written one after the other: the first is stored and the rest are compared
with it (`already_present` or `conflict`), whatever the store and however many workers run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from dicomlib import NAMESPACE
from dicomlib.failures import item_failure
from dicomlib.header import read_header
from dicomlib.uids import InstanceRef
from storage.objects import MatchedFile, open_ranged
from storage.store import FAILURE, SUCCESS, Parsed, Written
from storage.stores import open_store
from transforms import progress
from transforms.dead_letter import failure

MAX_BATCH_INSTANCES = 100
MAX_BATCH_BYTES = 32 * 1024 * 1024
IN_FLIGHT = 4  # batches being written at once by one DoFn instance


class ParseInstances(beam.DoFn):
    """MatchedFile -> (SOP Instance UID, Parsed); unreadable or invalid files to the dead letter."""

    def __init__(self) -> None:
        self.bytes_read = Metrics.counter(NAMESPACE, "bytes_read")
        self.failures = Metrics.counter(NAMESPACE, "failure")

    def process(self, file: MatchedFile) -> Iterator[tuple[str, Parsed] | beam.pvalue.TaggedOutput]:
        try:
            with open_ranged(file) as stream:
                header = read_header(stream, file.size)
                self.bytes_read.inc(stream.raw.bytes_fetched)
        except BaseException as error:  # item_failure re-raises interrupts
            failed = item_failure(error, "read_error")
            self.failures.inc()
            yield failure(file.uri, "parse", failed.reason, failed.detail)
            return
        ref = InstanceRef(header.study_uid, header.series_uid, header.sop_uid)
        yield ref.sop, Parsed(file, ref)


class WriteInstances(beam.DoFn):
    """(SOP Instance UID, files) -> one record per file stored; failures to the dead letter.

    Instances go to the store in batches (at most MAX_BATCH_INSTANCES and MAX_BATCH_BYTES, one
    larger file alone), with up to IN_FLIGHT batches written at once. Counters are incremented on
    the DoFn's own thread, where Beam's metrics are recorded.
    """

    def __init__(
        self,
        location: str,
        storage_class: str | None = None,
        verify_stored: bool = False,
        max_requests_in_flight: int | None = None,
    ) -> None:
        self.location = location
        self.storage_class = storage_class
        self.verify_stored = verify_stored
        self.max_requests_in_flight = max_requests_in_flight
        self.counters = {
            name: Metrics.counter(NAMESPACE, name)
            for name in ("success", "already_present", "failure", "bytes_stored")
        }

    def setup(self) -> None:
        self.store = open_store(
            self.location, self.storage_class, self.verify_stored, self.max_requests_in_flight
        )
        self.store.remove_leftovers()
        self.pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT)

    def start_bundle(self) -> None:
        self.batch: list[Parsed] = []
        self.batch_bytes = 0
        self.writing: collections.deque[tuple[list[Parsed], concurrent.futures.Future]] = collections.deque()

    def process(self, element: tuple[str, Iterable[Parsed]]) -> Iterator[Any]:
        first, *others = sorted(element[1], key=lambda item: item.file.uri)
        if others:  # the same SOP Instance UID in several files: one after the other
            for item in [first, *others]:
                yield from self._outputs(
                    [item], _results([item], self.store.write, [item]), item is not first
                )
            return
        if self.batch and (
            len(self.batch) >= MAX_BATCH_INSTANCES or self.batch_bytes + first.file.size > MAX_BATCH_BYTES
        ):
            yield from self._submit()
        self.batch.append(first)
        self.batch_bytes += first.file.size

    def finish_bundle(self) -> Iterator[Any]:
        pending = itertools.chain(self._submit() if self.batch else (), self._drain())
        for output in pending:  # outside process(), outputs carry their window
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def teardown(self) -> None:
        self.pool.shutdown()
        self.store.remove_leftovers()  # the staging directory, once empty
        self.store.close()

    def _submit(self) -> Iterator[Any]:
        """Start writing the current batch; wait for the oldest one when too many are in flight."""
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        self.writing.append((batch, self.pool.submit(self.store.write, batch)))
        while len(self.writing) > IN_FLIGHT:
            yield from self._collect()

    def _drain(self) -> Iterator[Any]:
        while self.writing:
            yield from self._collect()

    def _collect(self) -> Iterator[Any]:
        batch, future = self.writing.popleft()
        yield from self._outputs(batch, _results(batch, future.result))

    def _outputs(self, batch: list[Parsed], results: list[Written], repeated: bool = False) -> Iterator[Any]:
        """Counters, dead letters and a record per stored file; `repeated`: a file with the SOP
        Instance UID of one written just before in this run."""
        for item, written in zip(batch, results, strict=True):
            self.counters[written.outcome].inc()
            progress.finished(written.outcome)
            if written.outcome == FAILURE:
                yield failure(item.file.uri, "store", written.reason, written.detail)
                continue
            if written.outcome == SUCCESS:
                self.counters["bytes_stored"].inc(item.file.size)
            yield {
                "uri": item.file.uri,
                "location": written.location,
                "outcome": written.outcome,
                "size": item.file.size,
                "study_uid": item.ref.study,
                "series_uid": item.ref.series,
                "sop_uid": item.ref.sop,
                "repeated": repeated,
            }


def _results(batch: list[Parsed], write: Callable[..., list[Written]], *args: Any) -> list[Written]:
    """What `write(*args)` made of the batch; if it raised, each instance's write_error (a store
    that is unusable as a whole raises RunFailed, which stops the run instead)."""
    try:
        return write(*args)
    except BaseException as error:  # item_failure re-raises interrupts and RunFailed
        failed = item_failure(error, "write_error")
        return [Written(FAILURE, item.file.uri, failed.reason, failed.detail) for item in batch]
