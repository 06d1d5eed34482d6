"""`facematch firestore-listener`: publish photo changes as Firestore reports them.

on_snapshot runs its callback on an SDK thread; the callback only converts
the changes to plain DocChanges and queues them. The main thread publishes,
waits for the brokers' acks, then checkpoints the ledger. Every (re)subscribe
starts with the full current snapshot: photos the ledger already holds with
the same fingerprint are skipped, and ledger photos missing from it were
deleted meanwhile, so their DELETE is published then.

At-least-once window: a SIGKILL between the acks of a step and the ledger's
fsync republishes that step, at most --max-batch photos. Nothing is lost:
whatever was queued but not checkpointed comes back in the next start's
initial snapshot.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.logs import setup_logging
from pipeline.producers.common import Context, add_common_args, build_context, latency_line, on_stop_signals
from pipeline.producers.documents import REMOVE, UPSERT, DocChange
from pipeline.producers.firestore_source import ConfigError, photos_query, snapshot_change, to_ms
from pipeline.producers.ledger import LedgerLocked
from pipeline.producers.sync import SyncStats, removed_since
from pipeline.records import now_ms

logger = logging.getLogger(__name__)

STAGE = "firestore-listener"
LOG_EVERY_S = 10.0
LATENCY_SAMPLES = 10_000


@dataclass(frozen=True)
class Delivery:
    """One on_snapshot callback: its changes, and every document path if it was the first."""

    changes: list[DocChange]
    present: frozenset[str] | None = None


class SnapshotFeed:
    """Owns the on_snapshot subscription and replaces it when the SDK gives up."""

    def __init__(self, query: Any, out: queue.Queue[Delivery]) -> None:
        self.query, self.out = query, out
        self.watch: Any = None
        self.subscribed_at = 0.0
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

        self.watch = _by_path_order(self.query).on_snapshot(callback)
        self.subscribed_at = time.monotonic()

    def healthy(self) -> bool:
        """False once the SDK closed the stream for good (it then never calls back again)."""
        watch = self.watch
        return watch is not None and not getattr(watch, "_closed", False) and watch.is_active

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        if self.watch is not None:
            try:
                self.watch.unsubscribe()
            except Exception as exc:  # closing a broken stream re-raises its cause
                logger.debug("unsubscribe: %r", exc)
            self.watch = None


def _by_path_order(query: Any) -> Any:
    """The query, with a cheap comparator for the SDK's own bookkeeping."""
    # Watch re-sorts every document of the result on each snapshot with
    # Query._comparator, which builds protobufs per comparison (~0.1 ms): at
    # 5,000 photos that is seconds per change. We never use that order, so
    # plain path order (the query has no order_by) does the same job.
    def by_path(a: Any, b: Any) -> int:
        left, right = a.reference.path, b.reference.path
        return (left > right) - (left < right)

    query._comparator = by_path
    return query


def _change(change: Any, read_time: Any) -> DocChange:
    if change.type.name == "REMOVED":
        # The document is gone: its last update time is not the deletion's.
        return DocChange(kind=REMOVE, path=change.document.reference.path, update_ms=to_ms(read_time))
    return snapshot_change(change.document)


