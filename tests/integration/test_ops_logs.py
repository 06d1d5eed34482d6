"""JSON logs with periodic summaries, from real service processes (the log is the behaviour here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.integration.helpers import http, match, unit_vectors, wait_for, wait_index_size

JSON_LOGS = {"FACEMATCH_LOG_FORMAT": "json", "FACEMATCH_LOG_SUMMARY_INTERVAL_S": "1"}
LINE_KEYS = {"ts", "level", "logger", "msg", "pid"}
SUMMARY_KEYS = {
    "indexer": {"faces_applied_per_s", "matches_per_s", "search_p50_ms", "search_p99_ms", "index_faces",
                "index_events", "dead_letters", "rss_mb", "interval_s"},
    "embedder": {"photos_per_s", "faces_per_s", "fetch_p50_ms", "fetch_p99_ms", "embed_p50_ms", "embed_p99_ms",
                 "dead_letters", "rss_mb", "interval_s"},
    "bridge": {"requests_per_s", "latency_p50_ms", "latency_p99_ms", "http_4xx", "http_5xx", "rss_mb",
               "interval_s"},
}


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line of the log, each of which must be one JSON object."""
    entries = []
    for line in path.read_text(errors="replace").split("\n")[:-1]:  # the last one may be half written
        if not line.strip() or line.startswith("%"):
            continue  # librdkafka writes its own (rare) lines to stderr, not through logging
        entry = json.loads(line)
        assert isinstance(entry, dict) and entry.keys() >= LINE_KEYS, line
        entries.append(entry)
    return entries


def summaries(path: Path, stage: str) -> list[dict[str, Any]]:
    """The summary lines of one stage logged so far."""
    return [e for e in json_lines(path) if e.get("summary") == stage]


def test_services_log_json_lines_with_a_summary_every_interval(stack) -> None:
    indexer = stack.indexer(**JSON_LOGS)
    embedder = stack.embedder(**JSON_LOGS)
    base = stack.bridge(**JSON_LOGS)
    bridge = stack.procs[-1]
    vectors = unit_vectors(6, 512, seed=21)
    for k, vector in enumerate(vectors):
        status, body = http("POST", f"{base}/api/v2/ingest",
                            {"event_id": "LOGS", "photo_id": f"p{k}", "embedding": vector.tolist()})
        assert status == 202, body
    wait_index_size(base, "LOGS", vectors[0], len(vectors))
    for vector in vectors:
        assert match(base, "LOGS", vector)[0] == 200
    assert match(base, "LOGS", vectors[0][:3])[0] == 422

    def busy(path: Path, stage: str, field: str) -> list[dict[str, Any]]:
        return [s for s in summaries(path, stage) if s[field]]

    applied = wait_for(lambda: busy(indexer.log_path, "indexer", "faces_applied_per_s"), 30,
                       "an indexer summary with faces applied")[0]
    assert SUMMARY_KEYS["indexer"] <= applied.keys()
    assert applied["level"] == "INFO" and applied["logger"] == "pipeline.summary"
    assert applied["msg"].startswith("summary indexer ")
    latest = wait_for(lambda: [s for s in summaries(indexer.log_path, "indexer")
                               if s["index_faces"] == len(vectors) and s["matches_per_s"]], 30,
                      "an indexer summary with matches")[-1]
    assert latest["index_events"] == 1 and latest["search_p50_ms"] is not None and latest["rss_mb"] > 10

    embedded = wait_for(lambda: busy(embedder.log_path, "embedder", "photos_per_s"), 30,
                        "an embedder summary with photos")[0]
    assert SUMMARY_KEYS["embedder"] <= embedded.keys() and embedded["dead_letters"] == 0

    served = wait_for(lambda: [s for s in summaries(bridge.log_path, "bridge")
                               if "/api/v2/match" in s["requests_per_s"] and s["http_4xx"]], 30,
                      "a bridge summary with match requests and the 422")[0]
    assert SUMMARY_KEYS["bridge"] <= served.keys() and served["latency_p50_ms"] is not None

    # Summaries keep coming once a second, and every line stays JSON.
    count = len(summaries(indexer.log_path, "indexer"))
    wait_for(lambda: len(summaries(indexer.log_path, "indexer")) >= count + 2, 10, "two more indexer summaries")
