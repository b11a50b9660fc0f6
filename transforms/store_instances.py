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
from typing import Any, NamedTuple, cast

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.windowed_value import WindowedValue

from dicomlib import NAMESPACE
from dicomlib.failures import item_failure
from dicomlib.header import read_header
from dicomlib.uids import InstanceRef
from storage.objects import MatchedFile, RangedFile, open_ranged
from storage.store import FAILURE, SUCCESS, Parsed, Written
from transforms import progress
from transforms.dead_letter import failure
from transforms.store_dofn import StoreDoFn

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
                self.bytes_read.inc(cast(RangedFile, stream.raw).bytes_fetched)
        except BaseException as error:  # item_failure re-raises interrupts
            failed = item_failure(error, "read_error")
            self.failures.inc()
            yield failure(file.uri, "parse", failed.reason, failed.detail)
            return
        ref = InstanceRef(header.study_uid, header.series_uid, header.sop_uid)
        yield ref.sop, Parsed(file, ref)


class WriteInstances(StoreDoFn):
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
        super().__init__(
            location,
            storage_class=storage_class,
            verify_stored=verify_stored,
            max_requests_in_flight=max_requests_in_flight,
        )

    def setup(self) -> None:
        super().setup()
        self.store.remove_leftovers()
        self.pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT)

    def start_bundle(self) -> None:
        self.batch: list[Parsed] = []
        self.windows: list[BoundedWindow] = []  # each item's window, for outputs made after process()
        self.batch_bytes = 0
        self.writing: collections.deque[Writing] = collections.deque()

    def source_of(self, item: Parsed) -> str:
        """What an item was read from: several files with one SOP Instance UID are written in its
        order, the first one stored and the others compared with it."""
        return item.file.uri

    def process(
        self, element: tuple[str, Iterable[Parsed]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        first, *others = sorted(element[1], key=self.source_of)
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
        self.windows.append(window)
        self.batch_bytes += first.file.size

    def finish_bundle(self) -> Iterator[Any]:
        yield from itertools.chain(self._submit() if self.batch else (), self._drain())

    def teardown(self) -> None:
        self.pool.shutdown()
        self.store.remove_leftovers()  # the staging directory, once empty
        super().teardown()

    def _submit(self) -> Iterator[Any]:
        """Start writing the current batch; wait for the oldest one when too many are in flight."""
        batch, windows = self.batch, self.windows
        self.batch, self.windows, self.batch_bytes = [], [], 0
        self.writing.append(Writing(batch, windows, self.pool.submit(self.store.write, batch)))
        while len(self.writing) > IN_FLIGHT:
            yield from self._collect()

    def _drain(self) -> Iterator[Any]:
        while self.writing:
            yield from self._collect()

    def _collect(self) -> Iterator[Any]:
        batch, windows, future = self.writing.popleft()
        yield from self._outputs(batch, _results(batch, future.result), windows=windows)

    def _outputs(
        self,
        batch: list[Parsed],
        results: list[Written],
        repeated: bool = False,
        windows: list[BoundedWindow] | None = None,
    ) -> Iterator[Any]:
        """Counters, dead letters and a record per stored file; `repeated`: a file with the SOP
        Instance UID of one written just before in this run. Outputs made outside process() carry
        the window of their item (`windows`), as Beam requires there."""
        for index, (item, written) in enumerate(zip(batch, results, strict=True)):
            for output in self._item_outputs(item, written, repeated):
                yield output if windows is None else _in_window(output, windows[index])

    def _item_outputs(self, item: Parsed, written: Written, repeated: bool) -> Iterator[Any]:
        progress.finished(written.outcome)
        if written.outcome == FAILURE:
            yield self.dead_letter(item.file.uri, "store", written.reason, written.detail)
            return
        self.count(written.outcome)
        if written.outcome == SUCCESS:
            self.count("bytes_stored", item.file.size)
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


class Writing(NamedTuple):
    """A batch being written: its items, their windows, and the write's future."""

    batch: list[Parsed]
    windows: list[BoundedWindow]
    future: concurrent.futures.Future


def _in_window(output: Any, window: BoundedWindow) -> Any:
    """An output (a record or a dead letter) placed in its item's window."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, _in_window(output.value, window))
    return WindowedValue(output, window.max_timestamp(), (window,))
