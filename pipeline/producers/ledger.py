"""The producers' checkpoint: what each photo looked like when it was last published.

One JSON-lines file per deployment: a header, then one line per photo
(`{"k": path, "f": fingerprint, "t": update_ms}`), a removal line
(`{"k": path, "d": 1}`) or a metadata line (`{"m": name, "v": value}`). Commits
append and fsync, so a checkpoint costs the size of the batch, not of the
ledger; the file is rewritten atomically (temp file, fsync, rename) on open
and whenever the journal has grown to twice the live entries. A torn last
line after a crash is dropped: those photos are republished (at-least-once).

An exclusive lock makes one process the owner: the listener, bulk ingest
and the poll worker may share a ledger, one at a time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

HEADER = {"facematch_ledger": 1}
MIN_COMPACT_LINES = 10_000


class LedgerLocked(RuntimeError):
    """Another process owns this state file."""


@dataclass(frozen=True)
class Entry:
    """A photo as last published (or dead-lettered): its fingerprint and update time."""

    fingerprint: str
    update_ms: int = 0


class Ledger:
    """Per-photo fingerprints, durable once commit() returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, Entry] = {}
        self.meta: dict[str, Any] = {}
        self._journal_lines = 0
        self._file: IO[str] | None = None
        self._lock: IO[str] | None = None

    @classmethod
    def open(cls, path: Path) -> Ledger:
        """Lock, load and compact the state file (created if missing)."""
        ledger = cls(path)
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        ledger._acquire_lock()
        if ledger.path.exists():
            ledger._load()
        ledger._compact()
        logger.info("ledger %s: %d photos", ledger.path, len(ledger.entries))
        return ledger

    def _acquire_lock(self) -> None:
        self._lock = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise LedgerLocked(f"state file {self.path} is in use by another process") from exc

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    # Only a crash mid-append leaves a bad line, and only the last.
                    logger.warning("ledger %s: ignoring unreadable line %d", self.path, number)

    def _apply(self, record: dict[str, Any]) -> None:
        if "m" in record:
            self.meta[record["m"]] = record["v"]
        elif record.get("d"):
            self.entries.pop(record["k"], None)
        elif "k" in record:
            self.entries[record["k"]] = Entry(str(record["f"]), int(record.get("t", 0)))

    def get(self, key: str) -> Entry | None:
        """The entry of a document path, if it was ever committed."""
        return self.entries.get(key)

    def paths(self) -> Iterator[str]:
        """Every document path in the ledger."""
        return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def commit(self, updates: dict[str, Entry | None], meta: dict[str, Any] | None = None) -> None:
        """Durably record entries (None removes one) and metadata; returns after fsync."""
        if not updates and not meta:
            return
        lines = [_entry_line(key, entry) for key, entry in updates.items()]
        lines += [json.dumps({"m": name, "v": value}) for name, value in (meta or {}).items()]
        if self._file is None:
            raise RuntimeError("ledger is closed")
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        for key, entry in updates.items():
            if entry is None:
                self.entries.pop(key, None)
            else:
                self.entries[key] = entry
        self.meta.update(meta or {})
        self._journal_lines += len(lines)
        if self._journal_lines > max(MIN_COMPACT_LINES, 2 * len(self.entries)):
            self._compact()

    def _compact(self) -> None:
        if self._file is not None:
            self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(HEADER) + "\n")
            f.writelines(_entry_line(k, e) + "\n" for k, e in self.entries.items())
            f.writelines(json.dumps({"m": k, "v": v}) + "\n" for k, v in self.meta.items())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._journal_lines = len(self.entries) + len(self.meta)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Close the journal and release the lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _entry_line(key: str, entry: Entry | None) -> str:
    if entry is None:
        return json.dumps({"k": key, "d": 1})
    return json.dumps({"k": key, "f": entry.fingerprint, "t": entry.update_ms})


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

