"""pipeline/compat.py on real objects of the installed SDKs: an upgrade that moves a private attribute fails here.

No server is needed for Firestore: the client points at a closed loopback port
(FIRESTORE_EMULATOR_HOST), so the watch's stream only ever retries connecting.
The urllib3 checks use a real local HTTP server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest
import urllib3

from pipeline import compat
from tests.httpserver import http_server, respond

__all__ = ["http_server"]  # the fixture is used by name

FIRESTORE = f"google-cloud-firestore {version('google-cloud-firestore')} (checked: {compat.FIRESTORE_CHECKED})"
URLLIB3 = f"urllib3 {urllib3.__version__} (checked: {compat.URLLIB3_CHECKED})"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real firestore.Client that can reach nothing."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{_closed_port()}")
    client = firestore.Client(project="compat-check", credentials=AnonymousCredentials())
    yield client
    client.close()


def test_firestore_client_exposes_its_grpc_channel(client: Any) -> None:
    import grpc

    try:
        channel = compat.firestore_grpc_channel(client)
    except AttributeError as exc:
        pytest.fail(f"{FIRESTORE}: Client._firestore_api.transport.grpc_channel is gone ({exc}); "
                    "the listener can no longer follow the connection state")
    assert isinstance(channel, grpc.Channel), \
        f"{FIRESTORE}: Client._firestore_api.transport.grpc_channel is a {type(channel).__name__}, not a grpc.Channel"
    assert callable(getattr(channel, "subscribe", None)), "grpc.Channel.subscribe is gone"


def test_firestore_watch_internals_the_listener_relies_on(client: Any) -> None:
    from google.cloud.firestore_v1.base_query import BaseQuery
    from google.cloud.firestore_v1.types import ListenResponse, TargetChange
    from google.cloud.firestore_v1.watch import WATCH_TARGET_ID

    assert callable(getattr(BaseQuery, "_comparator", None)), \
        f"{FIRESTORE}: BaseQuery._comparator is gone; compat.set_watch_comparator must change"

    def by_path(a: Any, b: Any) -> int:
        return 0

    query = compat.set_watch_comparator(client.collection_group("photos"), by_path)
    watch = query.on_snapshot(lambda docs, changes, read_time: None)
    try:
        assert getattr(watch, "_comparator", None) is by_path, \
            f"{FIRESTORE}: Watch no longer takes its order from query._comparator; the O(n) re-sort is back"
        consumer = getattr(watch, "_consumer", None)
        assert consumer is not None, f"{FIRESTORE}: Watch._consumer (the BackgroundConsumer) is gone"
        assert callable(getattr(consumer, "_on_response", None)), \
            f"{FIRESTORE}: BackgroundConsumer._on_response is gone; stalled listen streams go undetected"
        assert hasattr(watch, "current") and hasattr(watch, "is_active"), \
            f"{FIRESTORE}: Watch.current / Watch.is_active are gone"
        assert hasattr(watch, "_closed"), f"{FIRESTORE}: Watch._closed is gone; compat.watch_closed must change"
        assert compat.watch_closed(watch) is False
        seen: list[bool] = []
        assert compat.on_watch_message(watch, lambda: seen.append(True))
        # What the consumer thread does per message; a NO_CHANGE target change leaves the watch as it is.
        consumer._on_response(ListenResponse(target_change=TargetChange(target_ids=[WATCH_TARGET_ID])))  # noqa: SLF001
        assert seen == [True], f"{FIRESTORE}: the wrapped _on_response did not run"
        assert compat.watch_closed(watch) is False
    finally:
        watch.unsubscribe()
    assert compat.watch_closed(watch) is True, f"{FIRESTORE}: Watch._closed is not set by unsubscribe()"


def test_on_watch_message_says_when_the_sdk_hides_messages() -> None:
    class NoConsumer:
        pass

    assert compat.on_watch_message(NoConsumer(), lambda: None) is False


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_response_socket_of_a_streamed_urllib3_response(http_server: Any, close: bool) -> None:  # noqa: F811
    headers = {"Connection": "close"} if close else {}
    site = http_server({"/x": respond(b"body", headers=headers)})
    port = int(site.base_url.rsplit(":", 1)[1])
    with urllib3.PoolManager() as pool:
        response = pool.request("GET", site.url("/x"), preload_content=False)
        try:
            if close:  # http.client dropped conn.sock: only the response file still holds the socket
                fp = getattr(response, "_fp", None)
                assert fp is not None, f"{URLLIB3}: HTTPResponse._fp (the http.client response) is gone"
                raw = getattr(getattr(fp, "fp", None), "raw", None)
                assert raw is not None, "http.client.HTTPResponse.fp.raw (the socket.SocketIO) is gone"
                assert isinstance(getattr(raw, "_sock", None), socket.socket), \
                    "socket.SocketIO._sock is gone (CPython); compat.response_socket must change"
            sock = compat.response_socket(response)
            assert sock is not None, f"{URLLIB3}: compat.response_socket found no socket (close={close})"
            assert sock.getpeername()[1] == port
            assert response.read() == b"body"
        finally:
            response.release_conn()
