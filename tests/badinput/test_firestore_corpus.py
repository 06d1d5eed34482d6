"""Malformed Firestore photo documents: each is refused with a precise reason (the producers dead-letter
them with it), and a well-formed document next to them still becomes a photo event."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipeline.errors import PoisonRecord
from pipeline.producers.documents import UPSERT, DocChange, Layout, to_photo_event

DIM = 4
GOOD = [0.1, 0.2, 0.3, 0.4]

DOCUMENT_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("no_image_no_faces", "events/E/photos/P", {"caption": "hi"}, "missing_image_url"),
    ("image_url_number", "events/E/photos/P", {"image_url": 42}, "wrong_type"),
    ("faces_not_a_list", "events/E/photos/P", {"faces": "x"}, "wrong_type"),
    ("face_not_a_map", "events/E/photos/P", {"faces": ["face"]}, "wrong_type"),
    ("image_url_ftp", "events/E/photos/P", {"image_url": "ftp://x/y.jpg"}, "invalid_image_url"),
    ("embedding_and_faces", "events/E/photos/P", {"embedding": GOOD, "faces": [{"embedding": GOOD}]},
     "ambiguous_faces"),
    ("embedding_wrong_length", "events/E/photos/P", {"faces": [{"embedding": [1.0]}]}, "invalid_embedding"),
    ("embedding_nan", "events/E/photos/P", {"faces": [{"embedding": [math.nan] * DIM}]}, "invalid_embedding"),
    ("embedding_zero", "events/E/photos/P", {"faces": [{"embedding": [0.0] * DIM}]}, "invalid_embedding"),
    ("embedding_bools", "events/E/photos/P", {"faces": [{"embedding": [True] * DIM}]}, "wrong_type"),
    ("bbox_three_values", "events/E/photos/P", {"faces": [{"embedding": GOOD, "bbox": [1, 2, 3]}]},
     "invalid_bbox"),
    ("det_score_text", "events/E/photos/P", {"faces": [{"embedding": GOOD, "det_score": "high"}]}, "wrong_type"),
]


@pytest.mark.parametrize(("name", "path", "data", "reason"), DOCUMENT_CASES, ids=[c[0] for c in DOCUMENT_CASES])
def test_bad_document_is_refused_with_its_reason(name: str, path: str, data: dict[str, Any], reason: str) -> None:
    with pytest.raises(PoisonRecord) as info:
        to_photo_event(DocChange(kind=UPSERT, path=path, data=data, update_ms=1), Layout(), DIM, "corpus")
    assert info.value.reason == reason, f"{name}: {info.value.reason}: {info.value}"
    assert str(info.value), f"{name}: the message must say what is wrong"


def test_good_document_still_becomes_an_event() -> None:
    event = to_photo_event(DocChange(kind=UPSERT, path="events/E/photos/P", data={"faces": [{"embedding": GOOD}]},
                                     update_ms=1), Layout(), DIM, "corpus")
    assert event is not None and event.faces is not None and len(event.faces) == 1
