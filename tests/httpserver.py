"""A local threaded HTTP(S) server for tests that need real sockets.

Serve a dict of path -> route and get back a running site::

    from tests.httpserver import serve, respond, not_found, slow, drip, flaky, redirect, huge

    with serve({"/face.jpg": jpeg_bytes, "/gone": not_found()}) as site:
        site.url("/face.jpg")        # "http://127.0.0.1:<port>/face.jpg"
        site.base_url                # "http://127.0.0.1:<port>"
        site.calls["/face.jpg"]      # requests seen per path (query ignored)
        site.requests[-1].headers    # headers of the last request (e.g. "Host")
        site.sni_names               # TLS server names received (https only)

Plain bytes are served as 200 with a content type guessed from the path
extension. Route helpers:

- respond(data, status=200, content_type=None, headers=None): fixed reply.
- not_found(): a 404.
- slow(delay_s, data=b""): waits delay_s before sending anything (read timeout).
- drip(data, interval_s): headers at once, then one byte per interval (deadline).
- flaky(data, failures=1, status=500): `failures` error replies, then 200.
- redirect(location, status=302): location may be a path or an absolute URL.
- huge(total_bytes, chunked=False): streams zeros, with or without Content-Length.

Routes may be added after start (``site.routes["/late"] = b"..."``), e.g. when
one route's URL must point at another site. Pass ``tls=(certfile, keyfile)``
to serve https. As a pytest fixture: ``from tests.httpserver import
http_server`` in a test module (or conftest), then ``site = http_server(routes)``;
every site started through it is stopped at teardown. Each response closes
its connection so stopping never waits on keep-alive sockets.
"""

from __future__ import annotations

import collections
import contextlib
import mimetypes
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_CHUNK = 64 * 1024


class Route:
    """Base class: subclasses write a whole response through the handler."""

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        """Write the response for the call_no-th request (1-based) to this path."""
        raise NotImplementedError


@dataclass
class _Fixed(Route):
    data: bytes
    status: int = 200
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        _head(req, self.status, self.content_type, len(self.data), self.headers)
        req.wfile.write(self.data)


@dataclass
class _Slow(Route):
    delay_s: float
    data: bytes

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        if stop.wait(self.delay_s):
            return
        _head(req, 200, None, len(self.data), {})
        req.wfile.write(self.data)


@dataclass
class _Drip(Route):
    data: bytes
    interval_s: float

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        _head(req, 200, None, len(self.data), {})
        for i in range(len(self.data)):
            req.wfile.write(self.data[i : i + 1])
            req.wfile.flush()
            if stop.wait(self.interval_s):
                return


@dataclass
class _Flaky(Route):
    data: bytes
    failures: int
    status: int

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        if call_no <= self.failures:
            _Fixed(b"try again later", self.status, "text/plain").handle(req, call_no, stop)
        else:
            _Fixed(self.data).handle(req, call_no, stop)


@dataclass
class _Huge(Route):
    total_bytes: int
    chunked: bool

    def handle(self, req: BaseHTTPRequestHandler, call_no: int, stop: threading.Event) -> None:
        extra = {"Transfer-Encoding": "chunked"} if self.chunked else {}
        _head(req, 200, "application/octet-stream", None if self.chunked else self.total_bytes, extra)
        sent = 0
        with contextlib.suppress(OSError):  # the client is expected to hang up early
            while sent < self.total_bytes and not stop.is_set():
                piece = bytes(min(_CHUNK, self.total_bytes - sent))
                req.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
                sent += len(piece)
            if self.chunked:
                req.wfile.write(b"0\r\n\r\n")


def respond(
    data: bytes, status: int = 200, content_type: str | None = None, headers: Mapping[str, str] | None = None
) -> Route:
    """A fixed response."""
    return _Fixed(data, status, content_type, dict(headers or {}))


def not_found() -> Route:
    """A 404 with a short text body."""
    return _Fixed(b"not found", 404, "text/plain")


def slow(delay_s: float, data: bytes = b"") -> Route:
    """Send nothing for delay_s, then data."""
    return _Slow(delay_s, data)


def drip(data: bytes, interval_s: float) -> Route:
    """Send headers at once, then data one byte per interval_s."""
    return _Drip(data, interval_s)


def flaky(data: bytes, failures: int = 1, status: int = 500) -> Route:
    """Answer `status` for the first `failures` calls, then 200 with data."""
    return _Flaky(data, failures, status)


def redirect(location: str, status: int = 302) -> Route:
    """Redirect to location (a path or an absolute URL)."""
    return _Fixed(b"", status, None, {"Location": location})


def huge(total_bytes: int, chunked: bool = False) -> Route:
    """Stream total_bytes zeros; chunked=True omits Content-Length."""
    return _Huge(total_bytes, chunked)


def _head(
    req: BaseHTTPRequestHandler, status: int, content_type: str | None, length: int | None, extra: Mapping[str, str]
) -> None:
    req.send_response(status)
    if content_type is None:
        content_type = mimetypes.guess_type(req.path.split("?", 1)[0])[0] or "application/octet-stream"
    req.send_header("Content-Type", content_type)
    if length is not None:
        req.send_header("Content-Length", str(length))
    for name, value in extra.items():
        req.send_header(name, value)
    req.send_header("Connection", "close")
    req.end_headers()


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Site:
    """A running server: its base URL, routes and what it has seen."""

    base_url: str
    routes: dict[str, Route]
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    sni_names: list[str | None] = field(default_factory=list)  # TLS server names clients sent
    requests: list[SeenRequest] = field(default_factory=list)

    def url(self, path: str) -> str:
        """Absolute URL for path on this site."""
        return self.base_url + path


RouteSpec = bytes | Route


def _handler_class(site: Site, stop: threading.Event, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # needed for chunked replies

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.split("?", 1)[0]
            with lock:
                site.calls[path] += 1
                call_no = site.calls[path]
                site.requests.append(SeenRequest("GET", self.path, dict(self.headers.items())))
            self.close_connection = True
            route = site.routes.get(path) or not_found()
            with contextlib.suppress(ConnectionError):  # clients under test hang up early on purpose
                route.handle(self, call_no, stop)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@contextlib.contextmanager
def serve(routes: Mapping[str, RouteSpec], tls: tuple[str, str] | None = None,
          host: str = "127.0.0.1") -> Iterator[Site]:
    """Run a threaded server on host (any loopback address) for the duration of the with-block."""
    table = {path: spec if isinstance(spec, Route) else _Fixed(bytes(spec)) for path, spec in routes.items()}
    stop = threading.Event()
    site = Site("", table)
    server = ThreadingHTTPServer((host, 0), _handler_class(site, stop, threading.Lock()))
    server.daemon_threads = True
    server.block_on_close = False  # slow handlers are released by `stop`, not joined
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        context.sni_callback = lambda _sock, name, _ctx: site.sni_names.append(name)
        # Handshake in the handler thread, so a bad client cannot stall accept().
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    site.base_url = f"{scheme}://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[Callable[..., Site]]:
    """Factory fixture: http_server(routes, tls=None) -> Site, stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda routes, tls=None: stack.enter_context(serve(routes, tls))
