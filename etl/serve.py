"""Serve a local folder over loopback HTTP, so img2dataset downloads the demo data for real."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def _make_server(directory: Path, host: str, port: int) -> ThreadingHTTPServer:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot serve {directory}: not a directory")
    server = ThreadingHTTPServer((host, port), partial(QuietFileHandler, directory=str(directory.resolve())))
    server.daemon_threads = True
    return server


@contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``directory`` in a daemon thread; yields the base URL (``http://host:port``), stops on exit."""
    server = _make_server(directory, host, port)
    thread = threading.Thread(target=server.serve_forever, name=f"serve {directory}", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve_forever(directory: Path, port: int, host: str = "127.0.0.1") -> None:
    """Blocking server for ``sd3 data serve DIR --port P``; stops on Ctrl-C."""
    server = _make_server(directory, host, port)
    print(f"serving {Path(directory).resolve()} at http://{host}:{server.server_address[1]} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
