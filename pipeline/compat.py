"""Every use of a library's private attributes, in one place.

Each function below reaches past a public API that does not offer what we
need; its docstring says what is missing. They were checked against
google-cloud-firestore 2.34.1 (google-api-core 2.x, grpcio 1.85), urllib3
2.8.0 with requests 2.34, and CPython 3.11. tests/unit/test_compat.py runs them
on real objects of the installed versions and fails naming the library and
the attribute when an upgrade moves one. This is the only module ruff's SLF001
allows to touch private members.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

FIRESTORE_CHECKED = "google-cloud-firestore 2.34.1"
URLLIB3_CHECKED = "urllib3 2.8.0"


# -- google-cloud-firestore ------------------------------------------------------
def firestore_grpc_channel(client: Any) -> Any:
    """The grpc.Channel under a firestore.Client, to follow its connectivity state.

    The Client exposes no transport: `_firestore_api` is its lazily built GAPIC
    client (a property), whose `transport.grpc_channel` is public. Raises
    AttributeError on another SDK or a non-gRPC transport.
    """
    return client._firestore_api.transport.grpc_channel


def set_watch_comparator(query: Any, comparator: Callable[[Any, Any], int]) -> Any:
    """Make on_snapshot's Watch order documents with `comparator`; returns the query.

    Watch.for_query reads `query._comparator` (a method building protobufs per
    comparison) once, when the watch starts; there is no public way to pass
    another. An instance attribute shadows the method for this query only.
    """
    query._comparator = comparator
    return query


def on_watch_message(watch: Any, callback: Callable[[], None]) -> bool:
    """Call `callback()` for every message the Watch's listen stream receives.

    The SDK reports snapshots, not messages, so a stream that stalls inside a
    snapshot is invisible. The Watch's BackgroundConsumer (`_consumer`) calls
    its `_on_response` per message; we wrap it. False (nothing hooked) when
    this SDK version has neither.
    """
    consumer = getattr(watch, "_consumer", None)
    inner = getattr(consumer, "_on_response", None)
    if inner is None:
        return False

    def on_response(response: Any) -> Any:
        callback()
        return inner(response)

    consumer._on_response = on_response  # type: ignore[union-attr]
    return True


def watch_closed(watch: Any) -> bool:
    """Whether the SDK has closed the Watch for good (it never calls back again).

    `Watch.is_active` is public but reflects the RPC, which may look alive a
    moment longer; `_closed` is set by Watch.close(), also on terminating errors.
    """
    return bool(getattr(watch, "_closed", False))


# -- urllib3 / http.client ----------------------------------------------------------
def response_socket(raw: Any) -> socket.socket | None:
    """The socket a streamed urllib3 HTTPResponse reads from, or None once closed.

    Used to shrink the read timeout below the deadline (and to see the peer
    address). `HTTPResponse.connection.sock` is public, but http.client drops
    `conn.sock` for "Connection: close" replies; the socket then lives only in
    the response file: urllib3's `_fp` (an http.client.HTTPResponse), its
    `fp.raw` (a socket.SocketIO) and that one's `_sock`.
    """
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        file = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(file, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
