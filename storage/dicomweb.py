"""DICOMweb stores: any server's service root (the Cloud Healthcare API's is in healthcare_api.py).

STOW-RS carries many instances per request; QIDO-RS lists page by page (studies, then the
instances of one study, never one unbounded query); WADO-RS reads instances in their stored transfer
syntax and metadata as DICOM JSON. requests with urllib3's Retry retries connection errors, 408 and
5xx with exponential backoff and jitter, honouring Retry-After; 429 (a quota, refilled by the minute)
is retried here with a longer budget, and so is a response cut off midway, because urllib3 has
already handed it over when its body breaks.

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
import json
import logging
import os
import random
import re
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import requests
from google.auth.exceptions import GoogleAuthError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from dicomlib import NAMESPACE
from dicomlib.failures import describe
from dicomlib.header import data_set_digest
from dicomlib.uids import InstanceRef
from storage.multipart import CHUNK, SOURCE_BUFFER, MultipartBody, SourceUnreadable, save_single_part
from storage.objects import MatchedFile, open_ranged, spool_file
from storage.store import ALREADY_PRESENT, FAILURE, SUCCESS, Parsed, Store, StoreUnavailable, Written

LOGGER = logging.getLogger(NAMESPACE)
RETRYABLE_STATUSES = (408, 500, 502, 503, 504)  # urllib3 retries these; 429 is retried in _request
STATUS_RETRIES = 8  # about 90 s of backoff for 5xx
BACKOFF = 0.5  # seconds, doubled per retry up to BACKOFF_MAX
BACKOFF_MAX = 30.0
THROTTLED = 429
THROTTLE_ATTEMPTS = 20  # about 15 minutes of backoff: quotas are per minute, so 429 waits longer
THROTTLE_BACKOFF = 1.0
THROTTLE_BACKOFF_MAX = 64.0
BROKEN_BODY_ATTEMPTS = 5
TIMEOUT = (10, 600)  # seconds to connect, and to wait for a STOW of tens of MB
PAGE = 1000
LIST_MATCH = 100  # SOP Instance UIDs in one QIDO-RS query: about 6.5 KB of URL
OPERATION_DEADLINE = 3600.0  # seconds a long-running operation may take before it counts as failed
DICOM_PART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
PROCESSING_FAILURE = 0x0110  # the Healthcare API's FailureReason for a UID it holds with other data
DUPLICATE_INSTANCE = 0x0111
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    DUPLICATE_INSTANCE: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


class RequestFailed(OSError):
    """One request failed for good; the instances it concerned are dead letters."""


class Failed(NamedTuple):
    """A FailedSOPSequence item: its FailureReason and the server's FailureDetail, if any."""

    code: int
    detail: str = ""

    def describe(self, status: int) -> str:
        meaning = FAILURE_REASONS.get(self.code, "unknown reason")
        detail = f": {self.detail}" if self.detail else ""
        return f"FailureReason {self.code:#06x} ({meaning}){detail}, HTTP {status}"


class StowAnswer(NamedTuple):
    """A STOW-RS response: the SOP Instance UIDs stored, and those that failed."""

    referenced: set[str]
    failed: dict[str, Failed]


class ServerRetry(Retry):
    """urllib3's Retry, leaving 429 to DicomWebStore._request (a longer budget, without holding a
    request slot while it waits) and 413 to the caller (it splits the batch)."""

    RETRY_AFTER_STATUS_CODES = frozenset({503})


def retry_policy() -> Retry:
    return ServerRetry(
        total=STATUS_RETRIES + 2,
        connect=5,
        read=5,
        status=STATUS_RETRIES,
        backoff_factor=BACKOFF,
        backoff_jitter=BACKOFF,
        backoff_max=BACKOFF_MAX,
        status_forcelist=RETRYABLE_STATUSES,
        allowed_methods=None,  # STOW is safe to repeat: a stored instance is stored once
        respect_retry_after_header=True,
        raise_on_status=False,
    )


