"""The bridge's side of direct queries (pipeline/direct.py): ask the owner, or say "use Kafka".

Connections are kept open per indexer address, one query at a time on each
(a connection is returned to the pool only after its reply was read whole, so
a cancelled request never leaves a reply behind for the next one). Any failure
returns None: the caller sends the query through Kafka, which always works.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pipeline.direct import FRAME_HEADER, NOT_MINE, FrameError, Routes, frame, frame_length, parse_address
from pipeline.errors import PoisonRecord
from pipeline.records import MatchReply
from pipeline.serde import MATCH_REPLY, SchemaRegistry

logger = logging.getLogger(__name__)

IDLE_PER_ADDRESS = 16  # open connections kept per indexer (one per concurrent query)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class DirectQueries:
    """Sends match requests straight to the owning indexer; one instance per event loop."""

    def __init__(self, serde: SchemaRegistry, routes: Routes, timeout_s: float, metrics: Any = None) -> None:
        self.serde, self.routes, self.timeout_s, self.metrics = serde, routes, timeout_s, metrics
        self._idle: dict[str, list[Connection]] = {}

    async def ask(self, partition: int, request_id: str, payload: bytes, timeout_s: float) -> MatchReply | None:
        """The owner's reply to `payload`, or None: unknown owner, refused, unreachable or late."""
        address = self.routes.lookup(partition)
        if address is None:
            return None
        try:
            answer = await asyncio.wait_for(self._exchange(address, payload), min(timeout_s, self.timeout_s))
        except (OSError, FrameError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            logger.info("direct query to %s failed (%r): through Kafka for %.0f s", address, exc,
                        self.routes.backoff_s)
            self.routes.failed(address)
            self._count("failed")
            return None
        if answer == NOT_MINE:
            self.routes.refused(partition, address)
            self._count("not_mine")
            return None
        try:
            reply = MatchReply.from_avro(self.serde.decode(MATCH_REPLY, answer))
        except PoisonRecord as exc:
            logger.warning("direct reply from %s undecodable: %s", address, exc)
            self.routes.failed(address)
            self._count("failed")
            return None
        if reply.request_id != request_id:  # never another query's answer
            logger.error("direct reply from %s is for request %s, not %s", address, reply.request_id, request_id)
            self.routes.failed(address)
            self._count("failed")
            return None
        self._count("answered")
        return reply

    async def _exchange(self, address: str, payload: bytes) -> bytes:
        connection = self._pooled(address)
        if connection is not None:
            try:
                return await self._send(address, connection, payload)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the indexer closed it (restarted, say): once more on a new connection
        host, port = parse_address(address)
        return await self._send(address, await asyncio.open_connection(host, port), payload)

    async def _send(self, address: str, connection: Connection, payload: bytes) -> bytes:
        reader, writer = connection
        try:
            writer.write(frame(payload))
            await writer.drain()
            header = await reader.readexactly(FRAME_HEADER.size)
            answer = await reader.readexactly(frame_length(header))
        except BaseException:  # includes cancellation: the stream may hold half a reply
            writer.close()
            raise
        idle = self._idle.setdefault(address, [])
        if len(idle) < IDLE_PER_ADDRESS:
            idle.append(connection)
        else:
            writer.close()
        return answer

    def _pooled(self, address: str) -> Connection | None:
        idle = self._idle.get(address)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for _, writer in idle:
                writer.close()
        self._idle.clear()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.direct_queries.labels(outcome).inc()
