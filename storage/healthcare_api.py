"""A Cloud Healthcare API DICOM store: a DICOMweb store with the API's limits, storage classes and
long-running operations, reached with Application Default Credentials.

What the API documents and the plain DICOMweb store does not assume:
- QIDO-RS `limit` is at most 5,000 for studies and series and 50,000 for instances, `offset` at most
  1,000,000 (Quotas and limits). Listings use pages of 5,000, a short page is the last, and a
  listing that would pass the offset cap is split: a study's instances series by series, the
  studies by StudyDate ranges. What cannot be split further (over a million studies on one day, or
  instances in one series) stops the run with one line.
- QIDO-RS matches single values (a comma-separated list is one literal value): what a batch already
  holds is found by listing its series, not by UID list matching; the listing also gives the
  series' size, which decides whether it is read whole for comparing (storage/dicomweb.py).
- The Storage-Class header on STOW-RS appears only in v1beta1 examples; v1 documents
  `getStorageInfo` and `setBlobStorageSettings` instead. The header is sent on both roots, the
  first instance stored is asked for its class, and where the header was not applied each newly
  stored instance gets setBlobStorageSettings, so the class is the one asked for either way.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

from dicomlib.dicom_json import first_value
from dicomlib.uids import InstanceRef, dicomweb_path
from storage.dicomweb import LOGGER, DicomWebStore
from storage.dicomweb_client import RequestFailed, with_retries
from storage.store import FAILURE, SUCCESS, BlobInfo, Parsed, StoreUnavailable, Written

HEALTHCARE_API = "https://healthcare.googleapis.com/v1"  # HEALTHCARE_API_ROOT overrides it (v1beta1, tests)
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
MAX_OFFSET = 1_000_000
MAX_LIMIT = {"studies": 5000, "series": 5000, "instances": 50000}
PAGE = 5000
FIRST_DAY = datetime.date.min.toordinal()
LAST_DAY = datetime.date.max.toordinal()


class ListingTooLarge(RequestFailed):
    """A QIDO-RS listing would need an offset past the largest the API accepts."""


def healthcare_store(
    name: str,
    storage_class: str | None = None,
    verify_stored: bool = False,
    max_requests_in_flight: int | None = None,
) -> HealthcareStore:
    """A Cloud Healthcare API store, with Application Default Credentials (refreshed as needed)."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except DefaultCredentialsError as error:
        raise StoreUnavailable(f"no Application Default Credentials for {name}: {error}") from None
    api = os.environ.get("HEALTHCARE_API_ROOT", HEALTHCARE_API).rstrip("/")
    session = with_retries(AuthorizedSession(credentials))
    return HealthcareStore(
        f"{api}/{name}/dicomWeb", session, storage_class, verify_stored, max_requests_in_flight, api
    )


