"""`facematch bulk-ingest`: publish every photo of one event, or of all events.

Pages through Firestore in document-name order with start_after cursors,
checkpointing the ledger after each page's acks. Re-running publishes only
photos whose image_url/embedding changed since (or nothing); --force
republishes everything. Deletions are not looked for here: the listener and
the poll worker mirror those.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence

from tqdm import tqdm

from pipeline.logs import setup_logging
from pipeline.producers.common import add_common_args, build_context, on_stop_signals, producer_settings
from pipeline.producers.firestore_source import ConfigError, FirestoreSettings, count, photos_query
from pipeline.producers.ledger import LedgerLocked
from pipeline.producers.scan import scan
from pipeline.settings import KafkaSettings, LogSettings, ModelSettings, TopicSettings

logger = logging.getLogger(__name__)

STAGE = "bulk-ingest"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        prog="facematch bulk-ingest",
        description="Publish every photo of one event, or of all events, to Kafka.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--event-id", help="ingest the photos of this event")
    scope.add_argument("--all-events", action="store_true", help="ingest the photos of every event")
    parser.add_argument("--page-size", type=int, default=300, help="documents per Firestore read (default: 300)")
    parser.add_argument("--force", action="store_true", help="republish photos the ledger says are unchanged")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_args(parser, STAGE)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Ingest, print a summary; exit 1 if any photo could not be published."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(LogSettings().log_level)
    settings = producer_settings(args, FirestoreSettings(), KafkaSettings(), TopicSettings(), ModelSettings())
    try:
        ctx = build_context(settings, args.state_file, args.metrics_port, STAGE, force=args.force)
    except (LedgerLocked, ConfigError) as exc:
        logger.error("%s", exc)
        return 2
    stop = threading.Event()
    on_stop_signals(stop.set)
    try:
        query = photos_query(ctx.client, ctx.settings, args.event_id)
        started = time.monotonic()
        with tqdm(total=count(query), unit="photo", desc=args.event_id or "all events",
                  disable=args.no_progress, mininterval=0.5, dynamic_ncols=True) as bar:
            result = scan(ctx, query, stop=stop, on_page=lambda page, _: bar.update(len(page)))
        elapsed = time.monotonic() - started
    finally:
        ctx.close()
    stats = result.stats
    rate = result.documents / elapsed if elapsed > 0 else 0.0
    print(f"{STAGE}: {result.documents} documents in {elapsed:.1f}s ({rate:.0f}/s): {stats.summary()}"
          + ("" if result.complete else " (interrupted)"))
    return 1 if stats.failed or not result.complete else 0


if __name__ == "__main__":
    sys.exit(main())
