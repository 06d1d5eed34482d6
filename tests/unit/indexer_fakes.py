"""A consumer control for IndexerStage unit tests: no Kafka, every partition already caught up."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.indexer.stage import IndexerStage
from pipeline.restore import TP, Restored


class CaughtUp:
    """A consumer whose high watermark is whatever the stage has applied."""

    def __init__(self, stage: IndexerStage) -> None:
        self.stage = stage

    def pause(self, topic: str, partition: int) -> None:
        pass

    def resume(self, topic: str, partition: int) -> None:
        pass

    def high_watermark(self, topic: str, partition: int) -> int:
        state = self.stage.core.partitions.get(partition)
        return state.next_offset if state else 0


def nothing_to_restore(partitions: Sequence[TP]) -> dict[TP, Restored]:
    """A restore reader for partitions whose guests and notifications topics are empty."""
    return {tp: Restored() for tp in partitions}
