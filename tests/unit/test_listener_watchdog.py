"""The Firestore listener's watchdog with a fake clock and fake watches: no emulator, no sleeps."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.producers.firestore_source import FirestoreSettings
from pipeline.producers.listener import BACKOFF_MIN_S, Listener, StreamLost

STEP_S = 0.05


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWatch:
    """What the watchdog reads of google.cloud.firestore_v1.watch.Watch (through pipeline.compat)."""

    def __init__(self, closed: bool = False) -> None:
        self._closed, self.is_active, self.current, self.unsubscribed = closed, not closed, True, False
        self._consumer = SimpleNamespace(_on_response=lambda response: None)

    def message(self) -> None:
        """The server sent something on the stream."""
        self._consumer._on_response(object())  # noqa: SLF001 - the fake plays the SDK consumer

    def close_by_sdk(self) -> None:
        """The SDK gave up on the stream (a terminating error): it never calls back again."""
        self._closed, self.is_active = True, False

    def unsubscribe(self) -> None:
        self.unsubscribed = True


class FakeQuery:
    """A query whose on_snapshot hands out FakeWatches: no callbacks ever arrive."""

    def __init__(self) -> None:
        self.watches: list[FakeWatch] = []
        self.broken = False  # new watches come already closed by the SDK

    def on_snapshot(self, callback: Any) -> FakeWatch:
        self.watches.append(FakeWatch(closed=self.broken))
        return self.watches[-1]


def drive(listener: Listener, clock: FakeClock, until: Callable[[], bool], limit_s: float) -> float:
    """Advance the clock in small steps, one watchdog step each, until `until()`; the time it took."""
    start = clock.now
    while not until():
        assert clock.now - start <= limit_s, f"nothing happened within {limit_s}s of fake time"
        clock.now += STEP_S
        listener.keep_subscribed()
    return clock.now - start


@pytest.fixture
def setup() -> tuple[Listener, FakeQuery, FakeClock]:
    query, clock = FakeQuery(), FakeClock()
    ctx: Any = SimpleNamespace(client=SimpleNamespace(collection_group=lambda name: query),
                               settings=FirestoreSettings())
    listener = Listener(ctx, stall_timeout_s=0.3, give_up_after_s=3.0, clock=clock)
    listener.subscribe()
    return listener, query, clock


def test_a_slow_snapshot_that_keeps_receiving_is_left_alone(setup) -> None:  # type: ignore[no-untyped-def]
    listener, query, clock = setup
    watch = query.watches[0]
    watch.current = False  # the server started a snapshot (a RESET) and sends its documents
    for _ in range(40):  # 6 s of fake time, far past the stall timeout, with a message every 0.15 s
        clock.now += 0.15
        watch.message()
        listener.keep_subscribed()
    assert query.watches == [watch] and not watch.unsubscribed


def test_a_stalled_snapshot_is_replaced_after_the_timeout_and_backoff(setup) -> None:  # type: ignore[no-untyped-def]
    listener, query, clock = setup
    watch = query.watches[0]
    watch.current = False
    watch.message()
    took = drive(listener, clock, lambda: watch.unsubscribed, limit_s=5)
    assert 0.3 < took <= 0.3 + 2 * STEP_S  # the stall timeout, measured from the last message
    assert len(query.watches) == 1  # not at once: after a backoff
    took = drive(listener, clock, lambda: len(query.watches) == 2, limit_s=5)
    assert BACKOFF_MIN_S - 1e-9 <= took <= BACKOFF_MIN_S + 2 * STEP_S


def test_a_current_watch_is_never_a_stall(setup) -> None:  # type: ignore[no-untyped-def]
    listener, query, clock = setup
    clock.now += 60  # a quiet collection: no messages for a minute, but the snapshot is complete
    listener.keep_subscribed()
    assert len(query.watches) == 1 and not query.watches[0].unsubscribed


def test_a_watch_closed_by_the_sdk_is_replaced_then_the_listener_gives_up(setup) -> None:  # type: ignore[no-untyped-def]
    listener, query, clock = setup
    query.watches[0].close_by_sdk()
    drive(listener, clock, lambda: len(query.watches) == 2, limit_s=5)
    assert query.watches[0].unsubscribed and not query.watches[1].unsubscribed
    listener.keep_subscribed()  # the new watch works: the outage is over
    assert len(query.watches) == 2

    query.broken = True  # from now on every stream is closed at once
    query.watches[1].close_by_sdk()
    started = clock.now
    with pytest.raises(StreamLost, match="no working listen stream"):
        drive(listener, clock, lambda: False, limit_s=10)
    assert 3.0 < clock.now - started <= 3.0 + 2 * STEP_S  # give_up_after_s, in fake time
    assert len(query.watches) >= 3  # it re-subscribed at least once more (backoff 1 s, then 2 s) meanwhile


def test_no_give_up_when_disabled(setup) -> None:  # type: ignore[no-untyped-def]
    listener, query, clock = setup
    listener.give_up_after_s = 0.0
    query.broken = True
    query.watches[0].close_by_sdk()
    started = clock.now
    drive(listener, clock, lambda: clock.now - started > 120, limit_s=121)
    assert len(query.watches) >= 5  # still re-subscribing, the backoff capped
