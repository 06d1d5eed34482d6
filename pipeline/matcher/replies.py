"""Request/reply over Kafka for the HTTP bridge (Spring-Kafka compatible headers).

Each bridge instance reads one partition of the reply topic (its own), which
it names in kafka_replyPartition; replies are matched by kafka_correlationId.
One background thread polls both the reply consumer and the producer.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import uuid
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.records import MatchReply, MatchRequest, now_ms
from pipeline.serde import MATCH_REPLY, MATCH_REQUEST, SchemaRegistry
from pipeline.topics import partition_for

logger = logging.getLogger(__name__)


class ReplyTimeout(TimeoutError):
    """No reply arrived in time (the bridge answers 504)."""


class KafkaRequester:
    """Sends match requests and awaits their replies; also publishes records."""

    def __init__(self, producer_conf: dict[str, Any], consumer_conf: dict[str, Any],
                 serde: SchemaRegistry, request_topic: str, request_partitions: int,
                 reply_topic: str, reply_partition: int) -> None:
        self.serde, self.request_topic = serde, request_topic
        self.request_partitions = request_partitions
        self.reply_topic, self.reply_partition = reply_topic, reply_partition
        self.producer = Producer(producer_conf)
        self.consumer = Consumer(consumer_conf)
        self._pending: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[MatchReply]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kafka-replies", daemon=True)

    def start(self) -> None:
        """Assign our reply partition at its current end, then start polling."""
        tp = TopicPartition(self.reply_topic, self.reply_partition)
        _, high = self.consumer.get_watermark_offsets(tp, timeout=10)
        # An explicit start offset (not OFFSET_END resolved later) means no reply
        # to a request sent after start() can be skipped; older ones are filtered.
        self.consumer.assign([TopicPartition(self.reply_topic, self.reply_partition, max(high, 0))])
        self._thread.start()

    def close(self) -> None:
        """Stop polling, flush, close."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.producer.flush(10)
        self.consumer.close()

    async def match(self, event_id: str, embedding: np.ndarray, top_k: int,
                    threshold: float | None, timeout_s: float) -> MatchReply:
        """Send one request and wait for its reply, or raise ReplyTimeout."""
        request_id = uuid.uuid4().hex
        correlation = request_id.encode()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[MatchReply] = loop.create_future()
        with self._lock:
            self._pending[correlation] = (loop, future)
        request = MatchRequest(request_id=request_id, event_id=event_id, embedding=embedding,
                               top_k=top_k, threshold=threshold,
                               deadline_ms=now_ms() + int(timeout_s * 1000))
        headers = [(CORRELATION, correlation), (REPLY_TOPIC, self.reply_topic.encode()),
                   (REPLY_PARTITION, struct.pack(">i", self.reply_partition))]
        try:
            self.producer.produce(self.request_topic, key=event_id.encode(),
                                  value=self.serde.encode(MATCH_REQUEST, request.to_avro()),
                                  partition=partition_for(event_id, self.request_partitions),
                                  headers=headers)
            self.producer.poll(0)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError as exc:
            raise ReplyTimeout(f"no reply for event {event_id} within {timeout_s}s") from exc
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    async def publish(self, topic: str, key: bytes, value: bytes | None) -> tuple[int, int]:
        """Produce and wait for the broker's ack; returns (partition, offset)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                loop.call_soon_threadsafe(_set_exception, future, RuntimeError(str(err)))
            else:
                loop.call_soon_threadsafe(_set_result, future, (msg.partition(), msg.offset()))

        self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        self.producer.poll(0)
        return await future

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0)
            msg = self.consumer.poll(0.05)
            if msg is None:
                continue
            if msg.error():
                logger.warning("reply consumer: %s", msg.error())
                continue
            self._deliver(msg)

    def _deliver(self, msg: Any) -> None:
        headers = dict(msg.headers() or [])
        correlation = headers.get(CORRELATION)
        with self._lock:
            waiter = self._pending.get(correlation) if correlation else None
        if waiter is None:
            return  # a reply for another bridge life or a timed-out request
        try:
            reply = MatchReply.from_avro(self.serde.decode(MATCH_REPLY, msg.value()))
        except Exception as exc:  # undecodable reply: fail that request loudly
            waiter[0].call_soon_threadsafe(_set_exception, waiter[1], exc)
            return
        waiter[0].call_soon_threadsafe(_set_result, waiter[1], reply)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
