"""The dead-letter envelope: the original bytes in an Avro DeadLetter, the facts again in headers.

The runner dead-letters consumed records; the Firestore producers dead-letter
documents that never became records. Both describe where the bytes came from
with a DeadLetterSource, so neither has to pretend to be the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.kafka import Output
from pipeline.records import now_ms
from pipeline.serde import DEAD_LETTER, SchemaRegistry

MAX_MESSAGE_CHARS = 2000  # an error message longer than this is cut, header and envelope alike


@dataclass(frozen=True)
class DeadLetterSource:
    """Where the refused bytes came from: a topic position, or (partition -1) a document path."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter_output(serde: SchemaRegistry, dlq_topic: str, stage: str, source: DeadLetterSource,
                       reason: str, error: BaseException, attempts: int, redact: bool = False) -> Output:
    """The DLQ record for `source`, keyed like the original so an event's letters stay together.

    redact=True leaves the original value out (a selfie's embedding must not sit in
    the DLQ for its retention); the header dlq.redacted says so.
    """
    message = str(error)[:MAX_MESSAGE_CHARS]
    error_class = type(error).__name__
    envelope = {"stage": stage, "reason": reason, "error_class": error_class,
                "error_message": message, "source_topic": source.topic,
                "source_partition": source.partition, "source_offset": source.offset,
                "attempts": attempts, "key": source.key, "value": None if redact else source.value,
                "failed_at": now_ms()}
    headers = [("dlq.stage", stage.encode()), ("dlq.reason", reason.encode()),
               ("dlq.error_class", error_class.encode()),
               ("dlq.error_message", message.encode()),
               ("dlq.source_topic", source.topic.encode()),
               ("dlq.source_partition", str(source.partition).encode()),
               ("dlq.source_offset", str(source.offset).encode()),
               ("dlq.attempts", str(attempts).encode())]
    if redact:
        headers.append(("dlq.redacted", b"value"))
    return Output(topic=dlq_topic, key=source.key, value=serde.encode(DEAD_LETTER, envelope), headers=headers)