class HealthcareStore(DicomWebStore):
    """The DICOMweb endpoint of a Healthcare API store (`{api}/{store}/dicomWeb`)."""

    header_applied: bool | None = None  # whether this root applies the Storage-Class header

    # Storage class

    def blob_info(self, ref: InstanceRef) -> BlobInfo:
        """The stored object's size and storage class, from getStorageInfo."""
        info = self.http.document("GET", f"{ref.path()}:getStorageInfo").get("blobStorageInfo", {})
        size = info.get("sizeBytes")
        return BlobInfo(int(size) if size is not None else None, info.get("storageClass") or None)

    def _settle_storage_class(
        self, items: list[tuple[int, Parsed]], results: dict[int, Written]
    ) -> dict[int, Written]:
        """Give each newly stored instance the storage class asked for: the header, if this root
        applies it (asked once, of the first instance stored), else setBlobStorageSettings."""
        stored = [(index, item) for index, item in items if results[index].outcome == SUCCESS]
        if not self.storage_class or not stored:
            return results
        if self.header_applied is None:
            try:
                applied = self.blob_info(stored[0][1].ref).storage_class == self.storage_class
            except OSError:  # cannot tell: setBlobStorageSettings makes sure
                applied = None
            self.header_applied = applied
            if applied is not None:
                LOGGER.info("%s: the Storage-Class header is %sapplied", self.root, "" if applied else "not ")
        if self.header_applied:
            return results
        operations = {}
        for index, item in stored:  # all requests first, then the waits: they overlap
            try:
                operations[index] = self._set_storage_class(item.ref)
            except OSError as error:
                results[index] = self._unsettled(results[index], error)
        for index, operation in operations.items():
            try:
                self.http.wait_for(operation)
            except OSError as error:
                results[index] = self._unsettled(results[index], error)
        return results

    def _set_storage_class(self, ref: InstanceRef) -> str:
        """Ask for the instance's storage class to be changed; the operation's name."""
        settings = {"blobStorageSettings": {"blobStorageClass": self.storage_class}}
        operation = self.http.document("POST", f"{ref.path()}:setBlobStorageSettings", json=settings)
        if not operation.get("name"):
            raise RequestFailed(f"{self.root}{ref.path()}:setBlobStorageSettings: no operation in the answer")
        return operation["name"]

    def _unsettled(self, written: Written, error: OSError) -> Written:
        detail = f"stored, but setting its storage class to {self.storage_class} failed: {error}"
        return Written(FAILURE, written.location, "write_error", detail)

    # Finding what is stored

    def _stored_refs(self, refs: Sequence[InstanceRef]) -> dict[str, InstanceRef]:
        """The API matches one value at a time, so a batch's series are listed, once each, and its
        SOP Instance UIDs looked for there: one request per series the batch holds (usually one),
        where single-value queries would cost one per instance. A UID the store holds under another
        series is not found here: STOW-RS answers it with 409, and that answer is looked up alone."""
        wanted = {ref.sop for ref in refs}
        found: dict[str, InstanceRef] = {}
        for study, series in sorted({(ref.study, ref.series) for ref in refs}):
            size = 0
            for held in self.instances(study, series):
                size += 1
                if held.sop in wanted:
                    found[held.sop] = held
            seen = self._series_seen((study, series))  # its size, for comparing: no request
            seen.size, seen.sized = size, True
        return found

    # Listing within the API's limits

    def studies(self) -> Iterator[str]:
        yield from self._studies_between(None)

    def _studies_between(self, days: tuple[int, int] | None) -> Iterator[str]:
        """The studies dated within `days` (ordinals, inclusive), or all of them; halves of the
        range in turn when there are too many to page through."""
        query = None if days is None else {"StudyDate": _date_range(*days)}
        try:
            for item in self._listing("/studies", "studies", query):  # raises before its first result
                study = first_value(item, "0020000D")
                if study:
                    yield study
        except ListingTooLarge:
            low, high = days or (FIRST_DAY, LAST_DAY)
            if low == high:
                day = _date(low)
                raise ListingTooLarge(
                    f"{self.root}/studies: more than {MAX_OFFSET:,} studies dated {day}; QIDO-RS cannot "
                    "list them (name them in a filter file)"
                ) from None
            if days is None:
                LOGGER.warning(
                    "%s holds more than %s studies: listing them by StudyDate ranges; studies without "
                    "a StudyDate match no range and are not listed (name them in a filter file)",
                    self.root,
                    f"{MAX_OFFSET:,}",
                )
            middle = (low + high) // 2
            yield from self._studies_between((low, middle))
            yield from self._studies_between((middle + 1, high))

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        """A study's instances, series by series when there are too many to page through."""
        try:
            yield from super().instances(study, series)  # raises before its first result
        except ListingTooLarge:
            if series is not None:
                raise
            for item in self._listing(dicomweb_path(study) + "/series", "series"):
                series_uid = first_value(item, "0020000E")
                if series_uid:
                    yield from self.instances(study, series_uid)

    def _listing(
        self, path: str, level: str, query: dict[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Pages of PAGE results (within the documented limit); a short page is the last. A full
        first page asks whether anything lies past MAX_OFFSET: if so, ListingTooLarge is raised
        before anything is yielded, so the caller can split the query instead."""
        limit = min(PAGE, MAX_LIMIT[level])
        page = self._page(path, query, limit, 0)
        if len(page) == limit and self._page(path, query, 1, MAX_OFFSET):
            where = f" with StudyDate={query['StudyDate']}" if query else ""
            raise ListingTooLarge(
                f"{self.root}{path}: more than {MAX_OFFSET:,} results{where}, past the largest offset "
                "QIDO-RS accepts"
            )
        offset = 0
        while page:
            yield from page
            offset += len(page)
            if len(page) < limit:
                return
            page = self._page(path, query, limit, offset)


def _date(day: int) -> str:
    """A day ordinal as a DICOM date (DA), years 1 to 9999."""
    date = datetime.date.fromordinal(day)
    return f"{date.year:04d}{date.month:02d}{date.day:02d}"


def _date_range(low: int, high: int) -> str:
    """A StudyDate range; open at the ends of the calendar, so that no dated study falls outside."""
    return (_date(low) if low > FIRST_DAY else "") + "-" + (_date(high) if high < LAST_DAY else "")
