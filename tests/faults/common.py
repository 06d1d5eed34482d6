"""Shared pieces of the fault suite: a photo corpus, tolerant ingest, the exactly-once check.

Sizes scale with FACEMATCH_FAULT_PHOTOS (default 300; `make soak` uses 10000).
Every wait polls state against a deadline; deadlines grow with the corpus.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.stack import ServiceProcess
from tests.integration.helpers import http, match, unit_vectors, wait_for

DIM = 512
EVENTS = 20
PHOTOS = int(os.environ.get("FACEMATCH_FAULT_PHOTOS", "300"))
RETRYABLE = {502, 503, 504}


def scaled(base_s: float, per_photo_s: float = 0.02) -> float:
    """A deadline that grows with the corpus (CI runs on 2 busy cores)."""
    return base_s + per_photo_s * PHOTOS


def budget_s(base_s: float) -> float:
    """pytest-timeout budget for one fault test at this corpus size."""
    return base_s + 0.3 * PHOTOS


@dataclass
class Corpus:
    """N photos with one unique random unit face each, spread round-robin over EVENTS events."""

    photos: int
    seed: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6].upper())

    def __post_init__(self) -> None:
        self.vectors = unit_vectors(self.photos, DIM, self.seed)
        self.events = [f"F{self.tag}E{j:02d}" for j in range(EVENTS)]

    def event(self, i: int) -> str:
        """The event photo i belongs to."""
        return self.events[i % EVENTS]

    def photo_id(self, i: int) -> str:
        """Photo i's id (its event is in it, for readable failures)."""
        return f"{self.event(i)}-p{i}"

    def body(self, i: int) -> dict[str, Any]:
        """The POST /api/v2/ingest body of photo i."""
        return {"event_id": self.event(i), "photo_id": self.photo_id(i), "embedding": self.vectors[i].tolist()}

    def of_event(self, event: str, among: Iterable[int] | None = None) -> list[int]:
        """Photo indices of one event."""
        j = self.events.index(event)
        return [i for i in (range(self.photos) if among is None else among) if i % EVENTS == j]


def call(method: str, url: str, body: Any = None, timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
    """Like helpers.http, but a refused/reset connection or a timeout is status 0, not an exception."""
    try:
        return http(method, url, body, timeout_s=timeout_s)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, {"error": f"{type(exc).__name__}: {exc}"}


def ingest(base: Callable[[], str] | str, corpus: Corpus, indices: Sequence[int], workers: int = 4,
           on_done: Callable[[int, int], None] | None = None) -> list[int]:
    """POST each photo once (concurrently); returns the indices not accepted (5xx, connection errors)."""
    def one(i: int) -> int | None:
        url = base() if callable(base) else base
        status, answer = call("POST", f"{url}/api/v2/ingest", corpus.body(i))
        if on_done is not None:
            on_done(i, status)
        if status == 202:
            return None
        assert status == 0 or status in RETRYABLE, f"photo {i}: non-retryable {status} {answer}"
        return i
    with ThreadPoolExecutor(workers) as pool:
        return [i for i in pool.map(one, indices) if i is not None]


def ingest_until_accepted(base: str, corpus: Corpus, indices: Sequence[int], timeout_s: float) -> int:
    """What a client does: retry refused photos until each is accepted; returns the retry count."""
    pending, retries = list(indices), 0
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} photos still refused after {timeout_s}s"
        retries += len(pending)
        pending = ingest(base, corpus, pending)
        if pending:
            time.sleep(0.5)
    return retries


@dataclass
class Verdict:
    """The exactly-once check's counts."""

    ingested: int
    events: int
    lost: int = 0
    duplicates: int = 0
    wrong_top: int = 0
    low_score: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing missing, nothing twice, every photo finds itself."""
        return not (self.lost or self.duplicates or self.wrong_top or self.low_score)

    def line(self) -> str:
        """One printable summary."""
        return (f"photos ingested={self.ingested} events={self.events} lost={self.lost} "
                f"duplicates={self.duplicates} wrong_top={self.wrong_top} low_score={self.low_score}")


def event_sizes(base: str, corpus: Corpus, expected: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(index_size, photos_indexed) per event, for events that answered 200."""
    sizes = {}
    for event in expected:
        probe = corpus.vectors[corpus.of_event(event)[0]]
        status, body = call("POST", f"{base}/api/v2/match", {"event_id": event, "user_embedding": probe.tolist(),
                                                            "top_k": 1, "threshold": 0.5})
        if status == 200:
            sizes[event] = (int(body["index_size"]), int(body["photos_indexed"]))
    return sizes


