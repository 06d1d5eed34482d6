"""`facematch firestore-listener`: publish photo changes as Firestore reports them.

on_snapshot runs its callback on an SDK thread; the callback only converts
the changes to plain DocChanges and queues them. The main thread publishes,
waits for the brokers' acks, then checkpoints the ledger. Every (re)subscribe
starts with the full current snapshot: photos the ledger already holds with
the same fingerprint are skipped, and ledger photos missing from it were
deleted meanwhile, so their DELETE is published then.

A watchdog in the main loop re-subscribes, with backoff, whenever the SDK
closed the stream or it stalled (snapshot_feed.py). A listener that has had no
working stream for --give-up-after seconds exits with status 3, so that its
supervisor restarts it instead of it waiting silently forever.

At-least-once window: a SIGKILL between the acks of a step and the ledger's
fsync republishes that step, at most --max-batch photos. Nothing is lost:
whatever was queued but not checkpointed comes back in the next start's
initial snapshot.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pipeline.logs import setup_logging
from pipeline.producers.common import (
    Context,
    add_common_args,
    build_context,
    latency_line,
    on_stop_signals,
    producer_settings,
)
from pipeline.producers.documents import REMOVE, UPSERT, DocChange
from pipeline.producers.firestore_source import ConfigError, FirestoreSettings, photos_query
from pipeline.producers.ledger import LedgerLocked
from pipeline.producers.snapshot_feed import Delivery, SnapshotFeed
from pipeline.producers.sync import SyncStats, removed_since
from pipeline.records import now_ms
from pipeline.settings import KafkaSettings, LogSettings, ModelSettings, TopicSettings
from pipeline.summary import start_summaries

logger = logging.getLogger(__name__)

STAGE = "firestore-listener"
LOG_EVERY_S = 10.0
LATENCY_SAMPLES = 10_000
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
STALL_TIMEOUT_S = 30.0
GIVE_UP_AFTER_S = 900.0
WARN_EVERY_S = 30.0
EXIT_NO_STREAM = 3


class StreamLost(RuntimeError):
    """No working listen stream for longer than --give-up-after."""


class Listener:
    """The main-thread loop: keep a working subscription, drain the queue, apply one step.

    `clock` (monotonic seconds) times the watchdog, so tests can drive it without sleeping.
    """

    def __init__(self, ctx: Context, resubscribe_every_s: float = 0.0, stall_timeout_s: float = STALL_TIMEOUT_S,
                 give_up_after_s: float = GIVE_UP_AFTER_S, clock: Callable[[], float] = time.monotonic,
                 ready_file: Path | None = None) -> None:
        self.ctx, self.clock, self.ready_file = ctx, clock, ready_file
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self.feed = SnapshotFeed(ctx.client, photos_query(ctx.client, ctx.settings), self.deliveries, clock)
        self.pending: dict[str, DocChange] = {}
        self.totals, self._recent = SyncStats(), SyncStats()
        self._logged_at = clock()
        self.resubscribe_every_s = resubscribe_every_s
        self.stall_timeout_s, self.give_up_after_s = stall_timeout_s, give_up_after_s
        self._stopping = threading.Event()
        self._backoff_s = BACKOFF_MIN_S
        self._retry_at: float | None = None  # when a broken subscription is replaced
        self._broken_since: float | None = None
        self._warned_at = 0.0

    def stop(self) -> None:
        """Finish the current step, then exit (signal-safe)."""
        self._stopping.set()

    def run(self) -> None:
        """Until stop(): keep the subscription alive and publish what it reports."""
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        self.subscribe()
        logger.info("%s: listening to collection group %r", STAGE, self.ctx.settings.photos_collection)
        try:
            while not self._stopping.is_set():
                self.keep_subscribed()
                self._take(timeout_s=0.0 if self.pending else 0.2)
                if self.pending:
                    self._step()
                self.ctx.publisher.poll()
        finally:
            if self.ready_file is not None:
                self.ready_file.unlink(missing_ok=True)
            self.feed.shutdown()
            logger.info("%s: stopped: %s; %s", STAGE, self.totals.summary(), latency_line(self.totals.latencies_ms))

    def subscribe(self) -> None:
        """(Re)subscribe; a failure is logged and left to the watchdog's retries."""
        try:
            self.feed.subscribe()
        except Exception as exc:  # the watchdog retries with backoff
            logger.error("%s: on_snapshot failed: %r", STAGE, exc)
            self.feed.close()

    def keep_subscribed(self) -> None:
        """One watchdog step: replace a closed or stalled subscription; StreamLost after a long outage."""
        now = self.clock()
        if self.resubscribe_every_s and self.feed.watch is not None \
                and now - self.feed.subscribed_at > self.resubscribe_every_s:
            logger.info("%s: periodic re-listen (--resubscribe-every)", STAGE)
            self.subscribe()
        problem = self.feed.problem(self.stall_timeout_s)
        if problem is not None and self._retry_at is None:
            logger.warning("%s: listen stream %s; re-subscribing in %.1fs", STAGE, problem, self._backoff_s)
            self.feed.close()
            self._retry_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self.subscribe()
            problem = self.feed.problem(self.stall_timeout_s)
        if problem is None and not self.feed.connection.ready:
            problem = f"no connection to Firestore ({self.feed.connection.state})"
        self._track_outage(now, problem)

    def _track_outage(self, now: float, problem: str | None) -> None:
        if problem is None:
            if self._broken_since is not None and now - self._broken_since >= 1.0:
                logger.info("%s: listening again after %.0fs", STAGE, now - self._broken_since)
            self._broken_since = None
            return
        if self._broken_since is None:
            self._broken_since = self._warned_at = now
            return
        down_s = now - self._broken_since
        if self.give_up_after_s and down_s > self.give_up_after_s:
            raise StreamLost(f"no working listen stream for {down_s:.0f}s (last: {problem}); exiting "
                             f"with status {EXIT_NO_STREAM} so that a supervisor restarts the listener")
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            limit = f"giving up after {self.give_up_after_s:.0f}s" if self.give_up_after_s else "never giving up"
            logger.warning("%s: not listening for %.0fs (%s); %s", STAGE, down_s, problem, limit)

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
        self._backoff_s = BACKOFF_MIN_S  # a complete snapshot: the stream works again
        now = now_ms()
        for path, change in list(self.pending.items()):
            if change.kind == UPSERT and path not in delivery.present:
                self.pending[path] = DocChange(kind=REMOVE, path=path, update_ms=now)
        for change in removed_since(self.ctx.ledger, delivery.present, self.ctx.settings.layout):
            self.pending.setdefault(change.path, change)
        logger.info("%s: initial snapshot: %d documents, %d changes to examine", STAGE,
                    len(delivery.present), len(self.pending))
        if self.ready_file is not None:
            self.ready_file.touch()

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
        elapsed = self.clock() - self._logged_at
        if elapsed < LOG_EVERY_S:
            return
        recent, self._recent, self._logged_at = self._recent, SyncStats(), self.clock()
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
    parser.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="SECONDS",
                        help="re-subscribe when a started snapshot gets no message for this long "
                             "(default: %(default)s)")
    parser.add_argument("--give-up-after", type=float, default=GIVE_UP_AFTER_S, metavar="SECONDS",
                        help=f"exit with status {EXIT_NO_STREAM} after this long without a working listen "
                             "stream, for a supervisor to restart the listener (0: never; default: %(default)s)")
    parser.add_argument("--ready-file", type=Path, metavar="PATH",
                        help="create this file once listening (after each complete initial snapshot) and "
                             "remove it on exit, for a readiness probe")
    return parser.parse_args(list(argv))


