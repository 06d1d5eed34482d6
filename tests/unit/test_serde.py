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


def _v1_writer() -> SchemaRegistry:
    """A publisher still on the first photo-event schema: embeddings only as float arrays."""
    writer = SchemaRegistry()
    writer.add_reader(json.loads((SCHEMA_DIR / "history" / "photo_event.v1.avsc").read_text()))
    return writer


def test_embeddings_are_written_packed_and_read_back_as_the_same_float32(serde: SchemaRegistry) -> None:
    vector = np.random.default_rng(2).normal(size=128).astype(np.float32)
    event = PhotoEvent(event_id="E", photo_id="p", faces=[PrecomputedFace(embedding=vector.tolist())])
    written = event.to_avro()["faces"][0]
    assert written["embedding"] == [] and written["embedding_f32"] == vector.astype("<f4").tobytes()
    back = PhotoEvent.from_avro(serde.decode(PHOTO_EVENT, serde.encode(PHOTO_EVENT, event.to_avro())))
    assert back.faces is not None
    assert np.array_equal(back.faces[0].embedding, vector)


def test_a_float_array_from_a_v1_publisher_still_reads(serde: SchemaRegistry) -> None:
    data = _v1_writer().encode(PHOTO_EVENT, {
        "event_id": "E", "photo_id": "p", "op": "UPSERT", "image_url": None, "source": "old", "occurred_at": 5,
        "faces": [{"embedding": [0.5, 0.25, 1.0], "bbox": [1.0, 2.0, 3.0, 4.0], "det_score": 0.75}]})
    assert data[2:10] != serde.reader_prints[PHOTO_EVENT]  # really another writer schema
    event = PhotoEvent.from_avro(serde.decode(PHOTO_EVENT, data))
    assert event.faces == [PrecomputedFace(embedding=[0.5, 0.25, 1.0], bbox=[1.0, 2.0, 3.0, 4.0], det_score=0.75)]


@pytest.mark.parametrize("face,message", [
    ({"embedding": [1.0], "embedding_f32": b"\x00\x00\x80\x3f", "bbox": None, "det_score": 1.0}, "not both"),
    ({"embedding": [], "embedding_f32": b"\x00\x00\x80", "bbox": None, "det_score": 1.0}, "multiple of 4"),
])
def test_a_face_with_both_or_broken_packed_embeddings_is_poison(serde: SchemaRegistry, face: dict[str, object],
                                                                message: str) -> None:
    data = serde.encode(PHOTO_EVENT, {"event_id": "E", "photo_id": "p", "op": "UPSERT", "image_url": None,
                                      "faces": [face], "source": "t", "occurred_at": 1})
    with pytest.raises(PoisonRecord) as info:
        PhotoEvent.from_avro(serde.decode(PHOTO_EVENT, data))
    assert info.value.reason == "invalid_embedding" and message in str(info.value)
