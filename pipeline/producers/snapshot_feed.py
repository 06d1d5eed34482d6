"""The listener's on_snapshot subscription, and how to tell that it stopped working.

The SDK's Watch hides its failures. Measured against the emulator across
restarts (see docs/firestore.md), a listen stream ends in one of three ways:

- it resumes by itself (the usual case);
- the SDK closes it for good: a stream the server resets with CANCEL is a
  "terminating" error for the SDK, which then never calls back again;
- it stalls: the server starts a snapshot (RESET) and never finishes it, while
  the stream stays open and the SDK reports it active.

`SnapshotFeed.problem()` names the last two; the listener then re-subscribes.
The public surface has only `Watch.is_active`; the rest reads SDK attributes
through pipeline/compat.py, guarded, so that an SDK without them only loses the
stall detection (logged). Time comes from an injected `clock` (monotonic
seconds), so tests drive the watchdog without sleeping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.compat import firestore_grpc_channel, on_watch_message, set_watch_comparator, watch_closed
from pipeline.producers.documents import REMOVE, DocChange
from pipeline.producers.firestore_source import snapshot_change, to_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One on_snapshot callback: its changes, and every document path if it was the first."""

    changes: list[DocChange]
    present: frozenset[str] | None = None


class Connection:
    """Connectivity of the client's gRPC channel, from grpc.Channel.subscribe."""

    def __init__(self, client: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.state = "UNKNOWN"
        self.ready = True  # unknown counts as connected: nothing to wait for
        self.changed_at = clock()
        self._channel: Any = None
        try:
            channel = firestore_grpc_channel(client)
            channel.subscribe(self._on_state, try_to_connect=True)
            self._channel = channel
        except Exception as exc:  # another transport or SDK version
            logger.warning("firestore: connection state unavailable (%r); outages show only as stalls", exc)

    def _on_state(self, state: Any) -> None:
        name = getattr(state, "name", str(state))
        ready = name == "READY"
        was_known, self.state = self.state != "UNKNOWN", name
        if ready == self.ready and was_known:
            return
        self.ready, self.changed_at = ready, self.clock()
        if ready:
            logger.info("firestore: connected")
        elif was_known or name == "TRANSIENT_FAILURE":
            logger.warning("firestore: connection lost; the SDK keeps reconnecting")

    def close(self) -> None:
        """Stop receiving state changes."""
        if self._channel is not None:
            self._channel.unsubscribe(self._on_state)
            self._channel = None


class SnapshotFeed:
    """Owns the on_snapshot subscription; replace it with subscribe() when problem() says so."""

    def __init__(self, client: Any, query: Any, out: queue.Queue[Delivery],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.query, self.out, self.clock = query, out, clock
        self.connection = Connection(client, clock)
        self.watch: Any = None
        self.subscribed_at = 0.0
        self.last_message_at = 0.0
        self._tracked = False
        self._generation = 0

    def subscribe(self) -> None:
        """Start a fresh listen; its first callback carries the complete current state."""
        self.close()
        self._generation += 1
        generation, first = self._generation, threading.Event()

        def callback(docs: list[Any], changes: list[Any], read_time: Any) -> None:
            if generation != self._generation:  # a replaced watch still delivering
                return
            present = None if first.is_set() else frozenset(d.reference.path for d in docs)
            first.set()
            self.out.put(Delivery([_change(c, read_time) for c in changes], present))

        self.subscribed_at = self.last_message_at = self.clock()
        self.watch = _by_path_order(self.query).on_snapshot(callback)
        self._tracked = self._track_messages(self.watch)

    def _track_messages(self, watch: Any) -> bool:
        """Time-stamp every message of the stream, to tell a slow snapshot from a stalled one."""
        def on_message() -> None:
            self.last_message_at = self.clock()

        if not hasattr(watch, "current") or not on_watch_message(watch, on_message):
            logger.warning("firestore: this SDK version hides the stream's progress; stalls go undetected "
                           "(use --resubscribe-every)")
            return False
        return True

    def problem(self, stall_timeout_s: float) -> str | None:
        """Why the subscription will deliver nothing more, or None while it works (or may)."""
        watch = self.watch
        if watch is None:
            return "not subscribed"
        if watch_closed(watch) or not watch.is_active:
            return "closed by the SDK"
        if not self._tracked or not self.connection.ready or watch.current:
            return None  # disconnected: the SDK reconnects by itself, and the listener counts the outage
        quiet_s = self.clock() - max(self.last_message_at, self.connection.changed_at)
        if quiet_s > stall_timeout_s:
            return f"stalled: a snapshot started {quiet_s:.0f}s ago was never completed"
        return None

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        watch, self.watch = self.watch, None
        if watch is not None:
            try:
                watch.unsubscribe()
            except Exception as exc:  # closing a broken stream re-raises its cause
                logger.debug("unsubscribe: %r", exc)

    def shutdown(self) -> None:
        """Unsubscribe and stop following the connection."""
        self.close()
        self.connection.close()


def _by_path_order(query: Any) -> Any:
    """The query, with a cheap comparator for the SDK's own bookkeeping."""
    # Watch re-sorts every document of the result on each snapshot with
    # Query._comparator, which builds protobufs per comparison (~0.1 ms): at
    # 5,000 photos that is seconds per change. We never use that order, so
    # plain path order (the query has no order_by) does the same job.
    def by_path(a: Any, b: Any) -> int:
        left, right = str(a.reference.path), str(b.reference.path)
        return (left > right) - (left < right)

    return set_watch_comparator(query, by_path)


def _change(change: Any, read_time: Any) -> DocChange:
    if change.type.name == "REMOVED":
        # The document is gone: its last update time is not the deletion's.
        return DocChange(kind=REMOVE, path=change.document.reference.path, update_ms=to_ms(read_time))
    return snapshot_change(change.document)