def verify_exactly_once(base: str, corpus: Corpus, indices: Sequence[int] | None = None,
                        timeout_s: float | None = None) -> Verdict:
    """Per event index_size == faces ingested; each photo's own embedding is its top match, score > 0.99."""
    indices = list(range(corpus.photos)) if indices is None else list(indices)
    expected = {e: len(corpus.of_event(e, indices)) for e in corpus.events}
    expected = {e: n for e, n in expected.items() if n}
    verdict = Verdict(ingested=len(indices), events=len(expected))
    last: dict[str, tuple[int, int]] = {}

    def settled() -> bool:
        last.update(event_sizes(base, corpus, expected))
        over = any(last.get(e, (0, 0))[0] > n for e, n in expected.items())
        return over or all(last.get(e, (0, 0)) == (n, n) for e, n in expected.items())
    budget = timeout_s or scaled(90)
    deadline = time.monotonic() + 2 * budget  # sizes, then own matches: bounded together
    try:
        wait_for(settled, budget, "every event's index_size == faces ingested", 0.5)
    except AssertionError as exc:
        verdict.examples.append(str(exc)[:300])
    for event, n in expected.items():
        size, photos = last.get(event, (0, 0))
        verdict.lost += max(0, n - size)
        verdict.duplicates += max(0, size - n) + max(0, size - photos)
        if (size, photos) != (n, n):
            verdict.examples.append(f"{event}: index_size={size} photos_indexed={photos} ingested={n}")

    def own_match(i: int) -> tuple[int, str | None]:
        status, body = 0, {"error": "verification deadline passed"}
        while time.monotonic() < deadline:  # a 503/504 while a rebalance finishes is retried
            status, body = match(base, corpus.event(i), corpus.vectors[i], top_k=3)
            if status not in RETRYABLE:
                break
            time.sleep(0.5)
        if status != 200 or not body["matches"] or body["matches"][0]["photo_id"] != corpus.photo_id(i):
            return 1, f"photo {corpus.photo_id(i)}: {status} {str(body)[:200]}"
        if body["matches"][0]["score"] <= 0.99:
            return 2, f"photo {corpus.photo_id(i)}: score {body['matches'][0]['score']}"
        return 0, None
    with ThreadPoolExecutor(6) as pool:
        for kind, example in pool.map(own_match, indices):
            verdict.wrong_top += kind == 1
            verdict.low_score += kind == 2
            if example and len(verdict.examples) < 10:
                verdict.examples.append(example)
    return verdict


def log_count(proc: ServiceProcess, text: str) -> int:
    """How often a line fragment occurs in a service's log."""
    if not proc.log_path.exists():
        return 0
    return proc.log_path.read_text(errors="replace").count(text)


def health_ready(base: str) -> bool:
    """The bridge says every partition's owner answers."""
    return bool(call("GET", f"{base}/health", timeout_s=10)[1].get("ready"))


class Progress:
    """A thread-safe counter the chaos loop watches (decisions by progress, never by time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = self.failed = 0

    def record(self, _index: int, status: int) -> None:
        """ingest() callback."""
        with self._lock:
            self.done += 1
            self.failed += status != 202

    def at_least(self, done: int = 0, failed: int = 0) -> bool:
        """True once this many calls (and failures) have completed."""
        with self._lock:
            return self.done >= done and self.failed >= failed


def all_events_answer(base: str, corpus: Corpus, accepted: dict[str, list[int]]) -> bool:
    """One sweep: every event with photos answers 200 (used to time unavailability)."""
    for event, photos in accepted.items():
        if not photos:
            continue
        status, _ = match(base, event, corpus.vectors[photos[0]], top_k=1)
        if status != 200:
            return False
    return True
