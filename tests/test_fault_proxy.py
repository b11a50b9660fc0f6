"""The fault proxy itself, against a real Orthanc: what each scripted fault does and does not let through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.fault_proxy import Fault, FaultProxy
from tests.orthanc_server import Orthanc, running_orthanc

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture(scope="module")
def server() -> Iterator[Orthanc]:
    with running_orthanc() as orthanc:
        yield orthanc


@pytest.fixture
def orthanc(server: Orthanc) -> Orthanc:
    server.clear()
    return server


def post_ct(base: str, orthanc: Orthanc) -> requests.Response:
    """Store CT_small.dcm through Orthanc's native REST API at `base` (direct or via the proxy)."""
    return requests.post(
        f"{base}/instances", data=CT_SMALL.read_bytes(), headers=DICOM, auth=orthanc.auth, timeout=10
    )


def test_without_faults_requests_pass_through_with_their_credentials(orthanc: Orthanc) -> None:
    post_ct(orthanc.rest, orthanc).raise_for_status()
    direct = requests.get(f"{orthanc.dicomweb}/studies", auth=orthanc.auth, timeout=10)

    with FaultProxy(orthanc.rest, []) as proxy:
        proxied = requests.get(f"{proxy.url}/dicom-web/studies", auth=orthanc.auth, timeout=10)
        anonymous = requests.get(f"{proxy.url}/dicom-web/studies", timeout=10)

    assert proxied.status_code == direct.status_code == 200
    assert proxied.headers["Content-Type"] == direct.headers["Content-Type"]
    assert isinstance(proxied.json(), list) and proxied.json() == direct.json()
    assert anonymous.status_code == 401  # Orthanc's own refusal: the Authorization header is what carried
    assert [(r.method, r.path, r.fault, r.upstream_status) for r in proxy.requests] == [
        ("GET", "/dicom-web/studies", None, 200),
        ("GET", "/dicom-web/studies", None, 401),
    ]


def test_a_chunked_request_body_is_forwarded_whole(orthanc: Orthanc) -> None:
    data = CT_SMALL.read_bytes()
    # A generator has no length, so requests sends the body with Transfer-Encoding: chunked.
    chunks = (data[i : i + 1000] for i in range(0, len(data), 1000))

    with FaultProxy(orthanc.rest, []) as proxy:
        response = requests.post(
            f"{proxy.url}/instances", data=chunks, headers=DICOM, auth=orthanc.auth, timeout=10
        )

    assert response.status_code == 200
    assert orthanc.sop_instance_uids() == {pydicom.dcmread(CT_SMALL).SOPInstanceUID}


def test_status_faults_answer_in_script_order_and_never_reach_the_server(orthanc: Orthanc) -> None:
    with FaultProxy(orthanc.rest, [Fault.status(503), Fault.status(429, retry_after=2)]) as proxy:
        unavailable = post_ct(proxy.url, orthanc)
        throttled = post_ct(proxy.url, orthanc)
        stored_after_faults = orthanc.instance_count()
        passed = post_ct(proxy.url, orthanc)  # script used up: forwarded

    assert unavailable.status_code == 503 and "Retry-After" not in unavailable.headers
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    assert stored_after_faults == 0
    assert passed.status_code == 200 and orthanc.instance_count() == 1
    assert [(r.fault, r.upstream_status) for r in proxy.requests] == [
        (Fault.status(503), None),
        (Fault.status(429, retry_after=2), None),
        (None, 200),
    ]


def test_drop_before_closes_without_answer_and_the_server_never_sees_it(orthanc: Orthanc) -> None:
    with FaultProxy(orthanc.rest, [Fault.drop_before()]) as proxy, pytest.raises(requests.ConnectionError):
        post_ct(proxy.url, orthanc)

    assert orthanc.instance_count() == 0
    assert [(r.method, r.path, r.fault, r.upstream_status) for r in proxy.requests] == [
        ("POST", "/instances", Fault.drop_before(), None)
    ]


def test_drop_after_cuts_the_answer_but_the_server_has_acted(orthanc: Orthanc) -> None:
    with (
        FaultProxy(orthanc.rest, [Fault.drop_after()]) as proxy,
        pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)),
    ):
        post_ct(proxy.url, orthanc)

    assert orthanc.instance_count() == 1
    assert orthanc.sop_instance_uids() == {pydicom.dcmread(CT_SMALL).SOPInstanceUID}
    assert [(r.fault, r.upstream_status) for r in proxy.requests] == [(Fault.drop_after(), 200)]
