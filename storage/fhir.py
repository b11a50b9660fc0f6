"""A FHIR R4 server as a destination of resources: a base URL (FHIR_TOKEN, or FHIR_USERNAME and
FHIR_PASSWORD) or a Cloud Healthcare API FHIR store (Application Default Credentials).

Resources are written with PUT (update-create, so a re-run updates rather than duplicates) in
transaction Bundles of at most MAX_BUNDLE entries. The retries are the DICOMweb client's: urllib3's
Retry in the session repeats connection errors, 408 and 5xx; 429 is repeated here with the longer
budget. 401 and 403 stop the run; any other refusal, or an entry not answered 200/201, is a
RequestFailed for the resources of that bundle.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import requests
from google.auth.exceptions import GoogleAuthError

from storage.dicomweb_client import (
    THROTTLE_ATTEMPTS,
    THROTTLE_BACKOFF,
    THROTTLE_BACKOFF_MAX,
    THROTTLED,
    TIMEOUT,
    RequestFailed,
    backoff,
    cause,
    json_or_none,
    retry_after,
    session_from_environment,
    status_detail,
    with_retries,
)
from storage.store import StoreUnavailable

MAX_BUNDLE = 50  # resources a transaction Bundle: medplum refuses more updates in one (the API allows 4,500)
FHIR_STORE = re.compile(r"projects/[^/]+/locations/[^/]+/datasets/[^/]+/fhirStores/[^/]+")
FHIR_JSON = "application/fhir+json"


def is_fhir_server(location: str) -> bool:
    """A FHIR base URL or a Healthcare API FHIR store, as opposed to a directory of NDJSON."""
    return location.startswith(("http://", "https://")) or bool(FHIR_STORE.fullmatch(location.rstrip("/")))


def check_fhir_location(location: str) -> str:
    """The location, normalised, or ValueError saying what is wrong with it (never its credentials)."""
    location = location.rstrip("/")
    if location.startswith("projects/"):
        if not FHIR_STORE.fullmatch(location):
            raise ValueError(f"{location!r} is not projects/P/locations/L/datasets/D/fhirStores/S")
        return location
    url = urllib.parse.urlsplit(location)
    if url.username or url.password:  # the location is logged and printed: no secrets in it
        raise ValueError("credentials go in FHIR_TOKEN or FHIR_USERNAME/FHIR_PASSWORD, not in the URL")
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ValueError(f"{location!r} is not a FHIR base URL")
    return location


def open_fhir(location: str) -> FhirClient:
    """The client for a FHIR base URL or a Healthcare API FHIR store."""
    if FHIR_STORE.fullmatch(location):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from google.auth.transport.requests import AuthorizedSession

        from storage.healthcare_api import CLOUD_PLATFORM, HEALTHCARE_API

        try:
            credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
        except DefaultCredentialsError as error:
            raise StoreUnavailable(f"no Application Default Credentials for {location}: {error}") from None
        api = os.environ.get("HEALTHCARE_API_ROOT", HEALTHCARE_API).rstrip("/")
        return FhirClient(f"{api}/{location}/fhir", with_retries(AuthorizedSession(credentials)))
    return FhirClient(location, session_from_environment("FHIR"))


class FhirClient:
    """Requests to one FHIR base URL through one session (thread-safe, pooled, retrying)."""

    def __init__(self, base: str, session: requests.Session) -> None:
        self.base = base.rstrip("/")
        self.session = session

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request with retries; a server that cannot be reached or refuses us stops the run."""
        url = self.base + path
        throttled = 0
        while True:
            try:
                response = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
            except GoogleAuthError as error:
                raise StoreUnavailable(f"no access token for {self.base}: {type(error).__name__}") from None
            except requests.RequestException as error:
                raise StoreUnavailable(f"cannot reach the FHIR server {self.base}: {cause(error)}") from None
            if response.status_code in (401, 403):
                raise StoreUnavailable(
                    f"the FHIR server {self.base} refused our credentials (HTTP {response.status_code})"
                )
            if response.status_code == THROTTLED and throttled < THROTTLE_ATTEMPTS:
                throttled += 1
                time.sleep(
                    max(retry_after(response), backoff(throttled, THROTTLE_BACKOFF, THROTTLE_BACKOFF_MAX))
                )
                continue
            return response

    def put_bundle(self, resources: Sequence[dict[str, Any]]) -> None:
        """PUT (update-create) each resource, MAX_BUNDLE a transaction Bundle; RequestFailed if a
        bundle is refused or any of its entries is not answered 200 or 201 (a transaction is all or
        nothing, so none of that bundle's resources is written then)."""
        for start in range(0, len(resources), MAX_BUNDLE):
            self._transaction(resources[start : start + MAX_BUNDLE])

    def _transaction(self, resources: Sequence[dict[str, Any]]) -> None:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"{self.base}/{resource['resourceType']}/{resource['id']}",
                    "resource": resource,
                    "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                }
                for resource in resources
            ],
        }
        response = self.request(
            "POST", "", json=bundle, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        )
        if not response.ok:
            raise RequestFailed(f"transaction of {len(resources)} resources: {status_detail(response)}")
        answer = json_or_none(response)
        entries = answer.get("entry") if isinstance(answer, dict) else None
        if not isinstance(entries, list) or len(entries) != len(resources):
            raise RequestFailed(
                f"{self.base}: the answer to a transaction is not a transaction-response Bundle"
            )
        for resource, entry in zip(resources, entries, strict=True):
            status = str((entry.get("response") or {}).get("status", "")) if isinstance(entry, dict) else ""
            if status.split(" ")[0] not in ("200", "201"):
                raise RequestFailed(
                    f"{resource['resourceType']}/{resource['id']}: answered {status or 'without a status'}"
                )
