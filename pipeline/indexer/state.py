"""Per-partition index state and its snapshots.

A snapshot holds every event index of one faces partition plus the faces
offset it covers (the next offset to read). It is written to a temp file and
renamed, so a crash leaves either the old snapshot or the new one, never half.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.indexer.event_index import EventIndex, dumps_meta, loads_meta

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1


@dataclass
class PartitionState:
    """The indexes of the events living on one faces partition."""

    partition: int
    events: dict[str, EventIndex] = field(default_factory=dict)
    next_offset: int = 0  # next faces offset to apply; snapshot covers [0, next_offset)
    last_applied: int = -1
    dirty_records: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)

    @property
    def faces(self) -> int:
        """Faces across the partition's events."""
        return sum(index.size for index in self.events.values())


def snapshot_path(state_dir: Path, topic: str, partition: int) -> Path:
    """Where the snapshot of one partition lives."""
    return state_dir / topic / f"partition-{partition:04d}.npz"


def save_snapshot(state: PartitionState, path: Path) -> None:
    """Write atomically (temp file + rename + fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    events_meta = []
    for i, (event_id, index) in enumerate(sorted(state.events.items())):
        blob, meta = index.to_snapshot()
        arrays[f"index_{i}"] = blob
        events_meta.append({"event_id": event_id, **meta})
    header = {"version": SNAPSHOT_VERSION, "partition": state.partition,
              "next_offset": state.next_offset, "last_applied": state.last_applied,
              "events": events_meta}
    arrays["header"] = dumps_meta(header)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    state.dirty_records = 0
    state.last_snapshot = time.monotonic()


def load_snapshot(path: Path, partition: int, dim: int) -> PartitionState | None:
    """The saved state, or None if absent/unreadable/for another model (then replay)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            header = loads_meta(data["header"])
            if header.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {header.get('version')}")
            events = {}
            for i, meta in enumerate(header["events"]):
                if int(meta["dim"]) != dim:
                    raise ValueError(f"snapshot dim {meta['dim']} != model dim {dim}")
                events[meta["event_id"]] = EventIndex.from_snapshot(data[f"index_{i}"], meta)
    except Exception as exc:  # a bad snapshot only costs a replay
        logger.warning("ignoring snapshot %s (%s); replaying the faces topic", path, exc)
        return None
    return PartitionState(partition=partition, events=events,
                          next_offset=int(header["next_offset"]),
                          last_applied=int(header["last_applied"]))
