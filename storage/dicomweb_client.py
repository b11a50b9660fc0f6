"""HTTP to DICOMweb services: a session with retries, the process's request slots, and a client for
one service root.

Two retry layers, each for what the other cannot do: urllib3's Retry (in the session) repeats
connection errors, 408 and 5xx with exponential backoff and jitter, honouring Retry-After, while the
request holds its slot; DicomWebClient.request repeats 429 (a quota refilled by the minute: a longer
budget, waiting without a slot) and an answer that breaks off midway (urllib3 has already handed the
response over when its body breaks). 413 goes back to the caller, which splits its batch.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
from google.auth.exceptions import GoogleAuthError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from storage.multipart import CHUNK, save_single_part
from storage.store import StoreUnavailable

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
OPERATION_DEADLINE = 3600.0  # seconds a long-running operation may take before it counts as failed
_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


class RequestFailed(OSError):
    """One request failed for good; the instances it concerned are dead letters."""


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


def session_from_environment(prefix: str = "DICOMWEB") -> requests.Session:
    """A bearer token from {prefix}_TOKEN, or basic auth from {prefix}_USERNAME/{prefix}_PASSWORD,
    read on the worker (never carried in the job's graph)."""
    session = requests.Session()
    token = os.environ.get(f"{prefix}_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get(f"{prefix}_USERNAME"):
        session.auth = (os.environ[f"{prefix}_USERNAME"], os.environ.get(f"{prefix}_PASSWORD", ""))
    return with_retries(session)


def request_slots(root: str, limit: int | None) -> contextlib.AbstractContextManager:
    """At most `limit` requests in flight to `root` from this process, whichever store or thread
    sends them: quotas count a project's requests, not a thread's. None: no cap."""
    if limit is None:
        return contextlib.nullcontext()
    with _SLOTS_LOCK:
        return _SLOTS.setdefault((root, limit), threading.BoundedSemaphore(limit))


def check(response: requests.Response, what: str) -> None:
    if not response.ok:
        raise RequestFailed(f"{what}: {status_detail(response)}")


def refused(status: int) -> bool:
    """The server refused the request's content: repeating it will not help."""
    return 400 <= status < 500 and status not in (408, THROTTLED)


def status_detail(response: requests.Response) -> str:
    """The status and the server's message: Google's JSON error body's `message`, else the text."""
    error = json_or_none(response)
    if isinstance(error, dict) and isinstance(error.get("error"), dict) and error["error"].get("message"):
        text = " ".join(str(error["error"]["message"]).split())[:200]
    else:
        text = " ".join(response.text.split())[:200] if response.content else ""
    return f"HTTP {response.status_code} {response.reason}" + (f": {text}" if text else "")


def json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def backoff(attempt: int, first: float, most: float) -> float:
    """Exponential backoff with jitter: `first` seconds doubled per attempt, at most `most`."""
    return min(most, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def retry_after(response: requests.Response) -> float:
    """The Retry-After header in seconds (a number or an HTTP date); 0 if absent or unreadable."""
    try:
        return max(0.0, Retry().parse_retry_after(response.headers.get("Retry-After", "")))
    except Exception:  # urllib3 raises InvalidHeader for what it cannot read
        return 0.0


def cause(error: BaseException) -> str:
    """The operating system's reason (e.g. '[Errno 111] Connection refused'), else the error's type."""
    match = re.search(r"\[Errno [^\]]+\] [^')\"]+", str(error))
    return match.group(0) if match else type(error).__name__


class DicomWebClient:
    """Requests to one DICOMweb service root through one session (thread-safe, pooled connections):
    each holds one of the process's request slots while it is out."""

    def __init__(
        self, root: str, session: requests.Session, max_requests_in_flight: int | None, operations_root: str
    ) -> None:
        self.root = root
        self.session = session
        self.slots = request_slots(root, max_requests_in_flight)
        self.operations_root = operations_root  # where long-running operations are polled

    def request(self, method: str, path: str, base: str | None = None, **kwargs: Any) -> requests.Response:
        """One request with retries; a store that cannot be reached or refuses us stops the run.

        Holds one of the process's request slots while the request is out, not while it waits to
        repeat a 429; returns the last answer when the retries are spent.
        """
        url = (base or self.root) + path
        body = kwargs.get("data")
        streamed = body if hasattr(body, "seek") else None  # a streamed body, sent again from its start
        start = streamed.tell() if streamed is not None else 0
        broken = throttled = 0
        while True:
            if streamed is not None:
                streamed.seek(start)
            try:
                with self.slots:
                    response = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
            except requests.exceptions.ChunkedEncodingError as error:  # the answer broke off
                broken += 1
                if broken == BROKEN_BODY_ATTEMPTS:
                    raise RequestFailed(f"{method} {url}: {type(error).__name__}") from None
                time.sleep(backoff(broken, BACKOFF, BACKOFF_MAX))
                continue
            except GoogleAuthError as error:
                raise StoreUnavailable(f"no access token for {self.root}: {type(error).__name__}") from None
            except requests.RequestException as error:
                reason = cause(error)
                raise StoreUnavailable(f"cannot reach the DICOMweb store {self.root}: {reason}") from None
            if response.status_code in (401, 403):
                raise StoreUnavailable(
                    f"the DICOMweb store {self.root} refused our credentials (HTTP {response.status_code})"
                )
            if response.status_code == THROTTLED and throttled < THROTTLE_ATTEMPTS:
                throttled += 1
                wait = backoff(throttled, THROTTLE_BACKOFF, THROTTLE_BACKOFF_MAX)
                time.sleep(max(retry_after(response), wait))
                continue
            return response

    def json(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """A DICOM JSON answer: a list of data sets (none for 204)."""
        response = self.request(method, path, headers={"Accept": "application/dicom+json"}, **kwargs)
        if response.status_code == 204:
            return []
        check(response, path)
        found = json_or_none(response)
        if not isinstance(found, list):
            raise RequestFailed(f"{self.root}{path}: the answer is not DICOM JSON")
        return found

    def document(self, method: str, path: str, base: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """A JSON object answer (an operation, storage info); FileNotFoundError for 404."""
        response = self.request(method, path, base=base, headers={"Accept": "application/json"}, **kwargs)
        if response.status_code == 404:
            raise FileNotFoundError(f"{base or self.root}{path}")
        check(response, path)
        found = json_or_none(response)
        if not isinstance(found, dict):
            raise RequestFailed(f"{base or self.root}{path}: the answer is not a JSON object")
        return found

    def wait_for(self, name: str) -> None:
        """Poll a long-running operation (the Healthcare API's) until it is done, through the
        retrying, token-refreshing request path; one that outlasts OPERATION_DEADLINE has failed."""
        deadline = time.monotonic() + OPERATION_DEADLINE
        delay = 0.5
        while True:
            operation = self.document("GET", f"/{name}", base=self.operations_root)
            if operation.get("done"):
                if "error" in operation:
                    raise RequestFailed(f"{name}: {operation['error'].get('message', operation['error'])}")
                return
            if time.monotonic() + delay > deadline:
                raise RequestFailed(f"{name}: not done after {OPERATION_DEADLINE:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 10)

    def download(self, path: str, accept: str, into: str) -> None:
        """GET a single-part multipart answer into the file `into` as it arrives; FileNotFoundError
        for 404. An answer that breaks off is asked again."""

        def save(chunks: Iterator[bytes], content_type: str) -> None:
            with open(into, "wb") as out:
                save_single_part(chunks, content_type, out)

        self.receive(path, accept, save)

    def receive(self, path: str, accept: str, consume: Callable[[Iterator[bytes], str], None]) -> None:
        """GET an answer and hand its body, as it arrives, to `consume(chunks, content_type)`;
        FileNotFoundError for 404. An answer that breaks off is asked again, and consumed again from
        its start; a ValueError from `consume` (an answer it cannot read) is RequestFailed."""
        for attempt in range(1, BROKEN_BODY_ATTEMPTS + 1):
            response = self.request("GET", path, headers={"Accept": accept}, stream=True)
            try:
                if response.status_code == 404:
                    raise FileNotFoundError(f"{self.root}{path}")
                check(response, path)
                consume(response.iter_content(CHUNK), response.headers.get("Content-Type", ""))
                return
            except ValueError as error:
                raise RequestFailed(f"{self.root}{path}: {error}") from None
            except requests.RequestException as error:  # the answer broke off
                if attempt == BROKEN_BODY_ATTEMPTS:
                    raise RequestFailed(f"GET {self.root}{path}: {type(error).__name__}") from None
                time.sleep(backoff(attempt, BACKOFF, BACKOFF_MAX))
            finally:
                response.close()
