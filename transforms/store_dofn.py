"""The base of every DoFn that works on one store."""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from dicomlib import NAMESPACE
from dicomlib.uids import InstanceRef, valid_uid
from storage.store import Store
from storage.stores import open_store
from transforms.dead_letter import failure


class StoreDoFn(beam.DoFn):
    """Opens its store on the worker, once per DoFn instance (setup), and closes it at teardown:
    never on the launcher, where the DoFn is only constructed and pickled. Counts outcomes with
    Beam's Metrics and makes dead letters."""

    def __init__(self, store_location: str, **store_options: Any) -> None:
        self.store_location = store_location
        self.store_options = store_options  # open_store's keyword arguments
        self._counters: dict[str, Any] = {}

    def setup(self) -> None:
        self.store: Store = open_store(self.store_location, **self.store_options)

    def teardown(self) -> None:
        self.store.close()

    def count(self, name: str, n: int = 1) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
        counter.inc(n)

    def dead_letter(
        self, uri: str, stage: str, reason: str, detail: str = "", counter: str | None = "failure"
    ) -> beam.pvalue.TaggedOutput:
        """The item's dead letter, counted under `counter` (None: counted by the caller)."""
        if counter:
            self.count(counter)
        return failure(uri, stage, reason, detail)

    def invalid_uid(self, ref: InstanceRef) -> beam.pvalue.TaggedOutput | None:
        """The dead letter of an instance the store lists with a malformed UID (a UID becomes a path
        only if it is a valid UID); None when its UIDs are valid."""
        bad = next((uid for uid in ref if not valid_uid(uid)), None)
        if bad is None:
            return None
        return self.dead_letter(
            ref.path(), "select", "invalid_uid", f"{bad[:80]!r} is not 1-64 digits and dots"
        )
