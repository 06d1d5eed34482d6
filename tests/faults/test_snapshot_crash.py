"""Scenario 4: an indexer killed around snapshot writes restarts from its last good snapshot plus replay.

Snapshots are written to `partition-NNNN.tmp<pid>` and renamed over
`partition-NNNN.npz` (pipeline/indexer/state.py), so a crash mid-write leaves a
torn temp file beside the previous good snapshot. The test kills the indexer
right after each fresh snapshot while photos keep arriving, leaves torn temp
files behind, finally tears one real snapshot too (disk corruption: that
partition must be rebuilt by a full replay), and checks the restarted indexer
loads the good snapshots at their recorded offsets and answers exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.indexer.event_index import loads_meta
from tests.faults.common import PHOTOS, Corpus, budget_s, health_ready, ingest, scaled, verify_exactly_once
from tests.integration.helpers import wait_for

ROUNDS = 3


def snapshots(state_dir: Path) -> dict[Path, int]:
    """Snapshot file -> the faces offset it covers (next_offset in its header)."""
    found = {}
    for path in sorted(state_dir.rglob("partition-*.npz")):
        try:
            with np.load(path) as data:
                found[path] = int(loads_meta(data["header"])["next_offset"])
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
    return found


def tear(path: Path, target: Path) -> None:
    """Write the first half of a snapshot to `target`, as a write cut off by SIGKILL would."""
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])


@pytest.mark.timeout(budget_s(240))
def test_indexer_killed_around_snapshot_writes_restarts_from_good_snapshot_plus_replay(stack) -> None:
    state_dir = stack.workdir / "indexer-state"
    indexer = stack.indexer("indexer-0", state_dir=state_dir)
    stack.embedder()
    base = stack.bridge()
    corpus = Corpus(PHOTOS, seed=404)
    per_round = PHOTOS // (ROUNDS + 1)
    kills, torn_temps = 0, []
    for r in range(ROUNDS):
        chunk = range(r * per_round, (r + 1) * per_round)
        before = snapshots(state_dir)
        assert not ingest(base, corpus, chunk)
        # Kill as soon as a snapshot newer than this chunk's first photo exists: snapshots are happening.
        wait_for(lambda b=before: any(o > b.get(p, -1) for p, o in snapshots(state_dir).items()),
                 scaled(60), f"round {r}: a fresh snapshot")
        indexer.kill()
        kills += 1
        for path in snapshots(state_dir):
            torn = path.with_suffix(f".tmp{indexer.process.pid}")
            tear(path, torn)
            torn_temps.append(torn)
        indexer = stack.indexer(f"indexer-{r + 1}", state_dir=state_dir)
        wait_for(lambda: health_ready(base), scaled(60), f"round {r}: restarted indexer ready", 0.5)

    # Last round: photos arrive while no indexer runs, and one real snapshot is torn.
    indexer.kill()
    kills += 1
    good = snapshots(state_dir)
    assert good, "no snapshot was ever written"
    corrupt = sorted(good)[0]
    tear(corrupt, corrupt)
    assert not ingest(base, corpus, range(ROUNDS * per_round, PHOTOS))
    final = stack.indexer("indexer-final", state_dir=state_dir)
    wait_for(lambda: health_ready(base), scaled(90), "final indexer ready", 0.5)
    verdict = verify_exactly_once(base, corpus)

    log = final.log_path.read_text(errors="replace")
    loaded = {int(p): int(o) for p, o in re.findall(r"partition (\d+): snapshot at offset (\d+)", log)}
    expected = {int(p.stem.split("-")[1]): o for p, o in good.items() if p != corrupt}
    # Torn writes of dead processes are swept (they could hold erased faces).
    wait_for(lambda: not list(state_dir.rglob("partition-*.tmp*")), scaled(60), "torn temp files swept", 0.5)
    leftover = sorted(p.name for p in state_dir.rglob("partition-*.tmp*"))
    print(f"\n[snapshot] {verdict.line()} indexer_kills={kills} torn_temp_files={len(torn_temps)} "
          f"snapshots_loaded={loaded} expected={expected} corrupt={corrupt.name} "
          f"temp_files_left={len(leftover)}")
    assert verdict.ok, verdict.examples
    assert loaded == expected, "the restart must load every good snapshot at the offset it recorded"
    assert f"ignoring snapshot {corrupt}" in log, "the torn snapshot must be refused (then replayed)"
