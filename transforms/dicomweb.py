"""DICOMweb stores: any server's service root, and the Cloud Healthcare API's DICOMweb endpoint.

STOW-RS carries many instances per request; QIDO-RS lists page by page (studies, then the
instances of one study, never one unbounded query); WADO-RS reads instances in their stored transfer
syntax and metadata as DICOM JSON. requests with urllib3's Retry retries connection errors, 408,
429 and 5xx with exponential backoff and jitter, honouring Retry-After; a response cut off midway is
retried here, because urllib3 has already handed it over when its body breaks.

STOW-RS does not say whether an instance was already stored (Orthanc, for one, answers success and
keeps the old copy), so each batch first asks QIDO which of its SOP Instance UIDs exist; those are
read back and compared instead of sent: the same data set is `already_present`, another is a
`conflict`, as the file-layout store does. A batch of 50 new instances costs two requests; with
`verify_stored`, a third QIDO query after the STOW confirms that what the server acknowledged is
there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from typing import Any

import requests
from google.auth.exceptions import GoogleAuthError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from transforms import NAMESPACE
from transforms.dicom_header import LONG_LENGTH_VRS
from transforms.objects import read_bytes
from transforms.store import (
    ALREADY_PRESENT,
    FAILURE,
    SUCCESS,
    InstanceRef,
    Parsed,
    Store,
    StoreUnavailable,
    Written,
)

LOGGER = logging.getLogger(NAMESPACE)
HEALTHCARE_API = "https://healthcare.googleapis.com/v1"  # HEALTHCARE_API_ROOT overrides it (tests)
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
RETRYABLE_STATUSES = (408, 429, 500, 502, 503, 504)
BROKEN_BODY_ATTEMPTS = 5
TIMEOUT = (10, 600)  # seconds to connect, and to wait for a STOW of tens of MB
PAGE = 1000
DICOM_PART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DUPLICATE_INSTANCE = 0x0111
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


class RequestFailed(OSError):
    """One request failed for good; the instances it concerned are dead letters."""


def retry_policy() -> Retry:
    return Retry(
        total=10,
        connect=5,
        read=5,
        status=8,
        backoff_factor=0.5,
        backoff_jitter=0.5,
        backoff_max=30,
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


def healthcare_store(
    name: str, storage_class: str | None = None, verify_stored: bool = False
) -> DicomWebStore:
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
    return DicomWebStore(f"{api}/{name}/dicomWeb", session, storage_class, verify_stored, operations_root=api)


class DicomWebStore(Store):
    """A DICOMweb service root reached through one session (thread-safe, pooled connections)."""

    def __init__(
        self,
        root: str,
        session: requests.Session,
        storage_class: str | None = None,
        verify_stored: bool = False,
        operations_root: str | None = None,
    ) -> None:
        self.location = self.root = root.rstrip("/")
        self.session = session
        self.storage_class = storage_class
        self.verify_stored = verify_stored  # QIDO after STOW: see _verify
        self.operations_root = operations_root  # where long-running operations are polled
        self.requests_made = 0

    def close(self) -> None:
        self.session.close()

    # Writing

    def write(self, batch: Sequence[Parsed]) -> list[Written]:
        stored = self._stored_refs([item.ref.sop for item in batch])
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
        """One STOW-RS request for all `items`, split in two if the server finds it too large."""
        if not items:
            return {}
        try:
            body, content_type = multipart([read_bytes(item.file.uri) for _, item in items])
        except OSError as error:  # some file cannot be read: send one by one to find which
            if len(items) == 1:
                location = self.root + items[0][1].ref.path()
                detail = f"{type(error).__name__}: {error}"
                return {items[0][0]: Written(FAILURE, location, "read_error", detail)}
            return {k: v for pair in items for k, v in self._stow([pair]).items()}
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if self.storage_class:
            headers["Storage-Class"] = self.storage_class
        response = self._request("POST", "/studies", data=body, headers=headers)
        del body
        if response.status_code == 413 and len(items) > 1:
            half = len(items) // 2
            return {**self._stow(items[:half]), **self._stow(items[half:])}
        if response.status_code in (404, 405, 501):
            raise StoreUnavailable(f"no STOW-RS service at {self.root}/studies (HTTP {response.status_code})")
        try:
            answer: tuple[set[str], dict[str, int]] | None = parse_stow_response(response)
        except ValueError:
            answer = None
        results = {index: self._stow_outcome(item, response, answer) for index, item in items}
        return self._verify(items, results, response.status_code) if self.verify_stored else results

    def _verify(
        self, items: list[tuple[int, Parsed]], results: dict[int, Written], status: int
    ) -> dict[int, Written]:
        """Ask QIDO for the instances STOW-RS called stored: a server may acknowledge an instance
        and drop it (Orthanc's DICOMweb plugin does when its filter refuses one). Optional, as it
        costs a QIDO query whose matches the server must look up (40% more work for Orthanc)."""
        claimed = [(index, item) for index, item in items if results[index].outcome == SUCCESS]
        held = self._stored_refs([item.ref.sop for _, item in claimed])
        for index, item in claimed:
            if held.get(item.ref.sop) != item.ref:
                detail = f"acknowledged by STOW-RS (HTTP {status}) but not found by QIDO-RS afterwards"
                results[index] = Written(FAILURE, results[index].location, "rejected", detail)
        return results

    def _stow_outcome(
        self, item: Parsed, response: requests.Response, answer: tuple[set[str], dict[str, int]] | None
    ) -> Written:
        """`answer` is the parsed STOW-RS response (referenced, failed), None if there was none."""
        location = self.root + item.ref.path()
        referenced, failed = answer or (set(), {})
        if item.ref.sop in failed:
            code = failed[item.ref.sop]
            if code == DUPLICATE_INSTANCE:  # stored meanwhile, by another worker: compare
                stored = self._stored_refs([item.ref.sop]).get(item.ref.sop, item.ref)
                return self._compare(item, stored)
            meaning = FAILURE_REASONS.get(code, "unknown reason")
            detail = f"FailureReason {code:#06x} ({meaning}), HTTP {response.status_code}"
            return Written(FAILURE, location, "rejected", detail)
        if item.ref.sop in referenced:
            return Written(SUCCESS, location)
        if answer is not None:  # a STOW-RS answer that leaves the instance out
            detail = f"not in the server's STOW-RS response (HTTP {response.status_code})"
            return Written(FAILURE, location, "rejected", detail)
        if 400 <= response.status_code < 500:  # the server refused the request's content
            return Written(FAILURE, location, "rejected", _status_detail(response))
        return Written(FAILURE, location, "write_error", _status_detail(response))

    def _compare(self, item: Parsed, stored: InstanceRef) -> Written:
        """Already stored: the same data set (file meta aside, which servers may rewrite)?"""
        location = self.root + stored.path()
        try:
            same = stored == item.ref and data_set_bytes(self.read(stored)) == data_set_bytes(
                read_bytes(item.file.uri)
            )
        except OSError as error:
            return Written(FAILURE, location, "read_error", f"{type(error).__name__}: {error}")
        if same:
            return Written(ALREADY_PRESENT, location)
        detail = f"{location} holds a different data set for SOP Instance UID {item.ref.sop}"
        return Written(FAILURE, location, "conflict", detail)

    def _stored_refs(self, sops: Sequence[str]) -> dict[str, InstanceRef]:
        """Which of these SOP Instance UIDs the store holds, in one QIDO-RS query (UID list)."""
        if not sops:
            return {}
        params = {"SOPInstanceUID": ",".join(sops), "limit": str(2 * len(sops))}
        found = self._json("GET", "/instances", params=params)
        refs = (_ref(item) for item in found)
        return {ref.sop: ref for ref in refs if ref is not None}

    # Reading

    def studies(self) -> Iterator[str]:
        for item in self._pages("/studies"):
            study = _value(item, "0020000D")
            if study:
                yield study

    def instances(self, study: str, series: str | None = None) -> Iterator[InstanceRef]:
        path = f"/studies/{study}" + (f"/series/{series}" if series else "") + "/instances"
        for item in self._pages(path):
            ref = _ref(item, study, series)
            if ref is not None:
                yield ref

    def _pages(self, path: str) -> Iterator[dict[str, Any]]:
        """A QIDO-RS query page by page, until an empty page: a server may cap `limit` lower."""
        offset = 0
        while True:
            page = self._json("GET", path, params={"limit": str(PAGE), "offset": str(offset)})
            self.listed += len(page)
            if not page:
                return
            yield from page
            offset += len(page)

    def read(self, ref: InstanceRef) -> bytes:
        response = self._request("GET", ref.path(), headers={"Accept": DICOM_PART})
        if response.status_code == 404:
            raise FileNotFoundError(f"{self.root}{ref.path()}")
        _check(response, ref.path())
        parts = split_multipart(response.content, response.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise RequestFailed(f"{self.root}{ref.path()}: expected one instance, got {len(parts)} parts")
        return parts[0]

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
        """Poll a Cloud Healthcare API long-running operation until it is done."""
        delay = 0.5
        while True:
            response = self.session.get(f"{self.operations_root or self.root}/{name}", timeout=TIMEOUT)
            _check(response, name)
            operation = response.json()
            if operation.get("done"):
                if "error" in operation:
                    raise RequestFailed(f"{name}: {operation['error'].get('message', operation['error'])}")
                return
            time.sleep(delay)
            delay = min(delay * 2, 10)

    # Requests

    def _json(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        response = self._request(method, path, headers={"Accept": "application/dicom+json"}, **kwargs)
        if response.status_code == 204:
            return []
        _check(response, path)
        try:
            return response.json()
        except ValueError:
            raise RequestFailed(f"{self.root}{path}: the answer is not DICOM JSON") from None

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request with retries; a store that cannot be reached or refuses us stops the run."""
        for attempt in range(1, BROKEN_BODY_ATTEMPTS + 1):
            self.requests_made += 1
            try:
                response = self.session.request(method, self.root + path, timeout=TIMEOUT, **kwargs)
            except requests.exceptions.ChunkedEncodingError as error:  # the answer broke off
                if attempt == BROKEN_BODY_ATTEMPTS:
                    raise RequestFailed(f"{method} {self.root}{path}: {type(error).__name__}") from None
                time.sleep(min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
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
            return response
        raise AssertionError("unreachable")


def multipart(parts: Sequence[bytes], content_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body of Part 10 files and its Content-Type header."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for data in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{content_type}"; boundary={boundary}'


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart body, byte-exact (the CRLF before each delimiter is not data)."""
    if not content_type.lower().startswith("multipart/"):
        return [body]
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise RequestFailed(f"multipart answer without a boundary: {content_type}")
    delimiter = b"\r\n--" + match.group(1).encode()
    payloads = []
    for part in (b"\r\n" + body).split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        _, separator, payload = part.partition(b"\r\n\r\n")
        if separator:
            payloads.append(payload)
    return payloads


def parse_stow_response(response: requests.Response) -> tuple[set[str], dict[str, int]]:
    """SOP Instance UIDs stored, and those failed with their FailureReason, from JSON or XML.

    Raises ValueError when the body is neither.
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
                (_value(item, "00081155"), _value(item, "00081197"))
                for item in document.get(tag, {}).get("Value", [])
            ]
            for tag in ("00081199", "00081198")
        }
    referenced = {sop for sop, _ in items.get("00081199", []) if sop}
    failed = {sop: int(code or 0) for sop, code in items.get("00081198", []) if sop}
    return referenced, failed


def _xml_sequences(root: ElementTree.Element) -> dict[str, list[tuple[Any, Any]]]:
    """ReferencedSOPSequence and FailedSOPSequence items of a PS3.19 Native DICOM Model."""

    def local(element: ElementTree.Element) -> str:
        return element.tag.rsplit("}", 1)[-1]

    def attribute(item: ElementTree.Element, tag: str) -> str | None:
        for child in item:
            if local(child) == "DicomAttribute" and child.get("tag", "").upper() == tag:
                values = [v.text for v in child if local(v) == "Value"]
                return values[0] if values else None
        return None

    sequences: dict[str, list[tuple[Any, Any]]] = {}
    for child in root:
        tag = child.get("tag", "").upper()
        if local(child) == "DicomAttribute" and tag in ("00081199", "00081198"):
            items = [item for item in child if local(item) == "Item"]
            sequences[tag] = [(attribute(i, "00081155"), attribute(i, "00081197")) for i in items]
    return sequences


def data_set_bytes(part10: bytes) -> bytes:
    """The bytes after the preamble and the file meta group, which servers may rewrite."""
    if part10[128:132] != b"DICM":
        return part10
    position = 132
    while position + 8 <= len(part10) and part10[position : position + 2] == b"\x02\x00":
        vr = part10[position + 4 : position + 6]
        if vr in LONG_LENGTH_VRS:
            length = int.from_bytes(part10[position + 8 : position + 12], "little")
            position += 12 + length
        else:
            length = int.from_bytes(part10[position + 6 : position + 8], "little")
            position += 8 + length
    return part10[position:]


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _ref(item: dict[str, Any], study: str | None = None, series: str | None = None) -> InstanceRef | None:
    study = _value(item, "0020000D") or study
    series = _value(item, "0020000E") or series
    sop = _value(item, "00080018")
    return InstanceRef(study, series, sop) if study and series and sop else None


def _check(response: requests.Response, what: str) -> None:
    if not response.ok:
        raise RequestFailed(f"{what}: {_status_detail(response)}")


def _status_detail(response: requests.Response) -> str:
    text = " ".join(response.text.split())[:200] if response.content else ""
    return f"HTTP {response.status_code} {response.reason}" + (f": {text}" if text else "")


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _cause(error: BaseException) -> str:
    """The operating system's reason (e.g. '[Errno 111] Connection refused'), else the error's type."""
    match = re.search(r"\[Errno [^\]]+\] [^')\"]+", str(error))
    return match.group(0) if match else type(error).__name__
