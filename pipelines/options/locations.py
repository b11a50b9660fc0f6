"""The checks of a location's form, and of a local path where the run can see it.

Never anything that needs the network, such as listing a bucket: that waits for the run.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options.base import OptionError, is_local
from storage.objects import is_gcs
from storage.stores import HEALTHCARE_STORE, store_kind

# A location that starts like a URL but is not one, e.g. `gs:/bucket/x`: as a local path it would
# quietly become a directory named `gs:`.
URL_LIKE = re.compile(r"(?i)(gs|bq|https?):")


def check_not_url_like(option: str, location: str) -> None:
    """`gs:/bucket/x` (one slash) or `gs:bucket` is a mistyped URL, not a local directory `gs:`."""
    scheme = URL_LIKE.match(location)
    if scheme and not location.startswith(f"{scheme[1].lower()}://"):
        raise OptionError(
            option, f"{location!r} is malformed: write {scheme[1].lower()}://... with two slashes"
        )


def check_local_or_gcs(option: str, location: str) -> str:
    """A local path (made absolute, so every worker agrees) or a gs://bucket[/prefix]."""
    if location.startswith("gs://"):
        if not location[len("gs://") :].split("/")[0]:
            raise OptionError(option, f"{location!r} has no bucket name")
        return location.rstrip("/")
    if "://" in location:
        raise OptionError(option, f"{location!r} is neither a local path nor gs://")
    check_not_url_like(option, location)
    return os.path.abspath(location)


def check_directory(option: str, location: str, options: PipelineOptions, must_exist: bool = False) -> None:
    """A local directory of a local run: no file in its place or on its way; one that is read must
    exist. A gs:// location is not looked at (that would need the network on the launcher), nor a
    local path on a distributed runner (it names a worker's disk, not this one)."""
    if is_gcs(location) or not is_local(options) or os.path.isdir(location):
        return
    if os.path.exists(location):
        raise OptionError(option, f"{location} is a file, not a directory")
    if must_exist:
        raise OptionError(option, f"{location} does not exist")
    parent = os.path.dirname(location)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OptionError(option, f"{parent} is a file, so {location} cannot be made")


def check_store(option: str, location: str, options: PipelineOptions, must_exist: bool) -> str:
    """A file-layout store (local or gs://), a DICOMweb service root, or a Healthcare API store.

    A local store that is read (`must_exist`) must be a directory already; one imported into may be
    made by the run."""
    kind = store_kind(location)
    if kind == "healthcare":
        if not HEALTHCARE_STORE.fullmatch(location.rstrip("/")):
            raise OptionError(option, f"{location!r} is not projects/P/locations/L/datasets/D/dicomStores/S")
        return location.rstrip("/")
    if kind == "dicomweb":
        url = urllib.parse.urlsplit(location)
        if url.username or url.password:  # the location is logged and printed: no secrets in it
            raise OptionError(option, "credentials go in DICOMWEB_USERNAME/DICOMWEB_PASSWORD, not in the URL")
        if not url.hostname or url.query or url.fragment:
            raise OptionError(option, f"{location!r} is not a DICOMweb service root URL")
        return location.rstrip("/")
    location = check_local_or_gcs(option, location)
    check_directory(option, location, options, must_exist)
    return location
