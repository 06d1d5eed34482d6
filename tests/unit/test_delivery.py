"""DeliveryTrack: which acks count. Pure unit test: a message stand-in carries only what the callback reads."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError

from pipeline.delivery import UNCONFIRMED, DeliveryTrack, calls_for_new_producer, has_offset
from pipeline.stage_api import Incoming


@dataclass
class Acked:
    offset_: int | None
    topic_: str = "faces"
    partition_: int = 2

    def offset(self) -> int | None:
        return self.offset_

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_


def track(pending: int) -> DeliveryTrack:
    item = Incoming(topic="photo-events", partition=0, offset=7, key=b"e", value=b"v", headers={}, timestamp_ms=0)
    return DeliveryTrack(item, attempts=1, dead_letter=False, pending=pending)


def test_an_ack_with_an_offset_delivers() -> None:
    t = track(pending=2)
    t.on_delivery(None, Acked(10))  # type: ignore[arg-type]
    assert not t.delivered
    t.on_delivery(None, Acked(0))  # type: ignore[arg-type]
    assert t.delivered


def test_an_ack_without_an_offset_is_produced_again_not_trusted() -> None:
    # librdkafka's success for DUPLICATE_SEQUENCE_NUMBER names no offset; Tansu (S3) answers that
    # for batches it lost in a SIGKILL, so the record would be acked and gone.
    for missing in (None, -1):
        assert not has_offset(Acked(missing))  # type: ignore[arg-type]
        t = track(pending=1)
        t.on_delivery(None, Acked(missing))  # type: ignore[arg-type]
        assert not t.delivered and not t.permanent
        assert t.transient == [f"faces[2]: {UNCONFIRMED}"]


def test_errors_still_sort_into_permanent_and_transient() -> None:
    t = track(pending=2)
    t.on_delivery(KafkaError(KafkaError._UNKNOWN_PARTITION), Acked(None))  # type: ignore[arg-type]
    t.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), Acked(None))  # type: ignore[arg-type]
    assert len(t.permanent) == 1 and len(t.transient) == 1 and not t.delivered


def test_a_timed_out_record_or_a_fenced_producer_calls_for_a_new_producer() -> None:
    # A broker that forgot the producer id makes librdkafka bump its epoch forever: records only time out.
    for code in (KafkaError._MSG_TIMED_OUT, KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.PRODUCER_FENCED):
        assert calls_for_new_producer(KafkaError(code))
    for code in (KafkaError._TRANSPORT, KafkaError._UNKNOWN_PARTITION, KafkaError.NOT_LEADER_FOR_PARTITION):
        assert not calls_for_new_producer(KafkaError(code))
    t = track(pending=2)
    t.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), Acked(None))  # type: ignore[arg-type]
    assert t.needs_new_producer


def test_outputs_without_any_report_are_unreported() -> None:
    t = track(pending=2)
    t.on_delivery(None, Acked(3))  # type: ignore[arg-type]
    assert t.unreported and not t.delivered  # one output never heard of: the runner replaces the producer
    t.on_delivery(None, Acked(4))  # type: ignore[arg-type]
    assert not t.unreported and t.delivered
