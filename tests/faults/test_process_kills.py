"""Scenario 1: SIGKILL embedders and indexers mid-ingest; every photo is still indexed exactly once."""

from __future__ import annotations

import random

import pytest

from tests.faults.common import PHOTOS, Corpus, budget_s, health_ready, ingest, verify_exactly_once
from tests.integration.helpers import wait_for


@pytest.mark.timeout(budget_s(240))
def test_sigkill_embedders_and_indexers_during_ingest_loses_and_duplicates_nothing(stack) -> None:
    rng = random.Random(1)
    members = {
        "indexer-a": stack.indexer("indexer-a"),
        "indexer-b": stack.indexer("indexer-b"),
        "embedder-a": stack.embedder("embedder-a"),
        "embedder-b": stack.embedder("embedder-b"),
    }
    base = stack.bridge()
    corpus = Corpus(PHOTOS, seed=101)
    chunk = max(1, PHOTOS // 6)
    killed, refused = [], []
    for start in range(0, PHOTOS, chunk):
        refused += ingest(base, corpus, range(start, min(start + chunk, PHOTOS)))
        if start + chunk >= PHOTOS:
            break
        # Progress, not time, decides: one crash after every sixth of the photos.
        name = rng.choice(sorted(members))
        members[name].kill()
        killed.append(name)
        restarted = f"{name}-r{len(killed)}"
        if name.startswith("indexer"):  # same state dir: the restart may load its snapshots
            members[name] = stack.indexer(restarted, state_dir=stack.workdir / f"state-{name}")
        else:
            members[name] = stack.embedder(restarted)
    assert not refused, f"the bridge refused {len(refused)} photos although the broker was up"

    wait_for(lambda: health_ready(base), budget_s(60), "every partition answering after the last crash", 0.5)
    verdict = verify_exactly_once(base, corpus)
    print(f"\n[kills] {verdict.line()} processes_killed={len(killed)} ({', '.join(killed)})")
    assert verdict.ok, verdict.examples
