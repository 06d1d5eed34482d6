"""Interop with kafka-python publishers, and poison records on the dead-letter topic."""

from __future__ import annotations

import math

from confluent_kafka import Producer

from pipeline.producers.kafka_python_publisher import make_producer, publish_photo_event
from pipeline.records import PhotoEvent, PrecomputedFace
from pipeline.serde import DEAD_LETTER, PHOTO_EVENT, SchemaRegistry
from pipeline.topics import partition_for
from tests.integration.helpers import match, read_topic, unit_vectors, wait_index_size

DIM = 512


def test_kafka_python_publisher_is_consumed(stack) -> None:
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    serde = SchemaRegistry.load()
    vectors = unit_vectors(10, DIM, seed=3)
    producer = make_producer(stack.bootstrap)
    try:
        for i in range(10):
            event = PhotoEvent(event_id="KP", photo_id=f"p{i}", source="kafka-python",
                               faces=[PrecomputedFace(embedding=vectors[i].tolist())])
            metadata = publish_photo_event(producer, stack.topics.photo_events, event, serde).get(timeout=10)
            # kafka-python's partitioner must agree with the services' murmur2.
            assert metadata.partition == partition_for("KP", stack.topics.partitions)
    finally:
        producer.close()
    wait_index_size(base, "KP", vectors[0], 10)
    for i in range(10):
        assert match(base, "KP", vectors[i])[1]["matches"][0]["photo_id"] == f"p{i}"


def test_poison_records_go_to_the_dlq_and_the_pipeline_goes_on(stack) -> None:
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    serde = SchemaRegistry.load()
    good = unit_vectors(1, DIM, seed=5)[0]

    def event(photo_id: str, embedding: list[float] | None, url: str | None = None) -> bytes:
        faces = None if embedding is None else [PrecomputedFace(embedding=embedding)]
        return serde.encode(PHOTO_EVENT, PhotoEvent(event_id="DLQ", photo_id=photo_id, image_url=url,
                                                    faces=faces).to_avro())

    poison = {
        "garbage": (b"not avro at all", "undecodable"),
        "short": (event("short", [0.1] * 7), "invalid_embedding"),
        "nan": (event("nan", [math.nan] + [0.1] * (DIM - 1)), "invalid_embedding"),
        "zeros": (event("zeros", [0.0] * DIM), "invalid_embedding"),
        "nothing": (event("nothing", None), "no_image"),
        "nomodel": (event("nomodel", None, "http://example.invalid/a.jpg"), "no_model"),
    }
    producer = Producer({"bootstrap.servers": stack.bootstrap, "partitioner": "murmur2_random"})
    for value, _ in poison.values():
        producer.produce(stack.topics.photo_events, key=b"DLQ", value=value)
    producer.produce(stack.topics.photo_events, key=b"DLQ", value=event("good", good.tolist()))
    producer.flush(10)

    wait_index_size(base, "DLQ", good, 1)
    assert match(base, "DLQ", good)[1]["matches"][0]["photo_id"] == "good"
    letters = read_topic(stack.bootstrap, stack.topics.dlq, 1, expect=len(poison))
    reasons = sorted(dict(m.headers())["dlq.reason"].decode() for m in letters)
    assert reasons == sorted(r for _, r in poison.values())
    for msg in letters:
        headers = dict(msg.headers())
        envelope = serde.decode(DEAD_LETTER, msg.value())
        assert headers["dlq.source_topic"].decode() == stack.topics.photo_events
        assert int(headers["dlq.source_offset"]) == envelope["source_offset"] >= 0
        assert headers["dlq.error_class"] and headers["dlq.error_message"]
        assert envelope["value"] in {v for v, _ in poison.values()}  # original bytes kept
