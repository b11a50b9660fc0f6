"""Which kind of store a location names, and the store itself: the one place that knows all kinds."""

from __future__ import annotations

import re

from storage.dicomweb import DicomWebStore
from storage.dicomweb_client import session_from_environment
from storage.file_store import FileLayoutStore
from storage.healthcare_api import healthcare_store
from storage.store import Store

HEALTHCARE_STORE = re.compile(r"projects/[^/]+/locations/[^/]+/datasets/[^/]+/dicomStores/[^/]+")


def store_kind(location: str) -> str:
    """'dicomweb', 'healthcare' or 'files' for a location string."""
    if location.startswith(("http://", "https://")):
        return "dicomweb"
    if location.startswith("projects/"):
        return "healthcare"
    return "files"


def open_store(
    location: str,
    storage_class: str | None = None,
    verify_stored: bool = False,
    max_requests_in_flight: int | None = None,
) -> Store:
    """The store at `location`; network stores read their credentials here, on the worker.

    `storage_class`, `verify_stored` and `max_requests_in_flight` concern DICOMweb stores (see
    storage/dicomweb.py and storage/healthcare_api.py).
    """
    kind = store_kind(location)
    if kind == "files":
        return FileLayoutStore(location)
    if kind == "healthcare":
        return healthcare_store(location, storage_class, verify_stored, max_requests_in_flight)
    session = session_from_environment()
    return DicomWebStore(location, session, storage_class, verify_stored, max_requests_in_flight)