def with_retries(session: requests.Session, connections: int = 16) -> requests.Session:
    adapter = HTTPAdapter(max_retries=retry_policy(), pool_connections=4, pool_maxsize=connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def session_from_environment() -> requests.Session:
    """Basic auth from DICOMWEB_USERNAME/DICOMWEB_PASSWORD, or a bearer token from DICOMWEB_TOKEN."""
    session = requests.Session()
    token = os.environ.get("DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get("DICOMWEB_USERNAME"):
        session.auth = (os.environ["DICOMWEB_USERNAME"], os.environ.get("DICOMWEB_PASSWORD", ""))
    return with_retries(session)


def request_slots(root: str, limit: int | None) -> contextlib.AbstractContextManager:
    """At most `limit` requests in flight to `root` from this process, whichever store or thread
    sends them: quotas count a project's requests, not a thread's. None: no cap."""
    if limit is None:
        return contextlib.nullcontext()
    with _SLOTS_LOCK:
        return _SLOTS.setdefault((root, limit), threading.BoundedSemaphore(limit))


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
        self.session = session
        self.storage_class = storage_class
        self.verify_stored = verify_stored  # QIDO after STOW: see _verify
        self.slots = request_slots(self.root, max_requests_in_flight)
        self.operations_root = operations_root or self.root  # where long-running operations are polled

    def close(self) -> None:
        self.session.close()

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
                response = self._request("POST", "/studies", data=body, headers=headers)
        except SourceUnreadable as unreadable:  # that file fails; the others are sent again
            index, item = items[unreadable.index]
            failed = Written(FAILURE, self.root + item.ref.path(), "read_error", describe(unreadable.error))
            return {index: failed, **self._stow(items[: unreadable.index] + items[unreadable.index + 1 :])}
        status = response.status_code
        if status in (404, 405, 501):
            raise StoreUnavailable(f"no STOW-RS service at {self.root}/studies (HTTP {status})")
        answer = stow_answer(response)
        if len(items) > 1 and (status == 413 or (answer is None and _refused(status))):
            half = len(items) // 2
            return {**self._stow(items[:half]), **self._stow(items[half:])}
        results = {index: self._stow_outcome(item, response, answer) for index, item in items}
        results = self._settle_storage_class(items, results)
        return self._verify(items, results, status) if self.verify_stored else results

    def _verify(
        self, items: list[tuple[int, Parsed]], results: dict[int, Written], status: int
    ) -> dict[int, Written]:
        """Ask QIDO for the instances STOW-RS called stored: a server may acknowledge an instance
        and drop it (Orthanc's DICOMweb plugin does when its filter refuses one). Optional, as it
        costs a QIDO query per instance, whose match the server must look up."""
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
            reason = "rejected" if _refused(status) else "write_error"
            return Written(FAILURE, location, reason, _status_detail(response))
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
        if same:
            return Written(ALREADY_PRESENT, location)
        detail = f"{location} holds a different data set for SOP Instance UID {item.ref.sop}"
        return Written(FAILURE, location, "conflict", detail + (f" (STOW-RS: {server})" if server else ""))

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
            for ref in map(_ref, self._json("GET", "/instances", params=params)):
                if ref is not None and ref.sop in chunk:
                    found[ref.sop] = ref
        return found

    def _stored_ref(self, sop: str) -> InstanceRef | None:
        """One single-value QIDO-RS query: what every server matches, the Healthcare API included.
        Results for other UIDs (a server that ignores the key) do not count."""
        found = self._json("GET", "/instances", params={"SOPInstanceUID": sop, "limit": "2"})
        refs = [ref for ref in map(_ref, found) if ref is not None and ref.sop == sop]
        return refs[0] if refs else None

    # Reading

    def studies(self) -> Iterator[str]:
        for item in self._listing("/studies", "studies"):
            study = first_value(item, "0020000D")
            if study:
                yield study

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        path = f"/studies/{study}" + (f"/series/{series}" if series else "") + "/instances"
        for item in self._listing(path, "instances"):
            ref = _ref(item, study, series)
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
        page = self._json("GET", path, params={**(query or {}), "limit": str(limit), "offset": str(offset)})
        self.listed += len(page)
        return page

    @contextlib.contextmanager
    def spool(self, ref: InstanceRef) -> Iterator[str]:
        """WADO-RS in the stored transfer syntax, written to a temporary file as it arrives; an
        answer that breaks off is asked again."""
        with spool_file() as path:
            for attempt in range(1, BROKEN_BODY_ATTEMPTS + 1):
                response = self._request("GET", ref.path(), headers={"Accept": DICOM_PART}, stream=True)
                try:
                    if response.status_code == 404:
                        raise FileNotFoundError(f"{self.root}{ref.path()}")
                    _check(response, ref.path())
                    with open(path, "wb") as out:
                        chunks = response.iter_content(CHUNK)
                        save_single_part(chunks, response.headers.get("Content-Type", ""), out)
                    break
                except ValueError as error:
                    raise RequestFailed(f"{self.root}{ref.path()}: {error}") from None
                except requests.RequestException as error:  # the answer broke off
                    if attempt == BROKEN_BODY_ATTEMPTS:
                        raise RequestFailed(f"GET {self.root}{ref.path()}: {type(error).__name__}") from None
                    time.sleep(_backoff(attempt, BACKOFF, BACKOFF_MAX))
                finally:
                    response.close()
            yield path

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        found = self._json("GET", f"{ref.path()}/metadata")
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
        path = f"/studies/{study}" + (f"/series/{series}" if series else "")
        path += f"/instances/{sop}" if series and sop else ""
        response = self._request("DELETE", path)
        if response.status_code == 404:
            return
        if response.status_code in (405, 501):
            raise StoreUnavailable(f"the DICOMweb server at {self.root} does not support DELETE")
        _check(response, path)
        operation = _json_or_none(response)
        if isinstance(operation, dict) and "/operations/" in str(operation.get("name", "")):
            self._wait_for(operation["name"])

    def _wait_for(self, name: str) -> None:
        """Poll a long-running operation (the Healthcare API's) until it is done, through the
        retrying, token-refreshing request path; one that outlasts OPERATION_DEADLINE has failed."""
        deadline = time.monotonic() + OPERATION_DEADLINE
        delay = 0.5
        while True:
            operation = self._document("GET", f"/{name}", base=self.operations_root)
            if operation.get("done"):
                if "error" in operation:
                    raise RequestFailed(f"{name}: {operation['error'].get('message', operation['error'])}")
                return
            if time.monotonic() + delay > deadline:
                raise RequestFailed(f"{name}: not done after {OPERATION_DEADLINE:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 10)

    # Requests

    def _json(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """A DICOM JSON answer: a list of data sets (none for 204)."""
        response = self._request(method, path, headers={"Accept": "application/dicom+json"}, **kwargs)
        if response.status_code == 204:
            return []
        _check(response, path)
        found = _json_or_none(response)
        if not isinstance(found, list):
            raise RequestFailed(f"{self.root}{path}: the answer is not DICOM JSON")
        return found

    def _document(self, method: str, path: str, base: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """A JSON object answer (an operation, storage info); FileNotFoundError for 404."""
        response = self._request(method, path, base=base, headers={"Accept": "application/json"}, **kwargs)
        if response.status_code == 404:
            raise FileNotFoundError(f"{base or self.root}{path}")
        _check(response, path)
        found = _json_or_none(response)
        if not isinstance(found, dict):
            raise RequestFailed(f"{base or self.root}{path}: the answer is not a JSON object")
        return found

    def _request(self, method: str, path: str, base: str | None = None, **kwargs: Any) -> requests.Response:
        """One request with retries; a store that cannot be reached or refuses us stops the run.

        Holds one of the process's request slots while the request is out, not while it waits to
        repeat a 429; returns the last answer when the retries are spent.
        """
        url = (base or self.root) + path
        body = kwargs.get("data")
        start = body.tell() if hasattr(body, "seek") else None  # a streamed body, sent again from here
        broken = throttled = 0
        while True:
            if start is not None:
                body.seek(start)
            try:
                with self.slots:
                    response = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
            except requests.exceptions.ChunkedEncodingError as error:  # the answer broke off
                broken += 1
                if broken == BROKEN_BODY_ATTEMPTS:
                    raise RequestFailed(f"{method} {url}: {type(error).__name__}") from None
                time.sleep(_backoff(broken, BACKOFF, BACKOFF_MAX))
                continue
            except GoogleAuthError as error:
                raise StoreUnavailable(f"no access token for {self.root}: {type(error).__name__}") from None
            except requests.RequestException as error:
                reason = _cause(error)
                raise StoreUnavailable(f"cannot reach the DICOMweb store {self.root}: {reason}") from None
            if response.status_code in (401, 403):
                raise StoreUnavailable(
                    f"the DICOMweb store {self.root} refused our credentials (HTTP {response.status_code})"
                )
            if response.status_code == THROTTLED and throttled < THROTTLE_ATTEMPTS:
                throttled += 1
                backoff = _backoff(throttled, THROTTLE_BACKOFF, THROTTLE_BACKOFF_MAX)
                time.sleep(max(_retry_after(response), backoff))
                continue
            return response


def parse_stow_response(response: requests.Response) -> StowAnswer:
    """SOP Instance UIDs stored, and those failed with their FailureReason, from JSON or XML.

    Raises ValueError when the body is not a STOW-RS response: one holds a ReferencedSOPSequence or
    a FailedSOPSequence (an error body such as Google's `{"error": {...}}` holds neither).
    """
    text = response.content.strip()
    if not text:
        raise ValueError("empty STOW-RS response")
    if text.startswith(b"<"):
        items = _xml_sequences(ElementTree.fromstring(text))
    else:
        document = json.loads(text)
        document = document[0] if isinstance(document, list) and document else document
        if not isinstance(document, dict):
            raise ValueError("unexpected STOW-RS response")
        items = {
            tag: [
                (first_value(item, "00081155"), first_value(item, "00081197"), _failure_detail(item))
                for item in document[tag].get("Value") or []
            ]
            for tag in ("00081199", "00081198")
            if isinstance(document.get(tag), dict)
        }
    if not items:
        raise ValueError("neither ReferencedSOPSequence nor FailedSOPSequence in the answer")
    referenced = {sop for sop, _, _ in items.get("00081199", []) if sop}
    failed = {sop: Failed(int(code or 0), detail) for sop, code, detail in items.get("00081198", []) if sop}
    return StowAnswer(referenced, failed)


def stow_answer(response: requests.Response) -> StowAnswer | None:
    """The STOW-RS response in `response`, or None if its body is none (an error body)."""
    try:
        return parse_stow_response(response)
    except (ValueError, ElementTree.ParseError):
        return None


def _failure_detail(item: dict[str, Any]) -> str:
    """The Healthcare API's private FailureDetail (0009,xx97, creator GOOGLE) of a failed item."""
    for tag, attribute in item.items():
        if tag.upper().startswith("0009") and tag.endswith("97") and isinstance(attribute, dict):
            values = attribute.get("Value") or [""]
            return str(values[0])
    return ""


def _xml_sequences(root: ElementTree.Element) -> dict[str, list[tuple[Any, Any, str]]]:
    """ReferencedSOPSequence and FailedSOPSequence items of a PS3.19 Native DICOM Model."""

    def local(element: ElementTree.Element) -> str:
        return element.tag.rsplit("}", 1)[-1]

    def attribute(item: ElementTree.Element, wanted: Any) -> str | None:
        for child in item:
            if local(child) == "DicomAttribute" and wanted(child.get("tag", "").upper(), child):
                values = [v.text for v in child if local(v) == "Value"]
                return values[0] if values else None
        return None

    def detail(tag: str, child: ElementTree.Element) -> bool:
        return child.get("keyword") == "FailureDetail" or (tag.startswith("0009") and tag.endswith("97"))

    sequences: dict[str, list[tuple[Any, Any, str]]] = {}
    for child in root:
        tag = child.get("tag", "").upper()
        if local(child) == "DicomAttribute" and tag in ("00081199", "00081198"):
            sequences[tag] = [
                (
                    attribute(item, lambda t, _: t == "00081155"),
                    attribute(item, lambda t, _: t == "00081197"),
                    attribute(item, detail) or "",
                )
                for item in child
                if local(item) == "Item"
            ]
    return sequences


def _file_digest(file: MatchedFile) -> str:
    with open_ranged(file, SOURCE_BUFFER) as stream:
        return data_set_digest(stream)


def first_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, None if it has none."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _ref(item: dict[str, Any], study: str | None = None, series: str | None = None) -> InstanceRef | None:
    study = first_value(item, "0020000D") or study
    series = first_value(item, "0020000E") or series
    sop = first_value(item, "00080018")
    return InstanceRef(study, series, sop) if study and series and sop else None


def _check(response: requests.Response, what: str) -> None:
    if not response.ok:
        raise RequestFailed(f"{what}: {_status_detail(response)}")


def _refused(status: int) -> bool:
    """The server refused the request's content: repeating it will not help."""
    return 400 <= status < 500 and status not in (408, THROTTLED)


def _status_detail(response: requests.Response) -> str:
    """The status and the server's message: Google's JSON error body's `message`, else the text."""
    error = _json_or_none(response)
    if isinstance(error, dict) and isinstance(error.get("error"), dict) and error["error"].get("message"):
        text = " ".join(str(error["error"]["message"]).split())[:200]
    else:
        text = " ".join(response.text.split())[:200] if response.content else ""
    return f"HTTP {response.status_code} {response.reason}" + (f": {text}" if text else "")


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _backoff(attempt: int, first: float, most: float) -> float:
    """Exponential backoff with jitter: `first` seconds doubled per attempt, at most `most`."""
    return min(most, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _retry_after(response: requests.Response) -> float:
    """The Retry-After header in seconds (a number or an HTTP date); 0 if absent or unreadable."""
    try:
        return max(0.0, Retry().parse_retry_after(response.headers.get("Retry-After", "")))
    except Exception:  # urllib3 raises InvalidHeader for what it cannot read
        return 0.0


def _cause(error: BaseException) -> str:
    """The operating system's reason (e.g. '[Errno 111] Connection refused'), else the error's type."""
    match = re.search(r"\[Errno [^\]]+\] [^')\"]+", str(error))
    return match.group(0) if match else type(error).__name__
