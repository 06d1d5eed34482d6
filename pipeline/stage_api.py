"""What a stage sees of the runner: records in, outcomes out, a few consumer controls.

Stage adapters (each stage's `stage.py`) import from here; only the runner
touches Kafka objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.kafka import Output

__all__ = ["BaseStage", "Control", "Incoming", "Outcome", "Output", "Stage", "StageContractError"]


@dataclass(frozen=True)
class Incoming:
    """A consumed record, without Kafka objects."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = 0


Outcome = list[Output] | BaseException


class StageContractError(Exception):
    """The stage returned a wrong number of outcomes for a single record."""

    reason = "stage_contract"


class Control(Protocol):
    """What a stage may ask of the consumer, between batches."""

    def pause(self, topic: str, partition: int) -> None: ...
    def resume(self, topic: str, partition: int) -> None: ...
    def high_watermark(self, topic: str, partition: int) -> int: ...


class Stage(Protocol):
    """A stage adapter: decodes, calls its pure core, encodes outputs."""

    name: str
    # Topics whose record values hold biometric data (selfie embeddings): their dead
    # letters keep the facts and the key, never the value.
    sensitive_topics: frozenset[str]

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per record, in order: outputs, or the exception it raised."""
        ...

    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """Called on assignment; returns start offsets to override (e.g. snapshots)."""
        ...

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Called once the assignment is in effect (pausing works from here)."""
        ...

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Called before partitions go away (snapshot, drop state)."""
        ...

    def after_batch(self, control: Control) -> None:
        """Periodic work between batches (snapshots, resuming caught-up partitions)."""
        ...

    def close(self) -> None:
        """Final flush of the stage's own state on graceful stop."""
        ...


class BaseStage:
    """No-op hooks, so a stateless stage only writes `handle`."""

    name = "stage"
    sensitive_topics: frozenset[str] = frozenset()

    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """No start offsets to override."""
        return {}

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Nothing to pause."""

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """No state to drop."""

    def after_batch(self, control: Control) -> None:
        """No periodic work."""

    def close(self) -> None:
        """No state to flush."""
