"""The fault proxy's standing rules, against a real Orthanc: a request body limit answered 413, and
a hook that acts on the server just before a request is forwarded."""

from __future__ import annotations

import requests

from tests.beam_support import CT, MR
from tests.fault_proxy import Fault, FaultProxy
from tests.orthanc_server import Orthanc

DICOM = {"Content-Type": "application/dicom"}


def post(base: str, data: bytes, orthanc: Orthanc) -> requests.Response:
    return requests.post(f"{base}/instances", data=data, headers=DICOM, auth=orthanc.auth, timeout=10)


def test_a_body_over_max_body_is_answered_413_unforwarded_and_takes_no_scripted_fault(
    orthanc: Orthanc,
) -> None:
    limit = (CT.stat().st_size + MR.stat().st_size) // 2  # between the two files' sizes
    with FaultProxy(orthanc.rest, [Fault.status(503)], max_body=limit) as proxy:
        large = post(proxy.url, CT.read_bytes(), orthanc)
        small = post(proxy.url, MR.read_bytes(), orthanc)
        passed = post(proxy.url, MR.read_bytes(), orthanc)

    assert (large.status_code, small.status_code, passed.status_code) == (413, 503, 200)
    assert [(r.fault, r.upstream_status, r.size) for r in proxy.requests] == [
        (Fault.status(413), None, CT.stat().st_size),
        (Fault.status(503), None, MR.stat().st_size),
        (None, 200, MR.stat().st_size),
    ]
    assert orthanc.instance_count() == 1


def test_before_runs_just_before_a_request_is_forwarded_with_its_body(orthanc: Orthanc) -> None:
    seen: list[tuple[str, str, int, int]] = []

    def other_client(method: str, path: str, body: bytes) -> None:
        seen.append((method, path, len(body), orthanc.instance_count()))
        post(orthanc.rest, CT.read_bytes(), orthanc).raise_for_status()  # lands first

    with FaultProxy(orthanc.rest, [Fault.status(503)], before=other_client) as proxy:
        refused = post(proxy.url, MR.read_bytes(), orthanc)  # answered by the fault: not forwarded
        stored = post(proxy.url, MR.read_bytes(), orthanc)

    assert (refused.status_code, stored.status_code) == (503, 200)
    assert seen == [("POST", "/instances", MR.stat().st_size, 0)]
    assert orthanc.instance_count() == 2
