"""A private Orthanc (Debian's /usr/sbin/Orthanc + DICOMweb plugin) on loopback, for tests."""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_GLOB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*"
REJECTED_PATIENT_ID = "REJECT-ME"  # Orthanc refuses instances of this patient, as a server may
REJECT_FILTER = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= '{REJECTED_PATIENT_ID}'
end
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    """Addresses and credentials of a running test Orthanc, plus helpers on its native REST API."""

    port: int
    username: str
    password: str

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def _get(self, path: str) -> requests.Response:
        response = requests.get(self.rest + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID stored, to compare with what a pipeline meant to send."""
        instances = self._get("/instances?expand").json()
        return {instance["MainDicomTags"]["SOPInstanceUID"] for instance in instances}

    def instance_count(self) -> int:
        return int(self._get("/statistics").json()["CountInstances"])

    def clear(self) -> None:
        """Delete everything stored, so a test can start from an empty server."""
        for patient in self._get("/patients").json():
            requests.delete(f"{self.rest}/patients/{patient}", auth=self.auth, timeout=30).raise_for_status()


def _config(workdir: Path, port: int, username: str, password: str) -> dict:
    plugins = sorted(glob.glob(DICOMWEB_PLUGIN_GLOB))
    if not plugins:
        raise RuntimeError(f"no DICOMweb plugin matches {DICOMWEB_PLUGIN_GLOB}")
    return {
        "Name": "dicom-etl-tests",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": port,
        # Orthanc binds every interface; refusing non-loopback clients keeps it private.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "DicomServerEnabled": False,
        "DicomPort": _free_port(),
        "LuaScripts": [str(workdir / "reject.lua")],
        "Plugins": [plugins[0]],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "ConcurrentJobs": 2,
        "HttpTimeout": 30,
        "SaveJobs": False,
    }


@contextlib.contextmanager
def running_orthanc(username: str = "alice", password: str = "orthanc-test-secret") -> Iterator[Orthanc]:
    """Start a fresh Orthanc in a temporary directory; stop it and delete its storage on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="orthanc-test-"))
    try:
        port = _free_port()
        config = workdir / "orthanc.json"
        config.write_text(json.dumps(_config(workdir, port, username, password), indent=2))
        (workdir / "reject.lua").write_text(REJECT_FILTER)
        log_path = workdir / "orthanc.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
            )
        try:
            orthanc = Orthanc(port=port, username=username, password=password)
            _wait_until_up(server, orthanc, log_path)
            yield orthanc
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_until_up(server: subprocess.Popen, orthanc: Orthanc, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{orthanc.rest}/system", auth=orthanc.auth, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            why = "exited" if server.poll() is not None else f"did not answer within {timeout:.0f} s"
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"Orthanc {why}; log tail:\n{tail}")
        time.sleep(0.05)
