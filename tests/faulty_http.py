"""Misbehaving servers on 127.0.0.1 for storage fault tests (plain sockets and the
standard library's HTTP server, each in a thread).

``SilentServer`` accepts TCP connections and never answers. ``FaultyProxy`` forwards
S3 requests to a real server (SeaweedFS) unchanged, except that it answers chosen
requests itself with an S3 error (503 SlowDown, 429 …) a set number of times.
"""

from __future__ import annotations

import http.client
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

# hop-by-hop headers and the one aiohttp would wait on; the rest travel unchanged (the
# request's signature covers Host and the x-amz headers)
DROPPED = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)


class SilentServer:
    """Accepts every connection on 127.0.0.1 and never sends a byte (a hung endpoint)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)  # held open, never read or answered

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


@dataclass
class Rule:
    """Answer ``count`` requests whose method is ``method`` and whose path contains
    ``part`` with HTTP ``status`` and S3 error ``code``."""

    status: int
    code: str
    method: str
    part: str
    count: int
    answered: list[str] = field(default_factory=list)

    def takes(self, method: str, path: str) -> bool:
        return method == self.method and self.part in path and len(self.answered) < self.count


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (an ``http://host:port`` URL)."""

    def __init__(self, upstream: str, rules: list[Rule]) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rules = rules
        self.lock = threading.Lock()
        self.forwarded = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fault_for(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.takes(method, path):
                    rule.answered.append(path)
                    return rule
            self.forwarded += 1
            return None

    def forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                if name.lower() not in DROPPED:
                    connection.putheader(name, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def handler_for(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def handle_one(self) -> None:
            assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "chunked body"
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            rule = proxy.fault_for(self.command, self.path)
            if rule is not None:
                data = ERROR_BODY.format(code=rule.code).encode()
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            status, reason, headers, data = proxy.forward(
                self.command, self.path, self.headers, body
            )
            self.send_response(status, reason)
            for name, value in headers:
                lower = name.lower()
                # a HEAD answer keeps the object's Content-Length; others get the body's
                if lower not in DROPPED and (lower != "content-length" or self.command == "HEAD"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

    return Handler