def _log_sdk_threads(args: threading.ExceptHookArgs) -> None:
    """Thread exceptions through logging: the SDK re-raises why it closed a watch on a thread of its own."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    error = args.exc_value
    if isinstance(error, Exception) and type(error).__module__.startswith("google."):
        logger.warning("%s: thread %s ended: %s", STAGE, name, error)
    elif error is not None:
        logger.error("%s: thread %s died", STAGE, name, exc_info=error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the listener until SIGTERM/SIGINT."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_settings = LogSettings()
    setup_logging(log_settings.log_level, log_settings.log_format)
    google = logging.getLogger("google")
    if google.level == logging.NOTSET:
        # A configured "google" logger keeps google-api-core from cutting it off
        # from the root logger: the SDK's warnings then reach our log.
        google.setLevel(logging.WARNING)
    threading.excepthook = _log_sdk_threads
    settings = producer_settings(args, FirestoreSettings(), KafkaSettings(), TopicSettings(), ModelSettings())
    try:
        ctx = build_context(settings, args.state_file, args.metrics_port, STAGE)
    except (LedgerLocked, ConfigError) as exc:
        logger.error("%s", exc)
        return 2
    start_summaries(STAGE, ctx.publisher.metrics.registry, log_settings.log_summary_interval_s, kind="producer")
    listener = Listener(ctx, resubscribe_every_s=args.resubscribe_every, stall_timeout_s=args.stall_timeout,
                        give_up_after_s=args.give_up_after, ready_file=args.ready_file)
    on_stop_signals(listener.stop)
    try:
        listener.run()
    except StreamLost as exc:
        logger.error("%s: %s", STAGE, exc)
        return EXIT_NO_STREAM
    finally:
        ctx.close()
    return 0


def exit_without_waiting_for_sdk_threads(status: int) -> NoReturn:
    """Leave with `status` now: ours is closed by then (producer flushed, ledger released).

    After a lost stream the Firestore SDK can leave a gRPC thread blocked ("Background thread
    did not exit"), and the interpreter joins its threads at exit: once in a few test runs the
    listener logged "exiting with status 3" and never ended, so no supervisor would restart it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main_and_exit(argv: Sequence[str] | None = None) -> NoReturn:
    """main(), then exit_without_waiting_for_sdk_threads: the entry point of `facematch firestore-listener`."""
    exit_without_waiting_for_sdk_threads(main(argv))


if __name__ == "__main__":
    main_and_exit()
