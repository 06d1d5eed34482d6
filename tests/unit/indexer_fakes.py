"""A consumer control for IndexerStage unit tests: no Kafka, every partition already caught up."""

from __future__ import annotations

from pipeline.indexer.stage import IndexerStage


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
