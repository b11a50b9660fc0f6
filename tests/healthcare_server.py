"""A local stand-in for the Cloud Healthcare API's DICOMweb endpoint, written to Google's documentation
and to what other clients report of the service, not to our client's assumptions.

- QIDO-RS: single-value exact matching of UIDs (a comma-separated list is one literal value and matches
  nothing), range matching of StudyDate, a repeated parameter is HTTP 400; `limit` at most 5,000
  (studies, series) or 50,000 (instances) and `offset` at most 1,000,000 (Quotas and limits page);
  default limits 100 studies, 1,000 series or instances.
- STOW-RS: an instance already held with identical bytes is stored again (200); the same SOP Instance
  UID with other bytes fails with HTTP 409 and a FailedSOPSequence item whose FailureReason is 0x0110
  (272) with a private FailureDetail (0009,0097), as dcmjs-org/dcmjs#249 shows; a patient id we name
  is refused with 0xA900, as a server may refuse any instance. 202 when some instances failed.
- WADO-RS: an instance, or all instances of a series, as multipart/related in their stored bytes.
- Errors are Google's JSON error bodies (`{"error": {"code", "message", "status"}}`); a scripted 429
  carries Retry-After.
- Storage class: `getStorageInfo` and `setBlobStorageSettings` (a long-running operation) on
  instances; the `Storage-Class` STOW header is documented for v1beta1 only, so the v1 stand-in
  ignores it unless told otherwise.
- Deleting a study or series is a long-running operation, done after `polls_until_done` polls.
- OAuth: a token endpoint for a service account's JWT; requests without its token get 401.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import io
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import google_crc32c
import pydicom
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

DATASET = "projects/p1/locations/us-central1/datasets/d1"
STORE = f"{DATASET}/dicomStores/s1"
TOKEN = "ya29.test-access-token"
REJECTED_PATIENT_ID = "REFUSE-ME"
PROCESSING_FAILURE = 0x0110
DATA_SET_MISMATCH = 0xA900
MAX_OFFSET = 1_000_000
MAX_LIMIT = {"studies": 5000, "series": 5000, "instances": 50000}
DEFAULT_LIMIT = {"studies": 100, "series": 1000, "instances": 1000}
STORAGE_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
KEYWORDS = {"0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID", "00080018": "SOPInstanceUID"}
KEYWORDS["00080020"] = "StudyDate"
UID_FIELDS = {"StudyInstanceUID": "study", "SeriesInstanceUID": "series", "SOPInstanceUID": "sop"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS"}
STATUS_NAMES |= {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
MESSAGES = {
    401: "Request had invalid authentication credentials.",
    429: "Quota exceeded for DICOMweb requests per minute per region; try again later.",
    503: "The service is currently unavailable.",
}


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    study_date: str
    data: bytes
    storage_class: str = "STANDARD"

    @property
    def path(self) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{self.sop}"


@dataclass
class Failure:
    """A scripted error answer for the next request of `method` whose path holds `path` (None: any)."""

    status: int
    method: str | None
    path: str | None
    retry_after: int | None

    def picks(self, method: str, path: str) -> bool:
        return self.method in (None, method) and (self.path is None or self.path in path)


@dataclass
class HealthcareApi:
    """What the server holds, how it is configured, and what it was asked."""

    version: str = "v1"
    url: str = ""
    instances: dict[str, Instance] = field(default_factory=dict)  # by SOP Instance UID
    requests: list[Seen] = field(default_factory=list)
    max_offset: int = MAX_OFFSET
    max_limit: dict[str, int] = field(default_factory=lambda: dict(MAX_LIMIT))
    applies_storage_class_header: bool | None = None  # None: only on v1beta1, where it is documented
    polls_until_done: int | None = 2  # None: operations never finish
    failures: list[Failure] = field(default_factory=list)
    operations: dict[str, int] = field(default_factory=dict)  # name -> polls so far
    before_stow: Callable[[], None] | None = None  # what another writer does just before a STOW lands
    latency: float = 0.0  # seconds each DICOMweb request takes
    in_flight: int = 0
    most_in_flight: int = 0  # DICOMweb requests being answered at once, at most
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, bytes] = field(default_factory=dict)  # Secret Manager: version name -> payload

    @property
    def root(self) -> str:
        """What HEALTHCARE_API_ROOT points at."""
        return f"{self.url}/{self.version}"

    def fail_next(
        self,
        count: int,
        status: int = 429,
        method: str | None = None,
        path: str | None = None,
        retry_after: int = 0,
    ) -> None:
        """Answer the next `count` requests (of `method`, to a path holding `path`) with `status` and
        Google's error body."""
        self.failures += [Failure(status, method, path, retry_after if status == 429 else None)] * count

    def add(self, data: bytes, storage_class: str = "STANDARD") -> Instance:
        """Hold a Part 10 file as if it had been stored (for tests that need a store to start full)."""
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        instance = Instance(
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID),
            str(dataset.get("StudyDate", "")),
            data,
            storage_class,
        )
        with self.lock:
            self.instances[instance.sop] = instance
        return instance

    def dicomweb(self, method: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == method and "/dicomWeb/" in seen.path]

    def header_applies(self) -> bool:
        if self.applies_storage_class_header is None:
            return self.version == "v1beta1"
        return self.applies_storage_class_header


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def handler(api: HealthcareApi) -> type[BaseHTTPRequestHandler]:
    base = f"/{api.version}/{STORE}/dicomWeb"
    operations = f"/{api.version}/{DATASET}/operations/"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, document: object, kind: str = "application/json") -> None:
            self._send(status, json.dumps(document).encode(), kind)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            error = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
            self._send(status, json.dumps({"error": error}).encode(), "application/json", headers)

        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with api.lock:
                api.requests.append(Seen(self.command, url.path, url.query, headers))
            if url.path == "/token":
                return self._json(200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._error(401, MESSAGES[401])
            with api.lock:
                failure = next((f for f in api.failures if f.picks(self.command, url.path)), None)
                if failure is not None:
                    api.failures.remove(failure)
            if failure is not None:
                extra = {} if failure.retry_after is None else {"Retry-After": str(failure.retry_after)}
                return self._error(failure.status, MESSAGES.get(failure.status, "Try again."), extra)
            with api.lock:
                api.in_flight += 1
                api.most_in_flight = max(api.most_in_flight, api.in_flight)
            try:
                time.sleep(api.latency)
                self._route(url, body)
            except ApiError as error:
                self._error(error.status, str(error))
            finally:
                with api.lock:
                    api.in_flight -= 1

        def _route(self, url: urllib.parse.SplitResult, body: bytes) -> None:
            if url.path.startswith(operations) and self.command == "GET":
                return self._operation(url.path[len(f"/{api.version}/") :])
            if url.path.endswith(":access") and self.command == "GET":
                return self._access_secret(url.path[len(f"/{api.version}/") : -len(":access")])
            if not url.path.startswith(base):
                raise ApiError(404, f"{url.path} not found")
            path = url.path[len(base) :]
            parts = path.strip("/").split("/")
            if self.command == "POST" and path == "/studies":
                return self._stow(body)
            if path.endswith(":getStorageInfo") and self.command == "GET":
                return self._storage_info(path[: -len(":getStorageInfo")])
            if path.endswith(":setBlobStorageSettings") and self.command == "POST":
                return self._set_storage_class(path[: -len(":setBlobStorageSettings")], body)
            if self.command == "GET" and parts[-1] in ("studies", "series", "instances"):
                return self._search(parts, url.query)
            if self.command == "GET" and len(parts) == 6 and parts[::2] == ["studies", "series", "instances"]:
                return self._retrieve([self._instance(path)])
            if self.command == "GET" and len(parts) == 4 and parts[::2] == ["studies", "series"]:
                return self._retrieve(self._series(parts[1], parts[3]))
            if self.command == "GET" and len(parts) == 7 and parts[-1] == "metadata":
                return self._metadata(self._instance(path[: -len("/metadata")]))
            if self.command == "DELETE" and parts[0] == "studies" and len(parts) in (2, 4, 6):
                return self._delete(parts)
            raise ApiError(404, f"{path} is not a DICOMweb resource of this stand-in")

        # QIDO-RS

        def _search(self, parts: list[str], query: str) -> None:
            level = parts[-1]
            scope = dict(zip(("StudyInstanceUID", "SeriesInstanceUID"), parts[1::2], strict=False))
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
            for name, values in params.items():
                if len(values) > 1 and name != "includefield":
                    raise ApiError(400, f"invalid QIDO-RS query: parameter {name} is given more than once")
            values = {name: given[0] for name, given in params.items() if name != "includefield"}
            limit = int(values.pop("limit", DEFAULT_LIMIT[level]))
            offset = int(values.pop("offset", 0))
            values.pop("fuzzymatching", None)
            if not 0 < limit <= api.max_limit[level]:
                raise ApiError(400, f"limit must be between 1 and {api.max_limit[level]} for {level}")
            if not 0 <= offset <= api.max_offset:
                raise ApiError(400, f"offset must be between 0 and {api.max_offset}")
            matches = {KEYWORDS.get(name.upper(), name): value for name, value in values.items()}
            unknown = set(matches) - set(KEYWORDS.values())
            if unknown:
                raise ApiError(400, f"unsupported QIDO-RS matching attribute {sorted(unknown)[0]}")
            with api.lock:
                held = [i for i in api.instances.values() if _matches(i, scope | matches)]
            rows = {_row(level, instance): None for instance in sorted(held, key=_order)}
            page = list(rows)[offset : offset + limit]
            self._json(200, [json.loads(row) for row in page], "application/dicom+json")

        # STOW-RS

        def _stow(self, body: bytes) -> None:
            if api.before_stow is not None:
                api.before_stow()
            storage_class = self.headers.get("Storage-Class")
            if storage_class is not None and storage_class not in STORAGE_CLASSES:
                raise ApiError(400, f"invalid Storage-Class {storage_class}")
            kind = self.headers.get("Content-Type", "")
            if kind.startswith("multipart/"):
                message = email.message_from_bytes(
                    f"Content-Type: {kind}\r\n\r\n".encode() + body, policy=email.policy.HTTP
                )
                files = [part.get_payload(decode=True) for part in message.iter_parts()]
            else:
                files = [body]
            stored, failed = [], []
            for data in files:
                dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                sop = str(dataset.SOPInstanceUID)
                item = {"00081155": {"vr": "UI", "Value": [sop]}}
                with api.lock:
                    held = api.instances.get(sop)
                if dataset.get("PatientID") == REJECTED_PATIENT_ID:
                    failed.append(item | {"00081197": {"vr": "US", "Value": [DATA_SET_MISMATCH]}})
                elif held is not None and held.data != data:
                    detail = f"an instance with SOPInstanceUID {sop} already exists with different content"
                    failed.append(
                        item
                        | {
                            "00081197": {"vr": "US", "Value": [PROCESSING_FAILURE]},
                            "00090097": {"vr": "LT", "Value": [detail]},
                        }
                    )
                else:
                    if held is None:
                        applied = storage_class if storage_class and api.header_applies() else "STANDARD"
                        api.add(data, applied)
                    stored.append(item)
            answer: dict[str, object] = {"00081190": {"vr": "UR", "Value": [f"{api.root}/{STORE}/dicomWeb"]}}
            if stored:
                answer["00081199"] = {"vr": "SQ", "Value": stored}
            if failed:
                answer["00081198"] = {"vr": "SQ", "Value": failed}
            status = 200 if not failed else 409 if not stored else 202
            self._json(status, answer, "application/dicom+json")

        # WADO-RS

        def _instance(self, path: str) -> Instance:
            sop = path.rstrip("/").split("/")[-1]
            with api.lock:
                instance = api.instances.get(sop)
            if instance is None or instance.path != path.rstrip("/"):
                raise ApiError(404, f"{path} not found")
            return instance

        def _series(self, study: str, series: str) -> list[Instance]:
            with api.lock:
                held = [i for i in api.instances.values() if (i.study, i.series) == (study, series)]
            if not held:
                raise ApiError(404, f"/studies/{study}/series/{series} not found")
            return sorted(held, key=_order)

        def _retrieve(self, instances: list[Instance]) -> None:
            """An instance, or a series' instances, one part each (RetrieveInstance, RetrieveSeries)."""
            boundary = uuid.uuid4().hex
            head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax=*\r\n\r\n".encode()
            body = b"".join(head + instance.data + b"\r\n" for instance in instances)
            body += f"--{boundary}--\r\n".encode()
            self._send(200, body, f'multipart/related; type="application/dicom"; boundary={boundary}')

        def _metadata(self, instance: Instance) -> None:
            dataset = pydicom.dcmread(io.BytesIO(instance.data), stop_before_pixels=True)
            bulk = f"{api.root}/{STORE}/dicomWeb{instance.path}/bulkdata"
            document = dataset.to_json_dict(1024, lambda element: f"{bulk}/{element.tag:08X}")
            self._json(200, [document], "application/dicom+json")

        def _access_secret(self, name: str) -> None:
            """Secret Manager's versions.access (served on the same root): the payload, base64, with
            its CRC32C as a decimal string, as the service answers."""
            if name not in api.secrets:
                raise ApiError(404, f"Secret Version [{name}] not found or has no versions.")
            data = api.secrets[name]
            payload = {"data": base64.b64encode(data).decode(), "dataCrc32c": str(google_crc32c.value(data))}
            self._json(200, {"name": name, "payload": payload})

        # Deleting, storage class and long-running operations

        def _delete(self, parts: list[str]) -> None:
            wanted = dict(zip(UID_FIELDS, parts[1::2], strict=False))
            with api.lock:
                doomed = [sop for sop, instance in api.instances.items() if _matches(instance, wanted)]
                for sop in doomed:
                    del api.instances[sop]
            if not doomed:
                raise ApiError(404, "no such DICOM resource")
            if len(parts) == 6:
                return self._json(200, {})
            self._json(200, {"name": self._start_operation()})

        def _storage_info(self, path: str) -> None:
            instance = self._instance(path)
            self._json(
                200,
                {
                    "referencedResource": f"{STORE}/dicomWeb{instance.path}",
                    "structuredStorageInfo": {"sizeBytes": "2048"},
                    "blobStorageInfo": {
                        "sizeBytes": str(len(instance.data)),
                        "storageClass": instance.storage_class,
                    },
                },
            )

        def _set_storage_class(self, path: str, body: bytes) -> None:
            instance = self._instance(path)
            settings = json.loads(body or b"{}").get("blobStorageSettings", {})
            storage_class = settings.get("blobStorageClass")
            if storage_class not in STORAGE_CLASSES:
                raise ApiError(400, f"invalid blobStorageClass {storage_class!r}")
            instance.storage_class = storage_class
            self._json(200, {"name": self._start_operation()})

        def _start_operation(self) -> str:
            with api.lock:
                name = f"{DATASET}/operations/{len(api.operations) + 1}"
                api.operations[name] = 0
            return name

        def _operation(self, name: str) -> None:
            with api.lock:
                if name not in api.operations:
                    raise ApiError(404, f"{name} not found")
                api.operations[name] += 1
                done = api.polls_until_done is not None and api.operations[name] >= api.polls_until_done
            self._json(200, {"name": name, "done": done} | ({"response": {}} if done else {}))

        do_GET = do_POST = do_DELETE = _handle

    return Handler


def _matches(instance: Instance, wanted: dict[str, str]) -> bool:
    """Single-value exact matching of UIDs (a comma list is one literal value), and date matching."""
    for name, value in wanted.items():
        if name == "StudyDate":
            if not _date_matches(instance.study_date, value):
                return False
        elif getattr(instance, UID_FIELDS[name]) != value:
            return False
    return True


def _date_matches(date: str, wanted: str) -> bool:
    """DICOM date matching: a single date, or a range `a-b`, `-b`, `a-`; an empty date matches neither."""
    if not date:
        return False
    if "-" not in wanted:
        return date == wanted
    low, _, high = wanted.partition("-")
    return (not low or date >= low) and (not high or date <= high)


def _order(instance: Instance) -> tuple[str, str, str]:
    return instance.study, instance.series, instance.sop


def _row(level: str, instance: Instance) -> str:
    """One QIDO-RS result as sorted JSON (hashable, so studies and series are listed once)."""
    row = {"0020000D": {"vr": "UI", "Value": [instance.study]}}
    if level == "studies":
        row["00080020"] = (
            {"vr": "DA", "Value": [instance.study_date]} if instance.study_date else {"vr": "DA"}
        )
    if level in ("series", "instances"):
        row["0020000E"] = {"vr": "UI", "Value": [instance.series]}
    if level == "instances":
        row["00080018"] = {"vr": "UI", "Value": [instance.sop]}
    return json.dumps(row, sort_keys=True)


@contextlib.contextmanager
def running_healthcare_api(
    credentials_dir: Path, version: str = "v1"
) -> Iterator[tuple[HealthcareApi, dict]]:
    """The stand-in on loopback, and the environment that points Application Default Credentials
    (a service account whose tokens come from the stand-in) and HEALTHCARE_API_ROOT at it."""
    api = HealthcareApi(version=version)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(api))
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, name="healthcare-api", daemon=True)
    thread.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    credentials = credentials_dir / "adc.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p1",
                "private_key_id": "test-key",
                "private_key": pem,
                "client_email": "importer@p1.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{api.url}/token",
            }
        )
    )
    environment = {"GOOGLE_APPLICATION_CREDENTIALS": str(credentials), "HEALTHCARE_API_ROOT": api.root}
    try:
        yield api, environment
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
