"""Re-embedding an event with another model, blue/green, under concurrent matching (real broker, real SFace).

Blue: faces embedded upstream (model "precomputed", 128-d; here SFace's own
vectors sent as precomputed faces). Green: the real SFace embedder fetching the
same photos from their URLs (model "yunet-2023mar+sface-2021dec"). Matching runs
through two bridges, one per model, the whole time: every answer comes from the
index of the query's model, or is a 409, never a score across models.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import SFACE_SPEC
from pipeline.restore import read_to_end
from pipeline.topics import partition_for
from tests.conftest import REPO, Stack
from tests.httpserver import http_server  # noqa: F401  (fixture)
from tests.integration.helpers import http, wait_for

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "t1.jpg", "sample1.jpg")
BLUE = "precomputed"
GREEN = SFACE_SPEC.model_id


def match(base: str, event: str, vector: Any) -> tuple[int, dict[str, Any]]:
    return http("POST", f"{base}/api/v2/match", {"event_id": event, "top_k": 20,
                                                  "user_embedding": [float(x) for x in vector]})


def test_a_switch_under_concurrent_matching_never_mixes_models(
        stack: Stack, sample_faces: dict[str, list[DetectedFace]], sample_photos: dict[str, Path],
        sface_model_root: Path, http_server: Any) -> None:  # noqa: F811
    site = http_server({f"/{name}": sample_photos[name].read_bytes() for name in PHOTOS})
    stack.env.update({"FACEMATCH_EMBEDDING_DIM": "128", "FACEMATCH_INDEXER_EXTRA_MODELS": f"{GREEN}:128",
                      "FACEMATCH_MODEL_ROOT": str(sface_model_root), "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1"})
    event = "marathon"
    stack.indexer()
    stack.embedder("blue-embedder")
    stack.embedder("green-embedder", FACEMATCH_MODEL="sface", FACEMATCH_EMBEDDER_MODEL_KEYS="1",
                   FACEMATCH_EMBEDDER_GROUP=f"{stack.topics.prefix}embedder-green")
    blue = stack.bridge("blue-bridge", reply_partition=0)
    green = stack.bridge("green-bridge", reply_partition=1, FACEMATCH_MODEL="sface")
    for name in PHOTOS:  # upstream faces plus the URL the image lives at
        body = {"event_id": event, "photo_id": name, "image_url": site.url(f"/{name}"),
                "faces": [[float(x) for x in f.embedding] for f in sample_faces[name]]}
        status, answer = http("POST", f"{blue}/api/v2/ingest", body)
        assert status == 202, answer
    selfie = sample_faces["obama.jpg"][0].embedding
    wait_for(lambda: match(blue, event, selfie)[1].get("photos_indexed") == len(PHOTOS), 90, "blue index built")
    status, body = match(green, event, selfie)
    assert status == 409 and "model mismatch" in body["error"], body  # the event still answers in blue

    answers: list[tuple[str, int, dict[str, Any]]] = []
    stop = threading.Event()

    def keep_matching() -> None:
        while not stop.is_set():
            for model, base in ((BLUE, blue), (GREEN, green)):
                status, body = match(base, event, selfie)
                answers.append((model, status, body))

    threads = [threading.Thread(target=keep_matching, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "reembed", "--event-id", event,
                               "--model-id", GREEN, "--timeout-s", "240"], env=stack.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert '"activated": true' in done.stdout, done.stdout
        wait_for(lambda: match(green, event, selfie)[0] == 200, 60, "green answers")
        wait_for(lambda: any(m == BLUE and s == 409 for m, s, _ in answers[-4:]), 60, "blue refused")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    ok = [(model, body) for model, status, body in answers if status == 200]
    assert {s for _, s, _ in answers} <= {200, 409}, {s for _, s, _ in answers}
    assert all(body["model"] == model for model, body in ok), "an answer came from another model's index"
    assert {m for m, _ in ok} == {BLUE, GREEN}  # both answered, each before/after its side of the switch
    obama = {"obama.jpg", "obama2.jpg", "obama3.jpg"}
    for model, body in ok:
        assert {m["photo_id"] for m in body["matches"]} == obama, (model, body["matches"])
    print(f"\n{len(answers)} matches during the switch: "
          + ", ".join(f"{m} {s}: {sum(1 for a in answers if a[0] == m and a[1] == s)}"
                      for m in (BLUE, GREEN) for s in (200, 409)))

    # The blue index's records are tombstoned on the compacted topic: only green's faces remain.
    where = (stack.topics.faces, partition_for(event, stack.topics.partitions))
    latest: dict[bytes, bytes | None] = {}
    for key, value in read_to_end({"bootstrap.servers": stack.bootstrap}, [where])[where].records:
        if key and key.startswith(f"{event}/".encode()):
            latest[key] = value
    alive = sorted(k.decode() for k, v in latest.items() if v is not None)
    assert alive == sorted(f"{event}/{name}/{GREEN}" for name in PHOTOS), alive


def test_reembed_refuses_photos_without_an_image_url(stack: Stack) -> None:
    stack.env.update({"FACEMATCH_EMBEDDING_DIM": "8"})
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    body = {"event_id": "E", "photo_id": "p", "embedding": [1.0] + [0.0] * 7}
    status, _ = http("POST", f"{base}/api/v2/ingest", body)
    assert status == 202
    wait_for(lambda: match(base, "E", [1.0] + [0.0] * 7)[1].get("photos_indexed") == 1, 60, "indexed")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "reembed", "--event-id", "E", "--model-id", GREEN],
                          env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "no image_url" in done.stderr, done.stderr[-2000:]
