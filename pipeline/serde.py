"""Avro single-object encoding for every record on our topics.

Wire format (Avro spec, "Single object encoding"): the 2-byte marker C3 01,
the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
Parsing Canonical Form, then the Avro binary body. Any language can decode it,
and the reader learns which schema wrote it, so old records stay readable
after the schema evolves (schema resolution against the reader schema).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pipeline.errors import PoisonRecord

MARKER = b"\xc3\x01"
HEADER_LEN = 10
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

PHOTO_EVENT = "io.facematch.v1.PhotoEvent"
PHOTO_FACES = "io.facematch.v1.PhotoFaces"
MATCH_REQUEST = "io.facematch.v1.MatchRequest"
MATCH_REPLY = "io.facematch.v1.MatchReply"
DEAD_LETTER = "io.facematch.v1.DeadLetter"
GUEST = "io.facematch.v1.Guest"
MATCH_NOTIFICATION = "io.facematch.v1.MatchNotification"


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the Parsing Canonical Form, little-endian, as on the wire."""
    hex_digest = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    return bytes.fromhex(hex_digest)  # fastavro already gives the little-endian wire order


@dataclass
class SchemaRegistry:
    """Reader schemas by full name, and every known writer schema by fingerprint."""

    readers: dict[str, dict[str, Any]] = field(default_factory=dict)
    writers: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    reader_prints: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, schema_dir: Path = SCHEMA_DIR) -> SchemaRegistry:
        """Parse every .avsc in the folder once (history/ holds older writers)."""
        registry = cls()
        for path in sorted(schema_dir.glob("*.avsc")):
            registry.add_reader(json.loads(path.read_text()))
        for path in sorted(schema_dir.glob("history/*.avsc")):
            registry.add_writer(json.loads(path.read_text()))
        return registry

    def add_reader(self, schema: dict[str, Any]) -> None:
        """Register a current schema: used to write, and to read any known writer."""
        parsed = fastavro.parse_schema(schema, _write_hint=False)
        name = parsed["name"]
        self.readers[name] = parsed
        self.reader_prints[name] = self.add_writer(schema)

    def add_writer(self, schema: dict[str, Any]) -> bytes:
        """Register a schema that may have written records still on a topic."""
        parsed = fastavro.parse_schema(schema, _write_hint=False)
        print_ = schema_fingerprint(parsed)
        self.writers[print_] = parsed
        return print_

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        """Encode with the current schema of `name`."""
        schema = self.readers[name]
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(self.reader_prints[name])
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def decode(self, name: str, data: bytes | None) -> dict[str, Any]:
        """Decode any known writer version into the current schema of `name`."""
        if data is None:
            raise PoisonRecord("undecodable", f"expected a {name} record, got a null value")
        if len(data) < HEADER_LEN or data[:2] != MARKER:
            raise PoisonRecord("undecodable",
                               f"not Avro single-object encoded (first bytes {data[:4]!r})")
        writer = self.writers.get(data[2:HEADER_LEN])
        if writer is None:
            raise PoisonRecord("unknown_schema",
                               f"unknown writer schema fingerprint {data[2:HEADER_LEN].hex()}")
        try:
            record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer,
                                                                self.readers[name])
            return record
        except Exception as exc:  # fastavro raises many kinds on bad bytes
            raise PoisonRecord("undecodable", f"cannot decode {name}: {exc!r}") from exc
