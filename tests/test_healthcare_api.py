"""The Cloud Healthcare API store form, against a local HTTP server that speaks the API's DICOMweb
and OAuth token endpoints: URLs, the bearer token from google-auth, Storage-Class, a partial STOW
failure answered with FailureReason, and a delete that is a long-running operation."""

from __future__ import annotations

import email
import email.policy
import io
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.conftest import run_import
from transforms.store import open_store

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
STORE = "projects/p1/locations/us-central1/datasets/d1/dicomStores/s1"
TOKEN = "ya29.test-access-token"
REJECTED_PATIENT_ID = "REFUSE-ME"
DATA_SET_MISMATCH = 0xA900


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HealthcareApi:
    """What the server holds and what it was asked."""

    url: str = ""
    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # sop -> (study, series)
    requests: list[Seen] = field(default_factory=list)
    polls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dicomweb(self, method: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == method and "/dicomWeb/" in seen.path]


def handler(api: HealthcareApi) -> type[BaseHTTPRequestHandler]:
    base = f"/v1/{STORE}/dicomWeb"
    operation = "projects/p1/locations/us-central1/datasets/d1/operations/7"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, document: object, kind: str = "application/json") -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            body = self._body()
            with api.lock:
                api.requests.append(
                    Seen(self.command, url.path, {k.lower(): v for k, v in self.headers.items()})
                )
            if url.path == "/token":
                return self._answer(200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, {"error": {"code": 401}})
            if url.path == f"/v1/{operation}":
                api.polls += 1
                return self._answer(200, {"name": operation, "done": api.polls >= 2})
            if not url.path.startswith(base):
                return self._answer(404, {"error": {"code": 404}})
            path, query = url.path[len(base) :], urllib.parse.parse_qs(url.query)
            if self.command == "GET" and path == "/instances":
                wanted = query["SOPInstanceUID"][0].split(",")
                found = [(sop, *api.instances[sop]) for sop in wanted if sop in api.instances]
                return self._answer(200, [_qido(*uids) for uids in found], "application/dicom+json")
            if self.command == "POST" and path == "/studies":
                return self._stow(body)
            if self.command == "DELETE" and path.startswith("/studies/"):
                study = path.split("/")[2]
                with api.lock:
                    for sop in [sop for sop, (st, _) in api.instances.items() if st == study]:
                        del api.instances[sop]
                return self._answer(200, {"name": operation})
            return self._answer(404, {"error": {"code": 404}})

        def _stow(self, body: bytes) -> None:
            """Parse the multipart body with the standard library's email package and pydicom."""
            header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = email.message_from_bytes(header + body, policy=email.policy.HTTP)
            stored, failed = [], []
            for part in message.iter_parts():
                dataset = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
                item = {"00081155": {"vr": "UI", "Value": [dataset.SOPInstanceUID]}}
                if dataset.PatientID == REJECTED_PATIENT_ID:
                    failed.append(item | {"00081197": {"vr": "US", "Value": [DATA_SET_MISMATCH]}})
                    continue
                with api.lock:
                    api.instances[dataset.SOPInstanceUID] = (
                        dataset.StudyInstanceUID,
                        dataset.SeriesInstanceUID,
                    )
                stored.append(item)
            answer = {"00081199": {"vr": "SQ", "Value": stored}, "00081198": {"vr": "SQ", "Value": failed}}
            self._answer(202 if failed else 200, answer, "application/dicom+json")

        do_GET = do_POST = do_DELETE = _handle

    return Handler


def _qido(sop: str, study: str, series: str) -> dict[str, object]:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
    }


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HealthcareApi]:
    """The server on loopback, with Application Default Credentials whose token comes from it."""
    state = HealthcareApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    credentials = tmp_path / "adc.json"  # a service account whose tokens come from our server
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p1",
                "private_key_id": "test-key",
                "private_key": pem,
                "client_email": "importer@p1.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{state.url}/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    monkeypatch.setenv("HEALTHCARE_API_ROOT", f"{state.url}/v1")
    yield state
    server.shutdown()
    server.server_close()


def test_import_stores_through_the_api_with_the_bearer_token_and_storage_class(
    api: HealthcareApi, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sources = sorted(SAMPLE.rglob("*.dcm"))
    for number, path in enumerate(sources):
        (inbox / f"{number}.dcm").write_bytes(path.read_bytes())
    refused = pydicom.dcmread(SAMPLE / "ct" / "CT_small.dcm")
    refused.PatientID = REJECTED_PATIENT_ID
    refused.SOPInstanceUID = pydicom.uid.generate_uid()
    refused.save_as(inbox / "refused.dcm")

    run = run_import(
        f"--input={inbox}/*.dcm", f"--store={STORE}", "--storage_class=nearline", dead_letter=tmp_path / "dl"
    )

    assert run.status == 3
    assert (run.summary["success"], run.summary["failure"]) == (len(sources), 1)
    (letter,) = run.dead_letters
    assert (letter["uri"], letter["reason"]) == (str(inbox / "refused.dcm"), "rejected")
    assert letter["detail"] == "FailureReason 0xa900 (data set does not match SOP class), HTTP 202"
    assert len(api.instances) == len(sources)
    stows = api.dicomweb("POST")
    assert stows and all(seen.path == f"/v1/{STORE}/dicomWeb/studies" for seen in stows)
    assert all(seen.headers["storage-class"] == "NEARLINE" for seen in stows)
    assert all(seen.headers["authorization"] == f"Bearer {TOKEN}" for seen in api.dicomweb("GET") + stows)
    assert any(seen.path == "/token" and seen.method == "POST" for seen in api.requests)
    assert TOKEN not in run.stdout + json.dumps(run.dead_letters)


def test_deleting_a_study_waits_for_the_long_running_operation(api: HealthcareApi) -> None:
    api.instances = {"1.2.3.1": ("1.2.3", "1.2.3.0"), "1.2.4.1": ("1.2.4", "1.2.4.0")}
    store = open_store(STORE)

    store.delete("1.2.3")

    assert api.instances == {"1.2.4.1": ("1.2.4", "1.2.4.0")}
    assert [seen.path for seen in api.dicomweb("DELETE")] == [f"/v1/{STORE}/dicomWeb/studies/1.2.3"]
    assert api.polls == 2  # polled until done
