"""Read whole partitions of compacted topics, up to their end: state restore on assignment.

Kafka Streams calls this the restore consumer. A separate consumer (no group,
nothing committed) is assigned every partition at once and read until each
reports end-of-partition; the end offsets tell the main consumer where to go
on from, so no record is read twice or missed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

TP = tuple[str, int]


@dataclass
class Restored:
    """One partition's records (key, value; None values are tombstones) and its end offset."""

    records: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # of each record (compaction leaves gaps)
    end: int = 0


class RestoreTimeout(TimeoutError):
    """The partitions did not reach their end in time (the broker is unavailable)."""


def read_to_end(conf: dict[str, Any], partitions: Sequence[TP], timeout_s: float = 60.0) -> dict[TP, Restored]:
    """Every record of the partitions, from the beginning to the end they have now."""
    if not partitions:
        return {}
    consumer = Consumer({**conf, "group.id": f"facematch-restore-{uuid.uuid4().hex[:12]}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})
    out = {tp: Restored() for tp in partitions}
    open_ = set(out)
    try:
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
        deadline = time.monotonic() + timeout_s
        while open_:
            if time.monotonic() > deadline:
                raise RestoreTimeout(f"restoring {sorted(open_)}: no end of partition within {timeout_s:.0f}s")
            for msg in consumer.consume(500, timeout=0.5):
                key = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    out[key].end = max(out[key].end, int(msg.offset()))
                    open_.discard(key)
                    continue
                out[key].records.append((msg.key(), msg.value()))
                out[key].offsets.append(int(msg.offset()))
                out[key].end = int(msg.offset()) + 1
    finally:
        consumer.close()
    return out
