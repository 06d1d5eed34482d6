"""Direct queries: the bridge asks the indexer that owns an event's partition over TCP.

Kafka request/reply costs two broker hops per match (on Tansu each hop waits out
the fetch wait). Like Kafka Streams' interactive queries, the bridge can instead
ask the owner of the partition directly: the owner's address arrives in a header
of every reply it sends through Kafka, so no directory is needed. The Kafka path
stays the source of truth: the first query of a partition, any query the owner
refuses (revoked, still replaying, not polling) and any connection failure go
through it, and its replies teach the current owner.

Wire format, both ways: a 4-byte big-endian length, then the payload. A request
is a match-request record (Avro single-object bytes); a reply is a match-reply
record, or an empty payload for "not mine: use Kafka".
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

ADDRESS_HEADER = "facematch_queryAddress"  # host:port of the indexer that sent a reply
FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1024 * 1024  # a 512-d request is ~2 KB; a reply with top_k 1000 well under this
NOT_MINE = b""


class FrameError(ValueError):
    """A frame longer than MAX_FRAME_BYTES or a bad address."""


def frame(payload: bytes) -> bytes:
    """Length-prefixed payload."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return FRAME_HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """The payload length a 4-byte frame header announces; FrameError past the cap."""
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return int(length)


def parse_address(address: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) -> (host, port); FrameError when malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FrameError(f"not a host:port address: {address!r}")
    return host, int(port)


@dataclass
class Routes:
    """Which indexer answers each request partition, as the last Kafka reply from it said.

    An address that failed (refused the connection, timed out) is skipped for
    `backoff_s`: queries of its partitions go through Kafka, whose replies name
    the owner again. Thread-safe: replies are learnt on the reply thread, looked
    up on the event loops.
    """

    backoff_s: float = 5.0
    _owner: dict[int, str] = field(default_factory=dict)
    _failed_at: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def learn(self, partition: int, address: str) -> None:
        """A reply for `partition` came from `address` (a new address is tried at once)."""
        with self._lock:
            self._owner[partition] = address

    def lookup(self, partition: int, now: float | None = None) -> str | None:
        """The address to ask for `partition`, or None (unknown, or failed within backoff_s)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            address = self._owner.get(partition)
            if address is None:
                return None
            failed = self._failed_at.get(address)
            if failed is not None and now - failed < self.backoff_s:
                return None
            return address

    def refused(self, partition: int, address: str) -> None:
        """The owner we knew says the partition is no longer its own (or not yet caught up)."""
        with self._lock:
            if self._owner.get(partition) == address:
                del self._owner[partition]

    def failed(self, address: str, now: float | None = None) -> None:
        """`address` could not be reached or did not answer in time: skip it for a while."""
        now = time.monotonic() if now is None else now
        with self._lock:
            # Indexers come and go with new addresses: forget failures past their backoff.
            self._failed_at = {a: t for a, t in self._failed_at.items() if now - t < self.backoff_s}
            self._failed_at[address] = now

    def failures(self) -> dict[str, float]:
        """A copy of address -> when it last failed, for those still within or just past their backoff."""
        with self._lock:
            return dict(self._failed_at)

    def known(self) -> dict[int, str]:
        """A copy of partition -> address (for /health)."""
        with self._lock:
            return dict(self._owner)
