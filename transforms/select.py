"""Select a store's instances: all of them, or what a filter file's lines (or targets) name.

Selection never scans more than it must: without a filter, studies are listed and then the
instances of each study; with one, only the studies and series its lines name are listed (a
directory prefix of the file-layout store, a QIDO-RS query of a DICOMweb store), and instance
lines are taken as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from dicomlib.failures import item_failure
from dicomlib.filters import Target, merge, parse_line
from dicomlib.uids import InstanceRef
from storage.objects import read_filter
from transforms import progress
from transforms.store_dofn import StoreDoFn


def merge_study(element: tuple[str, Iterable[Target]]) -> Iterator[Target]:
    """One study's targets without overlaps: every target is inside its study, so merging per
    study (after a GroupByKey) merges the whole file."""
    yield from merge(element[1])


class ListStudies(StoreDoFn):
    """Anything -> a Target for every study in the store (the unfiltered export)."""

    def process(self, _: Any) -> Iterator[Target]:
        before = self.store.listed
        for study in self.store.studies():
            yield Target(study)
        self.count("objects_listed", self.store.listed - before)


class ListInstances(StoreDoFn):
    """Target -> the InstanceRefs it covers; a study or series with none is a `no_match` failure."""

    def process(self, target: Target) -> Iterator[InstanceRef | beam.pvalue.TaggedOutput]:
        if target.sop is not None and target.series is not None:
            self.count("selected")
            progress.count("selected")
            yield InstanceRef(target.study, target.series, target.sop)
            return
        found, before = 0, self.store.listed
        try:
            for ref in self.store.instances(target.study, target.series):
                found += 1
                progress.count("selected")
                yield ref
        except BaseException as error:  # item_failure re-raises interrupts and RunFailed
            failed = item_failure(error, "read_error")
            detail = f"the listing stopped after {found} instances: {failed.detail}"
            yield self.dead_letter(target.path(), "select", failed.reason, detail, "unmatched_targets")
            return
        finally:
            self.count("selected", found)
            self.count("objects_listed", self.store.listed - before)
        if not found:
            detail = f"no instance in {self.store_location}"
            yield self.dead_letter(target.path(), "select", "no_match", detail, "unmatched_targets")


class SelectTargets(beam.PTransform):
    """The Targets of a run: a filter file's lines (or `targets`, the same lines given as options)
    merged study by study, or, with neither, every study of the store.

    The filter file was checked on the launcher; here it is read again inside the pipeline, by the
    same reader (dicomlib/filters.py), so that a file of millions of lines never travels in the
    job's graph and means here what it meant there.
    """

    def __init__(
        self, store_location: str, filter_file: str | None = None, targets: Iterable[str] = ()
    ) -> None:
        super().__init__()
        self.store_location = store_location
        self.filter_file = filter_file
        self.targets = list(targets)

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[Target]:
        if self.filter_file or self.targets:
            targets = (
                begin
                | "FilterFile" >> beam.Create([self.filter_file])
                | "ReadFilter" >> beam.FlatMap(read_filter)
                if self.filter_file
                else begin | "Targets" >> beam.Create(self.targets) | "ParseTargets" >> beam.Map(parse_line)
            )
            return (
                targets
                | "KeyByStudy" >> beam.Map(lambda target: (target.study, target))
                | "ByStudy" >> beam.GroupByKey()
                | "Merge" >> beam.FlatMap(merge_study)
            )
        return (
            begin
            | "Start" >> beam.Create([None])
            | "ListStudies" >> beam.ParDo(ListStudies(self.store_location))
            | "SpreadStudies" >> beam.Reshuffle()
        )


class DeleteTargets(StoreDoFn):
    """Target -> the InstanceRefs it deleted: a study or series in one request, after listing what
    it holds (for the DELETE rows); a target with nothing in the store is a `no_match` failure."""

    def process(self, target: Target) -> Iterator[InstanceRef | beam.pvalue.TaggedOutput]:
        try:
            refs = [ref for ref in self.store.instances(target.study, target.series) if target.covers(ref)]
        except BaseException as error:  # item_failure re-raises interrupts and RunFailed
            failed = item_failure(error, "read_error")
            yield self.dead_letter(target.path(), "select", failed.reason, failed.detail, "unmatched_targets")
            return
        if not refs:
            detail = f"no instance in {self.store_location}"
            yield self.dead_letter(target.path(), "select", "no_match", detail, "unmatched_targets")
            return
        self.count("selected", len(refs))
        progress.count("selected", len(refs))
        try:
            self.store.delete(target.study, target.series, target.sop, listed=refs)
        except BaseException as error:  # item_failure re-raises interrupts and RunFailed
            failed = item_failure(error, "delete_error")
            for ref in refs:
                yield self.dead_letter(ref.path(), "delete", failed.reason, failed.detail)
            return
        self.count("success", len(refs))
        progress.finished("success", len(refs))
        yield from refs
