"""Scenario 3: a bridge SIGKILLed mid-match fails its in-flight clients cleanly; replies never cross requests.

Two bridges read two reply partitions. Clients hammer bridge A; A is killed
mid-stream: its in-flight callers get a connection error or a 5xx, never
someone else's answer. A restarted bridge on A's reply partition (stale
replies for A's dead requests may still arrive there) then serves, and 200+
truly concurrent requests, each the embedding of a distinct photo, spread over
both bridges, must each get their own photo first.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.faults.common import (
    PHOTOS,
    RETRYABLE,
    Corpus,
    Progress,
    budget_s,
    call,
    ingest,
    scaled,
    verify_exactly_once,
)
from tests.integration.helpers import wait_for

CONCURRENT = 240


def ask(base: str, corpus: Corpus, i: int, timeout_s: float = 60.0) -> tuple[str, str]:
    """One match for photo i: ('ok'|'wrong'|'error', detail)."""
    body = {"event_id": corpus.event(i), "user_embedding": corpus.vectors[i].tolist(), "top_k": 3,
            "threshold": 0.5}
    status, answer = call("POST", f"{base}/api/v2/match", body, timeout_s=timeout_s)
    if status == 200:
        top = answer["matches"][0]["photo_id"] if answer["matches"] else None
        if top == corpus.photo_id(i) and answer["event_id"] == corpus.event(i):
            return "ok", ""
        return "wrong", f"photo {corpus.photo_id(i)} got {str(answer)[:200]}"
    if status == 0 or status in RETRYABLE:
        return "error", f"{status}"
    return "wrong", f"photo {corpus.photo_id(i)}: unexpected {status} {answer}"


class Hammer(threading.Thread):
    """Loops match requests for distinct photos against one bridge until stopped."""

    def __init__(self, base: str, corpus: Corpus, offset: int, progress: Progress) -> None:
        super().__init__(daemon=True)
        self.base, self.corpus, self.offset, self.progress = base, corpus, offset, progress
        self.stop_flag = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[str] = []

    def run(self) -> None:
        i = self.offset
        while not self.stop_flag.is_set():
            kind, detail = ask(self.base, self.corpus, i % self.corpus.photos, timeout_s=20)
            self.outcomes[kind] += 1
            self.progress.record(i, 202 if kind == "ok" else 0)
            if kind == "wrong":
                self.wrong.append(detail)
            i += 7


def burst(bases: list[str], corpus: Corpus, count: int) -> tuple[Counter[str], list[str]]:
    """`count` threads released together, each asking for a distinct photo, round-robin over bridges."""
    barrier = threading.Barrier(count)
    results: list[tuple[str, str]] = [("error", "not run")] * count

    def one(k: int) -> None:
        barrier.wait(60)
        results[k] = ask(bases[k % len(bases)], corpus, k % corpus.photos)
    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return Counter(kind for kind, _ in results), [detail for kind, detail in results if kind != "ok"]


@pytest.mark.timeout(budget_s(240))
def test_bridge_sigkill_mid_match_then_hundreds_of_concurrent_matches_get_their_own_reply(stack) -> None:
    stack.indexer()
    stack.embedder()
    # A long reply timeout: a burst of 200+ requests on 2 busy cores must not turn into 504s.
    slow_ok = {"FACEMATCH_BRIDGE_TIMEOUT_S": "45"}
    base_a = stack.bridge("bridge-a", reply_partition=0, **slow_ok)
    base_b = stack.bridge("bridge-b", reply_partition=1, **slow_ok)
    corpus = Corpus(PHOTOS, seed=303)
    assert not ingest(base_b, corpus, range(PHOTOS))
    verdict = verify_exactly_once(base_b, corpus)
    assert verdict.ok, verdict.examples

    progress = Progress()
    hammers = [Hammer(base_a, corpus, offset, progress) for offset in range(8)]
    for hammer in hammers:
        hammer.start()
    wait_for(lambda: progress.at_least(done=40), scaled(60), "bridge A answering the hammer")
    bridge_a = next(p for p in stack.procs if p.name == "bridge-a")
    bridge_a.kill()
    answered_before_kill = progress.done
    # Progress again decides: the hammer must have seen the dead bridge before we stop it.
    wait_for(lambda: progress.at_least(failed=8), scaled(60), "clients seeing bridge A dead")
    for hammer in hammers:
        hammer.stop_flag.set()
    for hammer in hammers:
        hammer.join(60)
    during_kill = sum((h.outcomes for h in hammers), Counter())
    wrong_during_kill = [w for h in hammers for w in h.wrong]

    base_a2 = stack.bridge("bridge-a2", reply_partition=0, **slow_ok)  # A's reply partition, A's stale replies
    restarted_ok = ask(base_a2, corpus, 0)
    outcomes, problems = burst([base_a2, base_b], corpus, min(CONCURRENT, max(200, PHOTOS)))
    print(f"\n[bridge] photos ingested={PHOTOS} answered_before_kill={answered_before_kill} "
          f"hammer outcomes {dict(during_kill)} bridges_killed=1 restarted bridge first answer={restarted_ok[0]} "
          f"concurrent burst of {sum(outcomes.values())}: {dict(outcomes)}")
    assert not wrong_during_kill, wrong_during_kill[:5]
    assert during_kill["error"] >= 1, "killing the bridge never surfaced as an error to a client"
    assert restarted_ok[0] == "ok", restarted_ok
    assert outcomes["wrong"] == 0, problems[:5]
    assert outcomes["ok"] == sum(outcomes.values()), problems[:5]
