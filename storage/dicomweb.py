"""DICOMweb stores: any server's service root (the Cloud Healthcare API's is in healthcare_api.py).

STOW-RS carries many instances per request; QIDO-RS lists page by page (studies, then the
instances of one study, never one unbounded query); WADO-RS reads instances in their stored transfer
syntax and metadata as DICOM JSON. Requests, and their retries, go through dicomweb_client.py.

STOW-RS does not say whether an instance was already stored (Orthanc, for one, answers success and
keeps the old copy; the Healthcare API stores identical bytes again), so each batch first asks QIDO-RS
which of its SOP Instance UIDs the store holds, in one query by UID list matching (the Healthcare API,
which matches single values only, lists the batch's series instead: healthcare_api.py); those are
read back and compared instead of sent: the same data set is `already_present`, another is a
`conflict`, as the file-layout store does. A STOW-RS answer that the server holds the UID with other
data (409 with FailureReason 0x0110 or 0x0111) is looked up by that UID alone and compared too.
With `verify_stored`, the same query after the STOW confirms that what the server acknowledged is
there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import requests

from dicomlib import NAMESPACE
from dicomlib.dicom_json import first_value, instance_ref
from dicomlib.failures import describe
from dicomlib.header import data_set_digest
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
from storage.multipart import SOURCE_BUFFER, MultipartBody, SourceUnreadable
from storage.objects import MatchedFile, open_ranged
from storage.staging import spool_file
from storage.store import ALREADY_PRESENT, FAILURE, SUCCESS, Parsed, Store, StoreUnavailable, Written, verdict

LOGGER = logging.getLogger(NAMESPACE)
PAGE = 1000
LIST_MATCH = 100  # SOP Instance UIDs in one QIDO-RS query: about 6.5 KB of URL
DICOM_PART = 'multipart/related; type="application/dicom"; transfer-syntax=*'


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

    def close(self) -> None:
        self.http.session.close()

    # Writing

    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        try:
            stored = self._stored_refs([item.ref for item in batch])
        except RequestFailed as error:
            detail = f"QIDO-RS before STOW-RS: {error}"
            return [Written(FAILURE, self.root + item.ref.path(), "write_error", detail) for item in batch]
        results: dict[int, Written] = {}
        new = []
        for index, item in enumerate(batch):
            if item.ref.sop in stored:
                results[index] = self._compare(item, stored[item.ref.sop])
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

    def _compare(self, item: Parsed, stored: InstanceRef, server: str = "") -> Written:
        """Already stored: the same data set (file meta aside, which servers may rewrite)?
        `server` is what STOW-RS said of it, if it was sent."""
        location = self.root + stored.path()
        try:
            same = stored == item.ref and self._digest(stored) == _file_digest(item.file)
        except OSError as error:
            return Written(FAILURE, location, "read_error", describe(error))
        note = f" (STOW-RS: {server})" if server else ""
        return verdict(location, item.ref.sop, same, "a different data set", note)

    def _digest(self, ref: InstanceRef) -> str:
        with self.spool(ref) as path, open(path, "rb") as stored:
            return data_set_digest(stored)

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
