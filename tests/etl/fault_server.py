"""A loopback HTTP server whose routes reproduce the faults a web crawl meets (shared test fixture).

    with FaultServer(slow_seconds=3) as server:
        server.url("/404"), server.add("/cat.png", png_bytes, "image/png")

Routes: /404, /500, /slow (answers after ``slow_seconds``), /redirect (302 to /valid.png), /valid.png,
/valid.jpg, /png-as-text (a valid PNG served as text/plain), /html-as-jpeg, /empty (zero-byte image/jpeg),
/random (random bytes as image/jpeg), /flaky (503 Service Unavailable to its first request, /valid.png's
answer after), plus whatever ``add`` registers. ``requests`` counts the requests per path.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image


def encode_image(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


VALID_PNG_SIZE = (40, 30)  # (width, height)
VALID_JPEG_SIZE = (50, 20)
VALID_PNG = encode_image(VALID_PNG_SIZE, (200, 30, 30), "PNG")
VALID_JPEG = encode_image(VALID_JPEG_SIZE, (30, 30, 200), "JPEG")
HTML_PAGE = b"<!doctype html><html><body><h1>Not an image</h1></body></html>"
RANDOM_BYTES = random.Random(0).randbytes(2048)


class FaultServer:
    def __init__(self, slow_seconds: float = 3.0):
        self.slow_seconds = slow_seconds
        self._bodies: dict[str, tuple[int, bytes, str, dict[str, str]]] = {}
        self._add_response("/valid.png", 200, VALID_PNG, "image/png")
        self._add_response("/valid.jpg", 200, VALID_JPEG, "image/jpeg")
        self._add_response("/png-as-text", 200, VALID_PNG, "text/plain")
        self._add_response("/html-as-jpeg", 200, HTML_PAGE, "image/jpeg")
        self._add_response("/empty", 200, b"", "image/jpeg")
        self._add_response("/random", 200, RANDOM_BYTES, "image/jpeg")
        self._add_response("/404", 404, b"not found", "text/plain")
        self._add_response("/500", 500, b"server error", "text/plain")
        self._add_response("/redirect", 302, b"", "text/plain", {"Location": "/valid.png"})
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _add_response(self, path, status, body, content_type, headers=None):
        self._bodies[path] = (status, body, content_type, headers or {})

    def add(self, path: str, body: bytes, content_type: str) -> str:
        """Serve ``body`` at ``path`` with status 200 (on a running server); returns the full URL."""
        if not path.startswith("/"):
            path = "/" + path
        url = self.url(path)
        self._add_response(path, 200, body, content_type)
        return url

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultServer is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> "FaultServer":
        fault_server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
                pass

            def do_GET(self):
                with fault_server._lock:
                    fault_server.requests[self.path] += 1
                if self.path == "/slow":
                    time.sleep(fault_server.slow_seconds)
                    status, body, content_type, headers = 200, VALID_PNG, "image/png", {}
                elif self.path == "/flaky":
                    with fault_server._lock:
                        first = fault_server.requests["/flaky"] == 1
                    status, body, content_type, headers = (503, b"try later", "text/plain", {}) if first else (
                        200, VALID_PNG, "image/png", {})
                else:
                    status, body, content_type, headers = fault_server._bodies.get(
                        self.path, (404, b"no such route", "text/plain", {})
                    )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the /slow route): nothing left to answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None


@pytest.fixture
def fault_server():
    with FaultServer() as server:
        yield server
