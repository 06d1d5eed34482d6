"""One checkpointed step shared by the listener, bulk ingest and the poll worker.

Given document changes: skip what the ledger says is already published with
the same fingerprint, publish the rest (or dead-letter it), wait for the
brokers' acks, then commit the acked ones to the ledger. A crash anywhere in
this step republishes at most this step's changes: the at-least-once window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.errors import PoisonRecord
from pipeline.producers.documents import REMOVE, DocChange, Layout, fingerprint, photo_ref, to_photo_event
from pipeline.producers.ledger import Entry, Ledger
from pipeline.producers.publisher import PhotoPublisher
from pipeline.records import now_ms

logger = logging.getLogger(__name__)

PUBLISHED, DELETED, DEAD_LETTERED = "published", "deleted", "dead_lettered"


@dataclass
class SyncStats:
    """What one or more steps did; only acknowledged records count as published."""

    published: int = 0
    deleted: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    failed: int = 0
    latencies_ms: list[int] = field(default_factory=list)

    def add(self, other: SyncStats) -> None:
        """Accumulate another step's counts."""
        for name in ("published", "deleted", "skipped", "dead_lettered", "ignored", "failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies_ms.extend(other.latencies_ms)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (f"published {self.published}, deleted {self.deleted}, skipped {self.skipped} unchanged, "
                f"dead-lettered {self.dead_lettered}, ignored {self.ignored}, failed {self.failed}")


@dataclass
class _Planned:
    change: DocChange
    outcome: str
    entry: Entry | None


class Syncer:
    """Applies document changes: ledger check, publish, wait for acks, checkpoint."""

    def __init__(self, ledger: Ledger, publisher: PhotoPublisher, layout: Layout, dim: int,
                 source: str, force: bool = False) -> None:
        self.ledger, self.publisher, self.layout = ledger, publisher, layout
        self.dim, self.source, self.force = dim, source, force

    def apply(self, changes: Sequence[DocChange], ack_timeout_s: float = 30.0) -> tuple[SyncStats, list[DocChange]]:
        """Publish what changed; returns the stats and the changes to retry (not acknowledged)."""
        stats = SyncStats()
        planned: dict[str, _Planned] = {}
        for change in coalesce(changes).values():
            plan = self._plan(change, stats)
            if plan is not None:
                planned[change.path] = plan
        if not planned:
            return stats, []
        acks = self.publisher.wait(ack_timeout_s)
        done = {path: plan for path, plan in planned.items() if path in acks.acked}
        self.ledger.commit({path: plan.entry for path, plan in done.items()})
        for path, plan in done.items():
            setattr(stats, plan.outcome, getattr(stats, plan.outcome) + 1)
            if plan.outcome == PUBLISHED and plan.change.update_ms:
                stats.latencies_ms.append(acks.ack_ms[path] - plan.change.update_ms)
        if stats.published:
            self.publisher.metrics.published.labels(self.source).inc(stats.published)
        retry = [plan.change for path, plan in planned.items() if path not in acks.acked]
        stats.failed = len(retry)
        return stats, retry

    def _plan(self, change: DocChange, stats: SyncStats) -> _Planned | None:
        if change.kind == REMOVE:
            return self._plan_remove(change, stats)
        print_ = fingerprint(change.data)
        known = self.ledger.get(change.path)
        if known is not None and known.fingerprint == print_ and not self.force:
            stats.skipped += 1
            return None
        entry = Entry(print_, change.update_ms)
        try:
            event = to_photo_event(change, self.layout, self.dim, self.source)
        except PoisonRecord as error:
            # Checkpointed like a publish, so an unchanged bad document is
            # dead-lettered once, not on every poll or listener restart.
            self.publisher.dead_letter(change.path, change, error)
            return _Planned(change, DEAD_LETTERED, entry)
        if event is None:
            stats.ignored += 1
            return None
        self.publisher.send(change.path, event)
        return _Planned(change, PUBLISHED, entry)

    def _plan_remove(self, change: DocChange, stats: SyncStats) -> _Planned | None:
        try:
            event = to_photo_event(change, self.layout, self.dim, self.source)
        except PoisonRecord:  # ids the index never accepted: nothing to delete
            event = None
        if event is None:
            stats.ignored += 1
            return None
        self.publisher.send(change.path, event)
        return _Planned(change, DELETED, None)


def coalesce(changes: Iterable[DocChange]) -> dict[str, DocChange]:
    """The last change of each document, in first-seen order (a photo added then removed is removed)."""
    latest: dict[str, DocChange] = {}
    for change in changes:
        latest[change.path] = change
    return latest


def removed_since(ledger: Ledger, present: Iterable[str], layout: Layout,
                  event_prefix: str | None = None) -> list[DocChange]:
    """REMOVE changes for ledger photos a complete listing no longer has (deleted while we were away)."""
    seen = set(present)
    gone = []
    for path in ledger.paths():
        if path in seen or (event_prefix is not None and not path.startswith(event_prefix)):
            continue
        try:
            if photo_ref(path, layout) is None:
                continue
        except PoisonRecord:
            continue
        gone.append(DocChange(kind=REMOVE, path=path, update_ms=now_ms()))
    return gone
