"""`facematch photo-worker`: poll Firestore for new, changed and deleted photos.

For deployments where a long-lived listener is not allowed. Each poll scans
the 'photos' collection group in name order and diffs it against the ledger
(the listener's and bulk ingest's checkpoint): new or changed photos
(image_url/embedding) are published, ledger photos the complete scan did
not see get a DELETE. This needs no field in the documents and catches
every kind of change, at one Firestore read per photo per poll.

`--updated-field uploaded_at` reads only documents whose timestamp field is
at or after the last watermark minus `--overlap` (cheap, but it cannot see
deletions, and photos without the field are never read). The overlap covers
writers whose timestamp is older than their commit; the ledger drops the
repeats it brings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pipeline.logs import setup_logging
from pipeline.producers.common import Context, add_common_args, build_context, on_stop_signals, producer_settings
from pipeline.producers.firestore_source import ConfigError, FirestoreSettings, photos_query
from pipeline.producers.ledger import LedgerLocked
from pipeline.producers.scan import ScanResult, apply_with_retry, scan
from pipeline.producers.sync import removed_since
from pipeline.settings import KafkaSettings, LogSettings, ModelSettings, TopicSettings

logger = logging.getLogger(__name__)

STAGE = "photo-worker"


def poll_full(ctx: Context, stop: threading.Event) -> ScanResult:
    """Scan every photo; publish what changed and delete what disappeared."""
    result = scan(ctx, photos_query(ctx.client, ctx.settings), stop=stop)
    # Only a scan that read to the end proves a photo is gone.
    if result.complete:
        gone = removed_since(ctx.ledger, result.seen, ctx.settings.layout)
        if gone:
            result.stats.add(apply_with_retry(ctx, gone, stop))
    return result


def poll_incremental(ctx: Context, field: str, overlap_s: float, stop: threading.Event) -> ScanResult:
    """Read photos whose `field` timestamp is at or after the watermark minus the overlap."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    key = f"watermark:{field}"
    query = photos_query(ctx.client, ctx.settings)
    mark = ctx.ledger.meta.get(key)
    if mark:
        since = dt.datetime.fromisoformat(mark) - dt.timedelta(seconds=overlap_s)
        query = query.where(filter=FieldFilter(field, ">=", since))
    intact = True

    def advance(page: list[Any], stats: Any) -> None:
        nonlocal intact
        # A page with unpublished photos pins the watermark: they are read again next poll.
        intact = intact and not stats.failed
        stamps = [s.get(field) for s in page if isinstance(s.get(field), dt.datetime)]
        if intact and stamps:
            ctx.ledger.commit({}, meta={key: max(stamps).isoformat()})

    result = scan(ctx, query, order_field=field, stop=stop, on_page=advance)
    if result.documents and key not in ctx.ledger.meta:
        logger.warning("%s: no timestamp values in %r: every poll reads every photo", STAGE, field)
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        prog="facematch photo-worker",
        description="Poll Firestore for new, changed and deleted photos and publish them to Kafka.")
    parser.add_argument("--once", action="store_true", help="poll once and exit")
    parser.add_argument("--poll-interval", type=float, default=30.0, help="seconds between polls (default: 30)")
    parser.add_argument("--page-size", type=int, default=300, help="documents per Firestore read (default: 300)")
    parser.add_argument("--updated-field", help="timestamp field to poll by (e.g. uploaded_at); default: full scan")
    parser.add_argument("--overlap", type=float, default=300.0, metavar="SECONDS",
                        help="with --updated-field: re-read this far behind the watermark (default: 300)")
    add_common_args(parser, STAGE)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Poll until SIGTERM/SIGINT (or once); exit 1 if a --once poll left photos unpublished."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(LogSettings().log_level)
    settings = producer_settings(args, FirestoreSettings(), KafkaSettings(), TopicSettings(), ModelSettings())
    try:
        ctx = build_context(settings, args.state_file, args.metrics_port, STAGE)
    except (LedgerLocked, ConfigError) as exc:
        logger.error("%s", exc)
        return 2
    stop = threading.Event()
    on_stop_signals(stop.set)
    failed = 0
    try:
        while not stop.is_set():
            if args.updated_field:
                result = poll_incremental(ctx, args.updated_field, args.overlap, stop)
            else:
                result = poll_full(ctx, stop)
            failed = result.stats.failed
            line = f"{STAGE}: poll read {result.documents} documents: {result.stats.summary()}"
            if args.once:
                print(line, flush=True)
                break
            logger.info("%s", line)
            stop.wait(args.poll_interval)
    finally:
        ctx.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
