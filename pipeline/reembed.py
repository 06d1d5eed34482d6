"""`facematch reembed`: re-embed an event with another model beside the current one, then switch (blue/green).

1. Read the event's photos from the compacted faces topic (each photo's latest
   faces record names its image_url).
2. Publish each photo again as a photo event. Embedders running the new model
   (FACEMATCH_EMBEDDER_MODEL_KEYS=1, their own group) write its faces under
   `event/photo/<model>` keys; the indexer that owns the event builds an index
   of that model beside the answering one (FACEMATCH_INDEXER_EXTRA_MODELS).
3. Wait until the faces topic holds the new model's faces of every photo, then
   publish ACTIVATE_MODEL: the indexer switches the event's queries to the new
   index at that point of the log and drops (and tombstones) the old one.
Queries never mix models: an index holds one model, and a query embedded with
another model gets an error (HTTP 409), never scores. docs/reembed.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.kafka import producer_config
from pipeline.logs import setup_logging
from pipeline.records import PhotoEvent, PhotoFaces, faces_key, now_ms, parse_faces_key_model
from pipeline.restore import read_to_end
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry
from pipeline.settings import KafkaSettings, LogSettings, TopicSettings
from pipeline.topics import partition_count, partition_for

logger = logging.getLogger(__name__)


@dataclass
class EventPhotos:
    """The event's photos on the faces topic: by model, with their image URLs."""

    urls: dict[str, str | None] = field(default_factory=dict)  # photo -> url, of photos not yet in the new model
    done: set[str] = field(default_factory=set)  # photos with faces of the new model
    dim: int = 0  # of the new model, once seen


def event_photos(records: list[tuple[bytes | None, bytes | None]], serde: SchemaRegistry, event_id: str,
                 model_id: str) -> EventPhotos:
    """Fold a faces partition's records into the event's photos (pure)."""
    latest: dict[tuple[str, str | None], PhotoFaces | None] = {}
    for key, value in records:
        event, photo, key_model = parse_faces_key_model(key)
        if event != event_id or photo is None:
            continue
        latest[(photo, key_model)] = None if value is None else PhotoFaces.from_avro(serde.decode(PHOTO_FACES, value))
    found = EventPhotos()
    for (photo, _), faces in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if faces is None:
            continue
        if faces.model_id == model_id:
            found.done.add(photo)
            found.dim = faces.dim
        else:
            found.urls.setdefault(photo, faces.image_url)
    for photo in found.done:
        found.urls.pop(photo, None)
    return found


def main(argv: list[str] | None = None) -> int:
    """Re-embed one event and switch it to the new model."""
    parser = argparse.ArgumentParser(prog="facematch reembed", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--event-id", required=True)
    parser.add_argument("--model-id", required=True, help="the new model's id, as its embedders publish it")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting for the new faces")
    parser.add_argument("--no-activate", action="store_true", help="build the new index, do not switch")
    args = parser.parse_args(argv)
    log = LogSettings()
    setup_logging(log.log_level, log.log_format)
    kafka, topics = KafkaSettings(), TopicSettings()
    serde = SchemaRegistry.load()
    conf = kafka.to_librdkafka()
    from confluent_kafka.admin import AdminClient

    partition = partition_for(args.event_id, partition_count(AdminClient(conf), topics.faces))
    where = (topics.faces, partition)
    restored = read_to_end(conf, [where])[where]
    photos = event_photos(restored.records, serde, args.event_id, args.model_id)
    missing = sorted(p for p, url in photos.urls.items() if not url)
    if missing:
        print(f"{len(missing)} photos have no image_url (faces embedded upstream), e.g. {missing[:5]}: "
              "they cannot be re-embedded here; re-ingest them with the new model's embeddings", file=sys.stderr)
        return 2
    producer = Producer(producer_config(kafka, **{"linger.ms": 5}))
    for photo_id, url in sorted(photos.urls.items()):
        event = PhotoEvent(event_id=args.event_id, photo_id=photo_id, image_url=url, source="reembed")
        producer.produce(topics.photo_events, key=args.event_id.encode(),
                         value=serde.encode(PHOTO_EVENT, event.to_avro()))
        producer.poll(0)
    if producer.flush(30) != 0:
        print("the broker did not take every photo event within 30 s", file=sys.stderr)
        return 1
    logger.info("event %s: %d photos to re-embed with %s, %d already done", args.event_id, len(photos.urls),
                args.model_id, len(photos.done))
    started = time.monotonic()
    waiting = set(photos.urls)
    dim = photos.dim
    if waiting:
        dim = _wait_for_faces(conf, topics.faces, partition, restored.end, serde, args, waiting) or dim
    if waiting:
        print(f"timed out: {len(waiting)} photos still lack {args.model_id} faces, e.g. {sorted(waiting)[:5]}",
              file=sys.stderr)
        return 1
    if args.no_activate or not (photos.urls or photos.done):
        print(json.dumps({"event_id": args.event_id, "model_id": args.model_id, "photos": len(photos.urls),
                          "activated": False}))
        return 0
    switch = PhotoFaces(event_id=args.event_id, photo_id="", model_id=args.model_id, dim=dim, op="ACTIVATE_MODEL",
                        occurred_at=now_ms())
    producer.produce(topics.faces, key=faces_key(args.event_id, None), partition=partition,
                     value=serde.encode(PHOTO_FACES, switch.to_avro()))
    if producer.flush(30) != 0:
        print("the broker did not take the switch within 30 s", file=sys.stderr)
        return 1
    print(json.dumps({"event_id": args.event_id, "model_id": args.model_id, "photos": len(photos.urls),
                      "already": len(photos.done), "activated": True,
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


def _wait_for_faces(conf: dict[str, object], topic: str, partition: int, start: int, serde: SchemaRegistry,
                    args: argparse.Namespace, waiting: set[str]) -> int:
    """Read the faces partition from `start` until every waiting photo has the new model's faces; its dim."""
    consumer = Consumer({**conf, "group.id": f"facematch-reembed-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, partition, start)])
    deadline, dim = time.monotonic() + args.timeout_s, 0
    try:
        while waiting and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None or msg.value() is None:
                continue
            event, photo, key_model = parse_faces_key_model(msg.key())
            if event != args.event_id or key_model != args.model_id or photo is None:
                continue
            dim = PhotoFaces.from_avro(serde.decode(PHOTO_FACES, msg.value())).dim
            waiting.discard(photo)
    finally:
        consumer.close()
    return dim


if __name__ == "__main__":
    sys.exit(main())
