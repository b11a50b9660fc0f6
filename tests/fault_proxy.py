"""An HTTP proxy on loopback that breaks scripted requests, to test retries against a real server.

Each request takes the next fault of the script in arrival order (only requests that `when` picks, if
given); once the script is used up, requests pass through unchanged. Faults either answer without
forwarding (an error status, or a dropped connection) or forward and then cut the answer short, so the
server has acted but the client cannot know it.

Two standing rules besides the script: `max_body` answers 413 to any request whose body is larger,
as a server or load balancer with a request size limit does (nginx's client_max_body_size), without
forwarding it or using up the script; and `before` runs just before a request is forwarded, with its
method, path and body, so that another client can act on the server at that very moment (a
concurrent writer storing the same instance first).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

# Headers that describe one connection, never forwarded (RFC 9110 7.6.1), plus those rewritten here.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)  # fmt: skip
_REWRITTEN = frozenset({"host", "content-length"})

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Fault:
    """One scripted failure; build with Fault.status(...), Fault.drop_before() or Fault.drop_after()."""

    kind: Literal["status", "drop_before", "drop_after"]
    code: int | None = None
    retry_after: int | None = None

    @classmethod
    def status(cls, code: int, retry_after: int | None = None) -> Fault:
        """Answer `code` (with Retry-After when given) without forwarding: the server never sees it."""
        return cls("status", code, retry_after)

    @classmethod
    def drop_before(cls) -> Fault:
        """Close the connection without answering or forwarding: the server never sees it."""
        return cls("drop_before")

    @classmethod
    def drop_after(cls) -> Fault:
        """Forward, then send the server's headers and half its body and close: the server did act."""
        return cls("drop_after")


@dataclass
class ProxiedRequest:
    """What the proxy saw: the fault applied (None for pass-through) and the upstream's status, if asked."""

    method: str
    path: str
    fault: Fault | None
    upstream_status: int | None = None
    size: int = 0  # bytes of the request body


class FaultProxy:
    """Context manager serving http://127.0.0.1:{port} in front of `upstream` (e.g. http://127.0.0.1:8042)."""

    def __init__(
        self,
        upstream: str,
        faults: Sequence[Fault] = (),
        timeout: float = 60,
        when: Callable[[str, str], bool] | None = None,
        max_body: int | None = None,
        before: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_netloc = parts.netloc
        self.timeout = timeout
        self.requests: list[ProxiedRequest] = []
        self._faults = list(faults)
        self._when = when  # (method, path) -> whether the request takes the next fault
        self.max_body = max_body  # larger request bodies are answered 413, not forwarded
        self.before = before  # (method, path, body) -> None, run before a request is forwarded
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def _arrive(self, method: str, path: str, size: int = 0) -> ProxiedRequest:
        """Take the next fault (or None) and record the request, atomically so the order is arrival order.
        A body over `max_body` is answered 413 and takes no fault of the script."""
        with self._lock:
            if self.max_body is not None and size > self.max_body:
                record = ProxiedRequest(method, path, Fault.status(413), size=size)
            else:
                picked = self._faults and (self._when is None or self._when(method, path))
                record = ProxiedRequest(method, path, self._faults.pop(0) if picked else None, size=size)
            self.requests.append(record)
            return record


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the requests are recorded in proxy.requests instead."""

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_GET

    def _handle(self) -> None:
        path = self.path
        if "://" in path:  # absolute-form target, as sent to a forward proxy
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        body = self._read_body()
        record = self.proxy._arrive(self.command, path, len(body))
        fault = record.fault
        if fault is None or fault.kind == "drop_after":
            if self.proxy.before is not None:
                self.proxy.before(self.command, path, body)
            try:
                status, reason, headers, payload = self._forward(path, body)
            except (OSError, http.client.HTTPException) as error:
                self._send(
                    502, "Bad Gateway", [("Content-Type", "text/plain")], f"upstream: {error}\n".encode()
                )
                return
            record.upstream_status = status
            if fault is None:
                self._send(status, reason, headers, payload)
            else:
                self._send_truncated(status, reason, headers, payload)
        elif fault.kind == "status":
            assert fault.code is not None
            headers = [("Content-Type", "text/plain")]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            self._send(
                fault.code, _reason(fault.code), headers, f"{fault.code} injected by FaultProxy\n".encode()
            )
        else:  # drop_before: nothing is written, the server closes the socket after this handler returns
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, path: str, body: bytes) -> tuple[int, str, Headers, bytes]:
        """Send the request upstream on a fresh connection and read the whole answer."""
        listed = {token.strip().lower() for token in self.headers.get("Connection", "").split(",")}
        connection = http.client.HTTPConnection(
            self.proxy.upstream_host, self.proxy.upstream_port, timeout=self.proxy.timeout
        )
        try:
            connection.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP | _REWRITTEN | listed:
                    connection.putheader(name, value)
            connection.putheader("Host", self.proxy.upstream_netloc)
            if body or self.command in ("POST", "PUT"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            payload = response.read()
            listed_back = {
                token.strip().lower() for token in (response.getheader("Connection") or "").split(",")
            }
            headers = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _HOP_BY_HOP | _REWRITTEN | listed_back
            ]
            return response.status, response.reason, headers, payload
        finally:
            connection.close()

    def _head(self, status: int, reason: str, headers: Headers, length: int) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
        lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, reason: str, headers: Headers, payload: bytes) -> None:
        self.wfile.write(self._head(status, reason, headers, len(payload)) + payload)
        self.wfile.flush()

    def _send_truncated(self, status: int, reason: str, headers: Headers, payload: bytes) -> None:
        """Half the body (or, if there is none, half the head), then close: a truncated answer either way."""
        head = self._head(status, reason, headers, len(payload))
        self.close_connection = True
        self.wfile.write(head + payload[: len(payload) // 2] if payload else head[: len(head) // 2])
        self.wfile.flush()


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Injected"
