"""Avro single-object encoding: round trips, evolution, and bad bytes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline.errors import PoisonRecord
from pipeline.records import Face, PhotoEvent, PhotoFaces, PrecomputedFace
from pipeline.serde import MARKER, PHOTO_EVENT, PHOTO_FACES, SCHEMA_DIR, SchemaRegistry


@pytest.fixture(scope="module")
def serde() -> SchemaRegistry:
    return SchemaRegistry.load()


def test_photo_event_round_trip(serde: SchemaRegistry) -> None:
    event = PhotoEvent(event_id="E1", photo_id="p1", image_url="https://x/y.jpg",
                       faces=[PrecomputedFace(embedding=[0.5, 0.25], bbox=[1, 2, 3, 4])],
                       source="test", occurred_at=1_700_000_000_000)
    data = serde.encode(PHOTO_EVENT, event.to_avro())
    assert data[:2] == MARKER
    assert PhotoEvent.from_avro(serde.decode(PHOTO_EVENT, data)) == event


def test_faces_round_trip_keeps_float32_embedding(serde: SchemaRegistry) -> None:
    vector = np.random.default_rng(1).normal(size=128).astype(np.float32)
    faces = PhotoFaces(event_id="E1", photo_id="p1", model_id="m", dim=128,
                       faces=[Face(bbox=(1.0, 2.0, 3.0, 4.0), det_score=0.9, embedding=vector,
                                   landmarks=tuple(float(i) for i in range(10)))])
    back = PhotoFaces.from_avro(serde.decode(PHOTO_FACES, serde.encode(PHOTO_FACES, faces.to_avro())))
    assert np.array_equal(back.faces[0].embedding, vector)
    assert back.faces[0].landmarks == faces.faces[0].landmarks


def test_fingerprint_matches_the_spec_example() -> None:
    # CRC-64-AVRO of "int" is the long 0x7275d51a3f395c8f; on the wire it is little-endian
    # (as written on the wire, little-endian).
    import fastavro

    from pipeline.serde import schema_fingerprint

    assert schema_fingerprint(fastavro.parse_schema("int")).hex() == "8f5c393f1ad57572"


def test_old_writer_is_read_by_newer_schema(serde: SchemaRegistry) -> None:
    """A record written before `source`/`occurred_at` existed still decodes, with defaults."""
    current = json.loads((SCHEMA_DIR / "photo_event.avsc").read_text())
    old = copy.deepcopy(current)
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("source", "occurred_at")]
    reader = SchemaRegistry.load()
    old_writer = SchemaRegistry()
    old_writer.add_reader(old)
    reader.add_writer(old)
    data = old_writer.encode(PHOTO_EVENT, {"event_id": "E", "photo_id": "p", "op": "UPSERT",
                                           "image_url": None, "faces": None})
    event = PhotoEvent.from_avro(reader.decode(PHOTO_EVENT, data))
    assert (event.event_id, event.source, event.occurred_at) == ("E", "unknown", 0)


@pytest.mark.parametrize("data,reason", [(b"{\"json\": 1}", "undecodable"),
                                        (MARKER + b"\x00" * 8 + b"x", "unknown_schema"),
                                        (None, "undecodable")])
def test_bad_bytes_are_poison(serde: SchemaRegistry, data: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonRecord) as info:
        serde.decode(PHOTO_EVENT, data)
    assert info.value.reason == reason


def test_truncated_body_is_poison(serde: SchemaRegistry) -> None:
    data = serde.encode(PHOTO_EVENT, PhotoEvent(event_id="E", photo_id="p", image_url="u").to_avro())
    with pytest.raises(PoisonRecord):
        serde.decode(PHOTO_EVENT, data[:12])