class Listener:
    """The main-thread loop: drain the queue, apply one step, retry what was not acked."""

    def __init__(self, ctx: Context, resubscribe_every_s: float = 0.0) -> None:
        self.ctx = ctx
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self.feed = SnapshotFeed(photos_query(ctx.client, ctx.settings), self.deliveries)
        self.pending: dict[str, DocChange] = {}
        self.totals, self._recent = SyncStats(), SyncStats()
        self._logged_at = time.monotonic()
        self.resubscribe_every_s = resubscribe_every_s
        self._stopping = threading.Event()
        self._backoff_s = 0.5

    def stop(self) -> None:
        """Finish the current step, then exit (signal-safe)."""
        self._stopping.set()

    def run(self) -> None:
        """Until stop(): keep the subscription alive and publish what it reports."""
        self.feed.subscribe()
        logger.info("%s: listening to collection group %r", STAGE, self.ctx.settings.photos_collection)
        try:
            while not self._stopping.is_set():
                self._keep_subscribed()
                self._take(timeout_s=0.0 if self.pending else 0.2)
                if self.pending:
                    self._step()
                self.ctx.publisher.poll()
        finally:
            self.feed.close()
            logger.info("%s: stopped: %s; %s", STAGE, self.totals.summary(), latency_line(self.totals.latencies_ms))

    def _keep_subscribed(self) -> None:
        stale = self.resubscribe_every_s and time.monotonic() - self.feed.subscribed_at > self.resubscribe_every_s
        if self.feed.healthy() and not stale:
            return
        if not stale:
            logger.warning("%s: snapshot stream closed; resubscribing in %.1fs", STAGE, self._backoff_s)
            self._stopping.wait(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, 30.0)
        self.feed.subscribe()

    def _take(self, timeout_s: float) -> None:
        try:
            delivery = self.deliveries.get(timeout=timeout_s) if timeout_s else self.deliveries.get_nowait()
        except queue.Empty:
            return
        while True:
            self._merge(delivery)
            if len(self.pending) >= self.ctx.settings.max_batch:
                return
            try:
                delivery = self.deliveries.get_nowait()
            except queue.Empty:
                return

    def _merge(self, delivery: Delivery) -> None:
        for change in delivery.changes:
            self.pending.pop(change.path, None)  # re-insert: newest last
            self.pending[change.path] = change
        if delivery.present is None:
            return
        self._backoff_s = 0.5  # a complete snapshot: the stream works again
        now = now_ms()
        for path, change in list(self.pending.items()):
            if change.kind == UPSERT and path not in delivery.present:
                self.pending[path] = DocChange(kind=REMOVE, path=path, update_ms=now)
        for change in removed_since(self.ctx.ledger, delivery.present, self.ctx.settings.layout):
            self.pending.setdefault(change.path, change)
        logger.info("%s: initial snapshot: %d documents, %d changes to examine", STAGE,
                    len(delivery.present), len(self.pending))

    def _step(self) -> None:
        batch = list(itertools.islice(self.pending.values(), self.ctx.settings.max_batch))
        for change in batch:
            del self.pending[change.path]
        stats, retry = self.ctx.syncer.apply(batch)
        self.totals.add(stats)
        del self.totals.latencies_ms[:-LATENCY_SAMPLES]  # bounded memory in a long-lived process
        self._recent.add(stats)
        self._log_progress()
        for change in retry:
            self.pending.setdefault(change.path, change)  # a newer change of it may have arrived
        if retry:
            self._stopping.wait(1.0)  # the broker is struggling: do not spin

    def _log_progress(self) -> None:
        # One line per LOG_EVERY_S, not per photo: a busy listener steps often.
        elapsed = time.monotonic() - self._logged_at
        if elapsed < LOG_EVERY_S:
            return
        recent, self._recent, self._logged_at = self._recent, SyncStats(), time.monotonic()
        if recent.published or recent.deleted or recent.dead_lettered or recent.failed:
            logger.info("%s: last %.0fs: %s; %s", STAGE, elapsed, recent.summary(),
                        latency_line(recent.latencies_ms))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        prog="facematch firestore-listener",
        description="Publish Firestore photo changes to Kafka as they happen (on_snapshot).")
    add_common_args(parser, STAGE)
    parser.add_argument("--resubscribe-every", type=float, default=0.0, metavar="SECONDS",
                        help="re-listen periodically as a guard against silent stalls; each costs one "
                             "read per photo (0: never)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the listener until SIGTERM/SIGINT."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        ctx = build_context(args, STAGE)
    except (LedgerLocked, ConfigError) as exc:
        logger.error("%s", exc)
        return 2
    listener = Listener(ctx, resubscribe_every_s=args.resubscribe_every)
    on_stop_signals(listener.stop)
    try:
        listener.run()
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
