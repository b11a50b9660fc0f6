"""DICOMweb stores: any server's service root (the Cloud Healthcare API's is in healthcare_api.py).

STOW-RS carries many instances per request; QIDO-RS lists page by page (studies, then the
instances of one study, never one unbounded query); WADO-RS reads instances in their stored transfer
syntax and metadata as DICOM JSON. Requests, and their retries, go through dicomweb_client.py.

STOW-RS does not say whether an instance was already stored (Orthanc, for one, answers success and
keeps the old copy; the Healthcare API stores identical bytes again), so each batch first asks QIDO-RS
which of its SOP Instance UIDs the store holds, in one query by UID list matching (the Healthcare API,
which matches single values only, lists the batch's series instead: healthcare_api.py); those are
compared instead of sent: the same data set is `already_present`, another is a `conflict`, as the
file-layout store does. A STOW-RS answer that the server holds the UID with other data (409 with
FailureReason 0x0110 or 0x0111) is looked up by that UID alone and compared too. With
`verify_stored`, the same query after the STOW confirms that what the server acknowledged is there.

Comparing is exact: SHA-256 of the stored data set's bytes (data_set_digest: everything after the
file meta group, pixels included) against the file's. The stored bytes must therefore be read; the
metadata (`/series/{se}/metadata`) would not do, since its bulk data are only URIs, and fetching
those is again a request per instance. What a re-run saves is requests, not bytes. Once the present
instances of a series that this store was asked to compare, in this batch and the ones before, reach
1/SERIES_READ_RATIO of what the series holds (NumberOfSeriesRelatedInstances: one QIDO-RS query a
series), the series is read whole in one WADO-RS request (`GET /studies/{st}/series/{se}`,
multipart, `transfer-syntax=*`), each instance digested as it streams in (known by the
MediaStorageSOPInstanceUID of its file meta group) and dropped, and the digests of the series are
kept (up to DIGESTS_KEPT per store) for the batches of it still to come, whose instances found there
need no QIDO-RS query either. Until then, and for instances stored after their series was read, each
instance is read alone, as is one whose digest differs, to confirm the conflict. Batches are not
made by series (a shuffle on the SOP Instance UID comes first), hence the count over batches. A
re-run thus costs a QIDO-RS query for each batch holding unread series, two requests a series, and
up to 1/SERIES_READ_RATIO of a series' instances read alone before it is read whole: with series of
50 instances or more, under 0.1 requests per instance. It never reads more than SERIES_READ_RATIO
times the bytes of what it was asked to compare, even when a few files of a large stored series are
imported again. What is kept is what the store held when the series was read: a stored instance does
not change under its UID (Orthanc keeps the first copy, the Healthcare API answers 409 to other
bytes) unless it is deleted, and deleting from a store while importing into it is not guarded
against (neither was it when each instance was read alone: the verdict came after the query and the
read).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from dicomlib import NAMESPACE
from dicomlib.dicom_json import first_value, instance_ref
from dicomlib.failures import describe
from dicomlib.header import DataSetDigester, data_set_digest
from dicomlib.stow_response import DUPLICATE_INSTANCE, PROCESSING_FAILURE, StowAnswer, stow_answer
from dicomlib.uids import InstanceRef, dicomweb_path
from storage.dicomweb_client import (
    DicomWebClient,
    RequestFailed,
    check,
    json_or_none,
    refused,
    status_detail,
)
from storage.multipart import SOURCE_BUFFER, MultipartBody, SourceUnreadable, split_parts
from storage.objects import MatchedFile, open_ranged
from storage.staging import spool_file
from storage.store import ALREADY_PRESENT, FAILURE, SUCCESS, Parsed, Store, StoreUnavailable, Written, verdict

LOGGER = logging.getLogger(NAMESPACE)
PAGE = 1000
LIST_MATCH = 100  # SOP Instance UIDs in one QIDO-RS query: about 6.5 KB of URL
DICOM_PART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SERIES_READ_RATIO = 20  # read a series whole once asked about 1/20 of its instances (see above)
SERIES_READ_MIN = 2  # a series asked about once is not read whole: one instance alone costs as much
DIGESTS_KEPT = 200_000  # digests of series read whole, per store: about 40 MB
SERIES_KEPT = 20_000  # series this store keeps track of


class DicomWebStore(Store):
    """A DICOMweb service root reached through one session (thread-safe, pooled connections)."""

    def __init__(
        self,
        root: str,
        session: requests.Session,
        storage_class: str | None = None,
        verify_stored: bool = False,
        max_requests_in_flight: int | None = None,
        operations_root: str | None = None,
    ) -> None:
        self.location = self.root = root.rstrip("/")
        self.http = DicomWebClient(self.root, session, max_requests_in_flight, operations_root or self.root)
        self.storage_class = storage_class
        self.verify_stored = verify_stored  # QIDO after STOW: see _verify
        self.series_seen: collections.OrderedDict[tuple[str, str], SeriesSeen] = collections.OrderedDict()
        self.series_lock = threading.Lock()  # series_seen is shared by the threads writing batches
        self.digests_kept = 0

    def close(self) -> None:
        self.http.session.close()

    # Writing

    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        known = self._read_whole([item.ref for item in batch])  # present: no QIDO-RS needed
        try:
            stored = self._stored_refs([item.ref for item in batch if item.ref.sop not in known])
        except RequestFailed as error:
            detail = f"QIDO-RS before STOW-RS: {error}"
            return [Written(FAILURE, self.root + item.ref.path(), "write_error", detail) for item in batch]
        stored |= {sop: ref for sop, (ref, _) in known.items()}
        digests = {sop: digest for sop, (_, digest) in known.items()}
        digests |= self._present_digests(
            [item.ref for item in batch if item.ref.sop not in known and stored.get(item.ref.sop) == item.ref]
        )
        results: dict[int, Written] = {}
        new = []
        for index, item in enumerate(batch):
            if item.ref.sop in stored:
                results[index] = self._compare(item, stored[item.ref.sop], digest=digests.get(item.ref.sop))
            else:
                new.append((index, item))
        results.update(self._stow(new))
        return [results[index] for index in range(len(batch))]

    def _stow(self, items: list[tuple[int, Parsed]]) -> dict[int, Written]:
        """One STOW-RS request for all `items`, split in two if the server finds it too large or
        refuses it without saying which instance it refuses."""
        if not items:
            return {}
        body = MultipartBody([item.file for _, item in items])  # read from the files as it is sent
        headers = {"Content-Type": body.content_type, "Accept": "application/dicom+json"}
        if self.storage_class:
            headers["Storage-Class"] = self.storage_class
        try:
            with body:
                response = self.http.request("POST", "/studies", data=body, headers=headers)
        except SourceUnreadable as unreadable:  # that file fails; the others are sent again
            index, item = items[unreadable.index]
            failed = Written(FAILURE, self.root + item.ref.path(), "read_error", describe(unreadable.error))
            return {index: failed, **self._stow(items[: unreadable.index] + items[unreadable.index + 1 :])}
        status = response.status_code
        if status in (404, 405, 501):
            raise StoreUnavailable(f"no STOW-RS service at {self.root}/studies (HTTP {status})")
        answer = stow_answer(response.content)
        if len(items) > 1 and (status == 413 or (answer is None and refused(status))):
            half = len(items) // 2
            return {**self._stow(items[:half]), **self._stow(items[half:])}
        results = {index: self._stow_outcome(item, response, answer) for index, item in items}
        results = self._settle_storage_class(items, results)
        return self._verify(items, results, status) if self.verify_stored else results

    def _verify(
        self, items: list[tuple[int, Parsed]], results: dict[int, Written], status: int
    ) -> dict[int, Written]:
        """Read back what STOW-RS called stored: a server may acknowledge an instance and drop it
        (Orthanc's DICOMweb plugin does when its filter refuses one), or keep another data set that
        a concurrent writer stored first under the same SOP Instance UID (Orthanc answers success
        and keeps its copy). A QIDO-RS query per batch finds them, a WADO-RS read each compares
        them: optional, for what it costs."""
        claimed = [(index, item) for index, item in items if results[index].outcome == SUCCESS]
        try:
            held = self._stored_refs([item.ref for _, item in claimed])
        except RequestFailed as error:
            for index, _ in claimed:
                detail = f"acknowledged by STOW-RS (HTTP {status}), but QIDO-RS could not confirm it: {error}"
                results[index] = Written(FAILURE, results[index].location, "write_error", detail)
            return results
        for index, item in claimed:
            if held.get(item.ref.sop) != item.ref:
                detail = f"acknowledged by STOW-RS (HTTP {status}) but not found by QIDO-RS afterwards"
                results[index] = Written(FAILURE, results[index].location, "rejected", detail)
                continue
            compared = self._compare(item, item.ref, f"acknowledged (HTTP {status})")
            if compared.outcome != ALREADY_PRESENT:  # the store holds other data, or cannot be read
                results[index] = compared
        return results

    def _settle_storage_class(
        self, items: list[tuple[int, Parsed]], results: dict[int, Written]
    ) -> dict[int, Written]:
        """A plain DICOMweb server gets the Storage-Class header only; see HealthcareStore."""
        return results

    def _stow_outcome(self, item: Parsed, response: requests.Response, answer: StowAnswer | None) -> Written:
        """`answer` is the parsed STOW-RS response, None if the body was none (an error body)."""
        location = self.root + item.ref.path()
        status = response.status_code
        if answer is None:  # e.g. Google's JSON error body after the retries: retryable unless refused
            reason = "rejected" if refused(status) else "write_error"
            return Written(FAILURE, location, reason, status_detail(response))
        failed = answer.failed.get(item.ref.sop)
        if failed is not None:
            detail = failed.describe(status)
            if failed.code in (PROCESSING_FAILURE, DUPLICATE_INSTANCE):  # held with other data?
                try:
                    held = self._stored_ref(item.ref.sop)
                except RequestFailed as error:
                    return Written(FAILURE, location, "write_error", f"{detail}; QIDO-RS: {error}")
                if held is not None:
                    return self._compare(item, held, detail)
            return Written(FAILURE, location, "rejected", detail)
        if item.ref.sop in answer.referenced:
            return Written(SUCCESS, location)
        return Written(FAILURE, location, "rejected", f"not in the server's STOW-RS response (HTTP {status})")

    def _compare(
        self, item: Parsed, stored: InstanceRef, server: str = "", digest: str | None = None
    ) -> Written:
        """Already stored: the same data set (file meta aside, which servers may rewrite)?
        `server` is what STOW-RS said of it, if it was sent; `digest` the stored data set's from
        reading its series, if known. Without it, or if it differs (a conflict is confirmed by the
        instance itself), the instance is read."""
        location = self.root + stored.path()
        try:
            expected = _file_digest(item.file) if stored == item.ref else None
            same = expected is not None and (expected == digest or expected == self._digest(stored))
        except OSError as error:
            return Written(FAILURE, location, "read_error", describe(error))
        note = f" (STOW-RS: {server})" if server else ""
        return verdict(location, item.ref.sop, same, "a different data set", note)

    def _digest(self, ref: InstanceRef) -> str:
        with self.spool(ref) as path, open(path, "rb") as stored:
            return data_set_digest(stored)

    def _present_digests(self, refs: Sequence[InstanceRef]) -> dict[str, str]:
        """The stored data sets' digests of these instances that reading their series whole gives
        (see the module's docstring); the others are read one by one by the caller."""
        by_series: dict[tuple[str, str], list[InstanceRef]] = collections.defaultdict(list)
        for ref in refs:
            by_series[(ref.study, ref.series)].append(ref)
        found: dict[str, str] = {}
        for key, wanted in by_series.items():
            seen = self._series_seen(key)
            with seen.lock:  # another batch of this series waits for its reading, then uses it
                if seen.digests is None:
                    seen.asked += len(wanted)
                    if seen.asked >= SERIES_READ_MIN and self._worth_reading(key, seen):
                        seen.digests = self._read_series(*key)
                        self._kept(key, seen)
                known = seen.digests or {}
            found.update((ref.sop, known[ref.sop]) for ref in wanted if ref.sop in known)
        return found

    def _read_whole(self, refs: Sequence[InstanceRef]) -> dict[str, tuple[InstanceRef, str]]:
        """The instances found, with their digests, in a series this store has read whole: stored
        (see the module's docstring), so no QIDO-RS query need look for them."""
        with self.series_lock:
            series = {key: self.series_seen.get(key) for key in {(ref.study, ref.series) for ref in refs}}
        found = {}
        for ref in refs:
            seen = series[(ref.study, ref.series)]
            digest = seen.digests.get(ref.sop) if seen is not None and seen.digests is not None else None
            if digest is not None:
                found[ref.sop] = (ref, digest)
        return found

    def _series_seen(self, key: tuple[str, str]) -> SeriesSeen:
        with self.series_lock:
            seen = self.series_seen.get(key)
            if seen is None:
                seen = self.series_seen[key] = SeriesSeen()
                while len(self.series_seen) > SERIES_KEPT:
                    self._forget_oldest()
            self.series_seen.move_to_end(key)
            return seen

    def _kept(self, key: tuple[str, str], seen: SeriesSeen) -> None:
        """The series was read: forget those used longest ago beyond DIGESTS_KEPT digests."""
        with self.series_lock:
            if self.series_seen.get(key) is not seen:  # forgotten while it was read
                return
            self.digests_kept += len(seen.digests or {})
            while self.digests_kept > DIGESTS_KEPT and len(self.series_seen) > 1:
                self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, oldest = self.series_seen.popitem(last=False)
        self.digests_kept -= len(oldest.digests or {})

    def _worth_reading(self, key: tuple[str, str], seen: SeriesSeen) -> bool:
        """Whether the instances asked about so far are at least 1/SERIES_READ_RATIO of the
        series, and its digests fit in DIGESTS_KEPT; a series of unknown size is read."""
        if not seen.sized:
            try:
                seen.size = self._series_size(*key)
            except RequestFailed as error:
                LOGGER.info("%s: the size of series %s is unknown: %s", self.root, key[1], error)
            seen.sized = True
        if seen.size is None:
            return True
        return seen.size <= DIGESTS_KEPT and seen.asked * SERIES_READ_RATIO >= seen.size

    def _series_size(self, study: str, series: str) -> int | None:
        """How many instances the store holds in the series (QIDO-RS NumberOfSeriesRelatedInstances);
        None if the server does not say."""
        params = {"SeriesInstanceUID": series, "includefield": "00201209", "limit": "2"}
        for item in self.http.json("GET", dicomweb_path(study) + "/series", params=params):
            size = first_value(item, "00201209")
            if first_value(item, "0020000E") == series and size is not None:
                with contextlib.suppress(TypeError, ValueError):
                    return int(size)
        return None

    def _read_series(self, study: str, series: str) -> dict[str, str]:
        """The data set digest of every instance of the series, by SOP Instance UID: one WADO-RS
        request, each instance digested as it arrives and dropped. A series that cannot be read
        gives nothing (its instances are then read one by one)."""
        digester = SeriesDigester()
        try:
            self.http.receive(dicomweb_path(study, series), DICOM_PART, digester.consume)
        except OSError as error:  # RequestFailed, FileNotFoundError: the instances, one by one
            LOGGER.info("%s: series %s not read whole: %s", self.root, series, describe(error))
            return {}
        return digester.digests

    def _stored_refs(self, refs: Sequence[InstanceRef]) -> dict[str, InstanceRef]:
        """Which of these instances' SOP Instance UIDs the store holds, under any study and series:
        QIDO-RS UID list matching (PS3.18: a comma-separated list of UIDs), up to LIST_MATCH UIDs a
        query, so a batch costs one request. Results for other UIDs do not count."""
        wanted = sorted({ref.sop for ref in refs})
        found: dict[str, InstanceRef] = {}
        for start in range(0, len(wanted), LIST_MATCH):
            chunk = wanted[start : start + LIST_MATCH]
            params = {"SOPInstanceUID": ",".join(chunk), "limit": str(2 * len(chunk))}
            for ref in map(instance_ref, self.http.json("GET", "/instances", params=params)):
                if ref is not None and ref.sop in chunk:
                    found[ref.sop] = ref
        return found

    def _stored_ref(self, sop: str) -> InstanceRef | None:
        """One single-value QIDO-RS query: what every server matches, the Healthcare API included.
        Results for other UIDs (a server that ignores the key) do not count."""
        found = self.http.json("GET", "/instances", params={"SOPInstanceUID": sop, "limit": "2"})
        refs = [ref for ref in map(instance_ref, found) if ref is not None and ref.sop == sop]
        return refs[0] if refs else None

    # Reading

    def studies(self) -> Iterator[str]:
        for item in self._listing("/studies", "studies"):
            study = first_value(item, "0020000D")
            if study:
                yield study

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        path = dicomweb_path(study, series) + "/instances"
        for item in self._listing(path, "instances"):
            ref = instance_ref(item, study, series)
            if ref is not None:
                yield ref

    def _listing(
        self, path: str, level: str, query: dict[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """A QIDO-RS query page by page, until an empty page: a server may cap `limit` lower.
        `level` (studies, series, instances) is what it lists."""
        offset = 0
        while True:
            page = self._page(path, query, PAGE, offset)
            if not page:
                return
            yield from page
            offset += len(page)

    def _page(self, path: str, query: dict[str, str] | None, limit: int, offset: int) -> list[dict[str, Any]]:
        page = self.http.json(
            "GET", path, params={**(query or {}), "limit": str(limit), "offset": str(offset)}
        )
        self.listed += len(page)
        return page

    @contextlib.contextmanager
    def spool(self, ref: InstanceRef) -> Iterator[str]:
        """WADO-RS in the stored transfer syntax, written to a temporary file as it arrives; an
        answer that breaks off is asked again."""
        with spool_file() as path:
            self.http.download(ref.path(), DICOM_PART, path)
            yield path

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        found = self.http.json("GET", f"{ref.path()}/metadata")
        if not found:
            raise RequestFailed(f"{self.root}{ref.path()}/metadata: empty answer")
        return found[0]

    # Deleting

    def delete(
        self,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        listed: Sequence[InstanceRef] | None = None,
    ) -> None:
        path = dicomweb_path(study, series, sop)
        response = self.http.request("DELETE", path)
        if response.status_code == 404:
            return
        if response.status_code in (405, 501):
            raise StoreUnavailable(f"the DICOMweb server at {self.root} does not support DELETE")
        check(response, path)
        operation = json_or_none(response)
        if isinstance(operation, dict) and "/operations/" in str(operation.get("name", "")):
            self.http.wait_for(operation["name"])


def _file_digest(file: MatchedFile) -> str:
    with open_ranged(file, SOURCE_BUFFER) as stream:
        return data_set_digest(stream)


@dataclass
class SeriesSeen:
    """What one store knows of a stored series: its size once asked, how many of its present
    instances it was asked to compare, and its instances' digests once read whole."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sized: bool = False
    size: int | None = None
    asked: int = 0
    digests: dict[str, str] | None = None


class SeriesDigester:
    """The parts of a multipart WADO-RS answer, each digested as it streams in (DataSetDigester),
    by the SOP Instance UID its file meta group names."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.part = DataSetDigester()

    def consume(self, chunks: Iterator[bytes], content_type: str) -> None:
        self.digests = {}  # an answer asked again is consumed again from its start
        split_parts(chunks, content_type, self)

    def begin(self) -> None:
        self.part = DataSetDigester()

    def write(self, data: bytes) -> None:
        self.part.update(data)

    def end(self) -> None:
        sop, digest = self.part.result()
        if sop is not None:  # one that names no instance is read alone, and judged then
            self.digests[sop] = digest
