"""The ways in to a FakeDrive (fakedrive.py): `FakeHttp`, an httplib2.Http stand-in for the
real google-api-python-client in this process, with seeded faults; `serve()`, a real local HTTP
server for CLI subprocesses ($CHERRY_DRIVE_ENDPOINT); `fake_drive_storage`, a DriveStorage on
one."""

from __future__ import annotations

import itertools
import json
import random
import threading

from cherry_train.testing.fakedrive import FakeDrive


class DroppedConnection(ConnectionResetError):
    """The fake's stand-in for a connection lost after the server acted on the request."""


class FakeHttp:
    """An httplib2.Http stand-in that serves requests from a FakeDrive, with seeded faults.

    fault_rate: the share of requests that fail; of those, half fail before the server acts
    (429, 500, 503, 403 rateLimitExceeded) and half after it (the response is dropped)."""

    def __init__(self, drive: FakeDrive, fault_rate: float = 0.0, seed: int = 0,
                 token: str | None = None):
        self.drive, self.fault_rate, self.token = drive, fault_rate, token
        self.rng = random.Random(seed)
        self.faults = 0
        self._lock = threading.Lock()
        self.redirect_codes = frozenset()

    def request(self, uri, method="GET", body=None, headers=None, redirections=5,
                connection_type=None):
        import httplib2

        headers = dict(headers or {})
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        if hasattr(body, "read"):
            body = body.read()
        body = body.encode() if isinstance(body, str) else (body or b"")
        with self._lock:
            roll, kind = self.rng.random(), self.rng.randrange(5)
        if roll < self.fault_rate:
            self.faults += 1
            if kind < 4:  # refused before anything happened
                status, reason = [(429, "rateLimitExceeded"), (500, "backendError"),
                                  (503, "backendError"), (403, "userRateLimitExceeded")][kind]
                payload = json.dumps({"error": {"code": status, "message": reason, "errors": [
                    {"domain": "usageLimits", "reason": reason, "message": reason}]}}).encode()
                return httplib2.Response({"status": status,
                                          "content-type": "application/json"}), payload
            self.drive.handle(method, uri, headers, body)
            raise DroppedConnection("connection reset by peer (the server did act)")
        status, out_headers, out = self.drive.handle(method, uri, headers, body)
        return httplib2.Response({"status": status, **out_headers}), out

    def close(self):
        pass


def serve(drive: FakeDrive, host: str = "127.0.0.1", port: int = 0):
    """Serve the fake over real HTTP on a thread; returns (server, endpoint URL). Stop it with
    server.shutdown()."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, out = drive.handle(self.command, self.path, dict(self.headers),
                                                body)
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() == "location":
                    v = v.replace("https://fake.invalid", endpoint.rstrip("/"))
                if k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    endpoint = f"http://{host}:{server.server_address[1]}/"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, endpoint


def fake_drive_storage(drive: FakeDrive, folder: str = "traina", fault_rate: float = 0.0,
                       seed: int = 0, chunk_bytes: int = 256 * 1024):
    """A DriveStorage on the fake: the real client, no waiting between retries, small chunks
    (so resumable uploads and chunked downloads take several requests even in small tests).
    Each thread gets its own FakeHttp, as each gets its own httplib2.Http in real use."""
    from cherry_train.storage.gdrive import DriveStorage

    seeds = itertools.count(seed)
    return DriveStorage(folder, lambda: FakeHttp(drive, fault_rate, seed=next(seeds)),
                        sleep=lambda _s: None, chunk_bytes=chunk_bytes)
