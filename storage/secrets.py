"""Secret Manager: the one way a Dataflow worker gets a key that no option may carry.

A pipeline's options are logged, shown in the Dataflow console and kept in the job's description, and
a worker does not see the launcher's environment; so a key a worker needs is named by its Secret
Manager version and read on the worker with Application Default Credentials (versions.access, REST).
The payload is checked against its CRC32C, as Google's own samples do.
"""

from __future__ import annotations

import base64
import os
import re

import google_crc32c
import requests

from dicomlib.failures import RunFailed
from storage.dicomweb_client import with_retries

SECRET_MANAGER_API = "https://secretmanager.googleapis.com/v1"  # SECRET_MANAGER_API_ROOT overrides it (tests)
SECRET_VERSION = re.compile(r"projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}/versions/(?:[1-9][0-9]*|latest)")


def access_secret(name: str) -> bytes:
    """The payload of a secret version `projects/P/secrets/S/versions/V`; RunFailed if it cannot be had."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    from storage.healthcare_api import CLOUD_PLATFORM

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except DefaultCredentialsError as error:
        raise RunFailed(f"no Application Default Credentials to read {name}: {error}") from None
    api = os.environ.get("SECRET_MANAGER_API_ROOT", SECRET_MANAGER_API).rstrip("/")
    with with_retries(AuthorizedSession(credentials)) as session:
        try:
            response = session.get(f"{api}/{name}:access", timeout=60)
        except requests.RequestException as error:
            raise RunFailed(f"cannot read the secret {name}: {error}") from None
    if response.status_code != 200:
        raise RunFailed(f"cannot read the secret {name}: HTTP {response.status_code} {response.text[:300]}")
    payload = response.json().get("payload", {})
    data = base64.b64decode(payload.get("data", ""))
    crc = payload.get("dataCrc32c")
    if crc is not None and int(crc) != google_crc32c.value(data):
        raise RunFailed(f"the secret {name} arrived corrupted (its CRC32C does not match)")
    if not data:
        raise RunFailed(f"the secret {name} is empty")
    return data
