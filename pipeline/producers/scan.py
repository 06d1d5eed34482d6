"""Paged scans for bulk ingest and the poll worker: one checkpoint per page."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.producers.common import Context
from pipeline.producers.documents import DocChange
from pipeline.producers.firestore_source import iter_pages, snapshot_change
from pipeline.producers.sync import SyncStats

logger = logging.getLogger(__name__)

APPLY_ATTEMPTS = 3


@dataclass
class ScanResult:
    """What a scan published, which documents it saw, and whether it read to the end."""

    stats: SyncStats = field(default_factory=SyncStats)
    seen: set[str] = field(default_factory=set)
    documents: int = 0
    complete: bool = False


def apply_with_retry(ctx: Context, changes: list[DocChange], stop: threading.Event | None = None) -> SyncStats:
    """Apply changes, retrying unacknowledged ones a few times; the rest count as failed."""
    total = SyncStats()
    for attempt in range(1, APPLY_ATTEMPTS + 1):
        stats, retry = ctx.syncer.apply(changes)
        stats.failed = 0
        total.add(stats)
        if not retry:
            return total
        if attempt == APPLY_ATTEMPTS or (stop is not None and stop.is_set()):
            total.failed += len(retry)
            return total
        logger.warning("%d changes not acknowledged; retry %d", len(retry), attempt)
        if stop is not None:
            stop.wait(attempt)
        changes = retry
    return total


def scan(ctx: Context, query: Any, order_field: str = "__name__", stop: threading.Event | None = None,
         on_page: Callable[[list[Any], SyncStats], None] | None = None) -> ScanResult:
    """Read every document of `query` page by page, publishing what changed."""
    result = ScanResult()
    for page in iter_pages(query, ctx.settings.page_size, order_field):
        changes = [snapshot_change(snapshot) for snapshot in page]
        stats = apply_with_retry(ctx, changes, stop)
        result.stats.add(stats)
        result.seen.update(change.path for change in changes)
        result.documents += len(page)
        if on_page is not None:
            on_page(page, stats)
        if stop is not None and stop.is_set():
            return result
    result.complete = True
    return result
