"""The indexer's direct-query listener (pipeline/direct.py says why and the wire format).

One thread per connection reads length-prefixed match requests and writes the
answer of `answer(request_bytes)`: a match-reply record, or NOT_MINE when this
indexer does not own the event's partition right now. A malformed frame closes
the connection; the bridge then goes through Kafka.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable

from pipeline.direct import FRAME_HEADER, NOT_MINE, FrameError, frame, frame_length

logger = logging.getLogger(__name__)

Answer = Callable[[bytes], bytes]


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.server.thread_init()
        with self.server.lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.request)

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small reply per request
        stream = sock.makefile("rb")
        try:
            while True:
                header = stream.read(FRAME_HEADER.size)
                if len(header) < FRAME_HEADER.size:
                    return  # the bridge closed the connection
                length = frame_length(header)
                payload = stream.read(length)
                if len(payload) < length:
                    return
                sock.sendall(frame(self.server.safe_answer(payload)))
        except (FrameError, OSError) as exc:
            logger.debug("direct query connection from %s closed: %s", self.client_address, exc)
        finally:
            stream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], answer: Answer, thread_init: Callable[[], None]) -> None:
        self.answer, self.thread_init = answer, thread_init
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Connection)

    def safe_answer(self, payload: bytes) -> bytes:
        try:
            return self.answer(payload)
        except Exception:  # never kill the connection thread: the bridge falls back to Kafka
            logger.exception("direct query failed; answering NOT_MINE")
            return NOT_MINE


class QueryListener:
    """Serves direct queries on host:port (port 0: any free one) from a background thread."""

    def __init__(self, host: str, port: int, answer: Answer, advertised_host: str = "",
                 thread_init: Callable[[], None] = lambda: None) -> None:
        # thread_init runs first in each connection's thread (per-thread settings such as OpenMP's).
        self._server = _Server((host, port), answer, thread_init)
        bound_port = self._server.server_address[1]
        binds_all = host in ("0.0.0.0", "::", "")  # noqa: S104 (a comparison, not a bind)
        advertise = advertised_host or (socket.gethostname() if binds_all else host)
        self.address = f"[{advertise}]:{bound_port}" if ":" in advertise else f"{advertise}:{bound_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="direct-queries", daemon=True)

    def start(self) -> None:
        """Accept connections in the background."""
        self._thread.start()
        logger.info("direct queries on %s", self.address)

    def close(self) -> None:
        """Stop accepting and end open connections (their bridges go through Kafka meanwhile)."""
        self._server.shutdown()
        self._server.server_close()
        with self._server.lock:
            for sock in self._server.connections:
                with contextlib.suppress(OSError):  # already closed by the bridge
                    sock.shutdown(socket.SHUT_RDWR)
