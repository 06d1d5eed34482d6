"""Per-record delivery tracking: which outputs of a record were acked, and which failures are final."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message

from pipeline.stage_api import Incoming

# Delivery errors that no retry fixes: the record is dead-lettered instead of
# being redelivered forever (e.g. a reply topic or partition that does not exist).
PERMANENT_DELIVERY_ERRORS = frozenset({
    KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_EXCEPTION, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.INVALID_MSG_SIZE,
})


# A broker that lost its producer state (restart, failover) fences an idempotent producer
# record by record; only a new producer gets through again.
PRODUCER_IDENTITY_ERRORS = frozenset({
    KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.INVALID_PRODUCER_ID_MAPPING,
})


def breaks_producer(err: KafkaError) -> bool:
    """True when the producer that got `err` will refuse everything from now on."""
    return bool(err.fatal()) or err.code() in PRODUCER_IDENTITY_ERRORS


def calls_for_new_producer(err: KafkaError) -> bool:
    """True when a new producer is the way on: it is broken, or one of its records timed out.

    A broker that lost its producer state (Tansu restarted with memory storage) answers
    UNKNOWN_PRODUCER_ID; where no record risks a duplicate, librdkafka bumps the epoch locally
    and sends again, forever, without any error reaching us: its records only time out. A new
    producer asks the broker for a new id and gets through. Replacing one that is merely waiting
    for a broker that is down costs a reconnect and nothing else (the caller produces anew).
    """
    return breaks_producer(err) or err.code() == KafkaError._MSG_TIMED_OUT


UNCONFIRMED = "acknowledged without an offset (as a duplicate): the broker may not hold it"


def has_offset(msg: Message) -> bool:
    """False for a success that names no offset: produce it again.

    An idempotent producer whose batch was in flight when the broker died retries it after the
    restart; a broker that kept the producer's sequence but not the batch (Tansu's S3 engine after
    a SIGKILL) answers DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as a success without an
    offset. Producing the record anew is safe: every consumer here takes a record twice.
    """
    offset = msg.offset()
    return offset is not None and offset >= 0


class DeliveryFailed(Exception):
    """An output of the record can never be delivered (unknown topic/partition, too large)."""

    reason = "delivery_failed"


@dataclass
class DeliveryTrack:
    """Delivery state of one record's outputs (its DLQ record, once dead-lettered)."""

    item: Incoming
    attempts: int
    dead_letter: bool
    pending: int = 0
    permanent: list[str] = field(default_factory=list)
    transient: list[str] = field(default_factory=list)
    needs_new_producer: bool = False

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        self.pending -= 1
        if err is not None:
            self.failed(err, msg.topic(), msg.partition())
        elif not has_offset(msg):
            self.transient.append(f"{msg.topic()}[{msg.partition()}]: {UNCONFIRMED}")

    def failed(self, err: KafkaError, topic: str, partition: int | None) -> None:
        self.needs_new_producer = self.needs_new_producer or calls_for_new_producer(err)
        where = topic if partition is None or partition < 0 else f"{topic}[{partition}]"
        errors = self.permanent if err.code() in PERMANENT_DELIVERY_ERRORS else self.transient
        errors.append(f"{where}: {err.name()}: {err.str()}")

    @property
    def unreported(self) -> bool:
        """Outputs with no delivery report at all after the flush: the producer may be stuck (see above)."""
        return self.pending > 0

    @property
    def delivered(self) -> bool:
        return self.pending == 0 and not self.permanent and not self.transient
