"""The tests' FHIR R4 server: medplum's fhir-router over its in-memory repository
(tests/fhir_server/server.mjs, installed by `make test` with `npm ci --prefix tests/fhir_server`),
started on a free loopback port and stopped by its process id."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

DIRECTORY = Path(__file__).parent / "fhir_server"
BASE = "/fhir/R4"


class FhirServer:
    def __init__(self, port: int, process: subprocess.Popen[str]) -> None:
        self.port = port
        self.process = process
        self.root = f"http://127.0.0.1:{port}"
        self.base = f"{self.root}{BASE}"

    def provenance(self, token: str | None = None, **search: str) -> list[dict[str, Any]]:
        """Every Provenance the server holds that matches `search` (parameter: value), following the
        search's `next` links."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url: str | None = f"{self.base}/Provenance"
        query: dict[str, str] | None = {"_count": "1000", **search}
        found: list[dict[str, Any]] = []
        while url:
            answer = requests.get(url, params=query, headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text
            bundle, query = answer.json(), None  # a `next` link carries the query
            found += [entry["resource"] for entry in bundle.get("entry", [])]
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def node_command() -> list[str]:
    """node, with the WebSocket global medplum's core needs (built in from Node 22; a flag on 20-21)."""
    node = shutil.which("node")
    if node is None or not (DIRECTORY / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise RuntimeError(
            "the FHIR test server is not installed: make tests/fhir_server/node_modules/.installed"
        )
    major = int(
        subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()[1:].split(".")[0]
    )
    return [node, "--experimental-websocket"] if major < 22 else [node]


def start(log: Path, token: str | None = None) -> FhirServer:
    """The server on a free port (it listens on port 0 and prints the one it got); its stderr in `log`."""
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [*node_command(), "server.mjs", "0", *([token] if token else [])],
            cwd=DIRECTORY,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until it listens, or dies
    if not line.startswith("listening "):
        process.kill()
        process.wait(10)
        raise RuntimeError(f"the FHIR test server did not start: {log.read_text()[-2000:]}")
    return FhirServer(int(line.split()[1]), process)


def serving(log: Path, token: str | None = None) -> Iterator[FhirServer]:
    server = start(log, token)
    try:
        yield server
    finally:
        server.stop()
