"""Helpers for integration tests: HTTP calls, synthetic embeddings, Kafka reads."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition


def http(method: str, url: str, body: Any = None, timeout_s: float = 15.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """JSON request; (status, body) for every status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Random L2-normalized vectors (nearly orthogonal in high dimension)."""
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def match(base: str, event_id: str, vector: np.ndarray, top_k: int = 10,
          threshold: float | None = 0.5) -> tuple[int, dict[str, Any]]:
    """POST /api/v2/match."""
    body: dict[str, Any] = {"event_id": event_id, "user_embedding": [float(x) for x in vector], "top_k": top_k}
    if threshold is not None:
        body["threshold"] = threshold
    return http("POST", f"{base}/api/v2/match", body)


def wait_index_size(base: str, event_id: str, probe: np.ndarray, size: int, timeout_s: float = 60) -> dict:
    """Wait until the event's index holds exactly `size` faces."""
    def ready() -> dict | None:
        status, body = match(base, event_id, probe)
        return body if status == 200 and body["index_size"] == size else None
    return wait_for(ready, timeout_s, f"{event_id} index_size == {size}")


def read_topic(bootstrap: str, topic: str, partitions: int, expect: int, timeout_s: float = 30) -> list[Any]:
    """Read at least `expect` records of a topic from the beginning."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                records.append(msg)
    finally:
        consumer.close()
    return records
