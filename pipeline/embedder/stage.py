"""The embedder's runner adapter: Avro photo events in, faces records out, around EmbedderCore."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline.embedder.core import EmbedderCore, Tombstone
from pipeline.errors import PoisonRecord
from pipeline.kafka import Output
from pipeline.metrics import Metrics
from pipeline.records import PhotoEvent, faces_key
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry
from pipeline.stage_api import BaseStage, Incoming, Outcome
from pipeline.topics import partition_for

logger = logging.getLogger(__name__)


class EmbedderStage(BaseStage):
    """Decode photo events, run the core, encode faces records."""

    name = "embedder"

    def __init__(self, core: EmbedderCore, serde: SchemaRegistry, faces_topic: str,
                 faces_partitions: int, metrics: Metrics, model_keys: bool = False) -> None:
        self.core, self.serde, self.metrics = core, serde, metrics
        self.faces_topic, self.faces_partitions = faces_topic, faces_partitions
        # Keys end in /<model id> (beside another model's faces while events are re-embedded).
        self.key_model = core.spec.model_id if model_keys else None

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per record: faces output(s) or the error."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        events, positions = [], []
        for i, item in enumerate(batch):
            try:
                events.append(PhotoEvent.from_avro(self.serde.decode(PHOTO_EVENT, item.value)))
                positions.append(i)
            except PoisonRecord as exc:
                outcomes[i] = exc
        self.core.last_fetch_s = self.core.last_model_s = 0.0
        results = self.core.process(events)
        for reason, count in self.core.last_rejected.items():
            self.metrics.faces_rejected.labels(reason).inc(count)
        if self.core.last_model_s:
            self.metrics.fetch_seconds.observe(self.core.last_fetch_s)
            self.metrics.embed_seconds.observe(self.core.last_model_s)
            logger.debug("batch of %d: fetch+decode %.0f ms, model %.0f ms", len(events),
                         self.core.last_fetch_s * 1000, self.core.last_model_s * 1000)
        for i, result in zip(positions, results, strict=True):
            outcomes[i] = result if isinstance(result, BaseException) else [self._output(result)]
        filled = [o for o in outcomes if o is not None]
        if len(filled) != len(outcomes):  # the runner dead-letters the batch record by record
            raise RuntimeError(f"{len(outcomes) - len(filled)} records got no outcome")
        return filled

    def _output(self, change: object) -> Output:
        # The key names the photo (compaction), the partition comes from
        # event_id alone, so an event's faces and queries share a partition.
        if isinstance(change, Tombstone):
            return Output(self.faces_topic, faces_key(change.event_id, change.photo_id, self.key_model), None,
                          partition_for(change.event_id, self.faces_partitions))
        value = self.serde.encode(PHOTO_FACES, change.to_avro())  # type: ignore[attr-defined]
        self.metrics.faces_embedded.inc(len(change.faces))  # type: ignore[attr-defined]
        return Output(self.faces_topic,
                      faces_key(change.event_id, change.photo_id or None, self.key_model),  # type: ignore[attr-defined]
                      value, partition_for(change.event_id, self.faces_partitions))  # type: ignore[attr-defined]
