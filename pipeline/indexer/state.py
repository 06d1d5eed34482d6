"""Per-partition index state and its snapshots.

A snapshot holds every event index of one faces partition plus the faces
offset it covers (the next offset to read). It is written to a temp file and
renamed, so a crash leaves either the old snapshot or the new one, never half.

Deletes are recorded too (event id or photo key -> offset of the delete), so
a faces record older than a delete this state has seen is never applied again.
A snapshot also says when it was written: one older than the faces topic's
tombstone retention may predate tombstones the broker has since purged, so it
is ignored and the partition is replayed from the beginning instead.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.indexer.event_index import EventIndex, dumps_meta, loads_meta
from pipeline.indexer.guests import EventGuests
from pipeline.indexer.promotion import IndexOptions

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 3
# Version 1 had no delete ledger and no saved_at_ms; 1 and 2 kept per-face metadata in the
# JSON header; 3 keeps it in arrays beside the index (`event_<i>_<name>`).
READABLE_VERSIONS = (1, 2, 3)


def photo_key(event_id: str, photo_id: str) -> str:
    """The delete ledger's key of a photo (the faces topic's key, as text)."""
    return f"{event_id}/{photo_id}"


@dataclass
class PartitionState:
    """The indexes of the events living on one faces partition."""

    partition: int
    events: dict[str, EventIndex] = field(default_factory=dict)
    deleted_events: dict[str, int] = field(default_factory=dict)  # event_id -> offset of its DELETE_EVENT
    deleted_photos: dict[str, int] = field(default_factory=dict)  # photo_key -> offset of its tombstone
    # Photos an event delete erased whose tombstones have not come back through the
    # faces topic yet. Never snapshotted: no snapshot is written while any are pending.
    pending_tombstones: dict[str, set[str]] = field(default_factory=dict)
    # Enrolled guests, exclusions and what was pushed: rebuilt from the guests and
    # match-notifications topics on assignment, never snapshotted.
    guests: dict[str, EventGuests] = field(default_factory=dict)
    # Re-embedding: an event's index of another model, built beside the one that answers until
    # ACTIVATE_MODEL swaps them; and the models an event switched away from (their records are dropped).
    staged: dict[str, EventIndex] = field(default_factory=dict)
    retired: dict[str, list[str]] = field(default_factory=dict)
    next_offset: int = 0  # next faces offset to apply; snapshot covers [0, next_offset)
    last_applied: int = -1
    dirty_records: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)

    @property
    def faces(self) -> int:
        """Faces across the partition's events."""
        return sum(index.size for index in self.events.values())

    def superseded(self, offset: int, event_id: str, photo_id: str) -> bool:
        """True if a delete at a later offset already erased this photo or its event."""
        return (offset < self.deleted_events.get(event_id, -1)
                or offset < self.deleted_photos.get(photo_key(event_id, photo_id), -1))


def snapshot_path(state_dir: Path, topic: str, partition: int) -> Path:
    """Where the snapshot of one partition lives."""
    return state_dir / topic / f"partition-{partition:04d}.npz"


def save_snapshot(state: PartitionState, path: Path) -> None:
    """Write atomically (temp file + rename + fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    events_meta = []
    indexes = [(e, i, False) for e, i in sorted(state.events.items())]
    indexes += [(e, i, True) for e, i in sorted(state.staged.items())]
    for i, (event_id, index, staged) in enumerate(indexes):
        blob, meta = index.to_snapshot()
        meta["staged"] = staged
        arrays[f"index_{i}"] = blob
        for name, array in meta.pop("arrays", {}).items():
            arrays[f"event_{i}_{name}"] = array
            meta.setdefault("array_names", []).append(name)
        events_meta.append({"event_id": event_id, **meta})
    header = {"version": SNAPSHOT_VERSION, "partition": state.partition,
              "next_offset": state.next_offset, "last_applied": state.last_applied,
              "saved_at_ms": int(time.time() * 1000), "events": events_meta,
              "deleted_events": state.deleted_events, "deleted_photos": state.deleted_photos,
              "retired": state.retired}
    arrays["header"] = dumps_meta(header)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    state.dirty_records = 0
    state.last_snapshot = time.monotonic()


def load_snapshot(path: Path, partition: int, dim: int, model_id: str | None = None,
                  max_age_s: float | None = None, options: IndexOptions | None = None,
                  accepted: dict[str, int] | None = None) -> PartitionState | None:
    """The saved state, or None if absent/unreadable/too old/for another model (then replay).

    `options` set how the loaded events grow (promotion to an approximate index);
    `accepted` (model id -> dim) are the models served, by default `model_id` alone.
    """
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            header = loads_meta(data["header"])
            if header.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"snapshot version {header.get('version')}")
            _check_age(header, path, max_age_s)
            events: dict[str, EventIndex] = {}
            staged: dict[str, EventIndex] = {}
            known = accepted if accepted else ({model_id: dim} if model_id is not None else None)
            for i, meta in enumerate(header["events"]):
                if known is not None and meta["model_id"] not in known:
                    raise ValueError(f"snapshot model {meta['model_id']} is not served ({sorted(known)})")
                if int(meta["dim"]) != (known[meta["model_id"]] if known is not None else dim):
                    raise ValueError(f"snapshot dim {meta['dim']} != model dim")
                names = meta.pop("array_names", None)
                if names is not None:
                    meta["arrays"] = {name: data[f"event_{i}_{name}"] for name in names}
                into = staged if meta.get("staged") else events
                into[meta["event_id"]] = EventIndex.from_snapshot(data[f"index_{i}"], meta, options)
    except Exception as exc:  # a bad snapshot only costs a replay
        logger.warning("ignoring snapshot %s (%s); replaying the faces topic", path, exc)
        return None
    return PartitionState(partition=partition, events=events, staged=staged,
                          retired={str(k): [str(m) for m in v] for k, v in header.get("retired", {}).items()},
                          deleted_events={str(k): int(v) for k, v in header.get("deleted_events", {}).items()},
                          deleted_photos={str(k): int(v) for k, v in header.get("deleted_photos", {}).items()},
                          next_offset=int(header["next_offset"]),
                          last_applied=int(header["last_applied"]))


def _check_age(header: dict[str, Any], path: Path, max_age_s: float | None) -> None:
    if max_age_s is None:
        return
    # Version 1 did not record when it was written; the file's mtime is the next best.
    saved_at_s = header["saved_at_ms"] / 1000 if "saved_at_ms" in header else path.stat().st_mtime
    age_s = time.time() - saved_at_s
    if age_s > max_age_s:
        raise ValueError(f"snapshot is {age_s:.0f}s old, over {max_age_s:.0f}s: tombstones it "
                         "has not seen may be purged from the faces topic")


TORN_TEMP_AGE_S = 600.0  # far longer than any snapshot write


def remove_stale_snapshots(directory: Path, keep: set[Path], max_age_s: float) -> list[Path]:
    """Delete snapshot files not in `keep` older than max_age_s (they could only be ignored).

    They hold faces of partitions this indexer no longer owns, deleted or not:
    removing them bounds how long erased faces linger on an indexer's volume.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for path in directory.glob("partition-*.npz"):
        try:
            if path not in keep and now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    # A write cut off by a crash leaves its temp file behind; it may hold erased faces too.
    # Only another process's, or one idle for a while, is torn (this process may be writing it).
    for path in directory.glob("partition-*.tmp*"):
        try:
            own = path.suffix == f".tmp{os.getpid()}"
            if not own or now - path.stat().st_mtime > TORN_TEMP_AGE_S:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed
