"""The embedder's pure core: photo events in, face records out.

No Kafka here. Images are fetched concurrently (I/O bound) and decoded; the
model starts on the first `model_chunk` decoded images while the rest of the
batch is still downloading, so fetching overlaps inference (a chunk is also
one model call, which keeps a GPU busy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PoisonRecord
from pipeline.facelib.geometry import to_original
from pipeline.facelib.images import DecodedImage
from pipeline.facelib.model import DetectedFace, FaceModel
from pipeline.facelib.quality import NO_GATE, QualityGate
from pipeline.facelib.spec import ModelSpec
from pipeline.facelib.vectors import normalize_embedding
from pipeline.records import Face, PhotoEvent, PhotoFaces, PrecomputedFace, check_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tombstone:
    """The photo is gone: a null value under its faces key."""

    event_id: str
    photo_id: str


FacesChange = PhotoFaces | Tombstone
Result = FacesChange | BaseException
Decoder = Callable[[bytes], DecodedImage]


def precomputed_faces(event: PhotoEvent, spec: ModelSpec) -> PhotoFaces:
    """Faces embedded upstream: validated and normalized, nothing fetched."""
    faces = [_precomputed_face(f, spec.dim) for f in event.faces or []]
    return PhotoFaces(event_id=event.event_id, photo_id=event.photo_id, model_id=spec.model_id,
                      dim=spec.dim, faces=faces, image_url=event.image_url,
                      occurred_at=event.occurred_at)


def _precomputed_face(face: PrecomputedFace, dim: int) -> Face:
    bbox = tuple(face.bbox) if face.bbox else (0.0, 0.0, 0.0, 0.0)
    if len(bbox) != 4:
        raise PoisonRecord("invalid_bbox", f"bbox must be [x, y, width, height], got {len(bbox)} values")
    return Face(bbox=bbox, det_score=float(face.det_score),
                embedding=normalize_embedding(face.embedding, dim))


class EmbedderCore:
    """Turns a batch of photo events into face changes, one result per event."""

    def __init__(self, spec: ModelSpec, model: FaceModel | None,
                 fetch: Callable[[str], bytes] | None, decode: Decoder | None,
                 fetch_workers: int = 8, model_chunk: int = 8, gate: QualityGate = NO_GATE) -> None:
        self.spec, self.model, self.fetch, self.decode = spec, model, fetch, decode
        self.model_chunk = max(1, model_chunk)
        # Applies to faces this core detects; precomputed faces come without pixels to measure.
        self.gate = gate
        self._pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")
        self.last_fetch_s = self.last_model_s = 0.0  # timings of the latest batch, for metrics
        self.last_rejected: dict[str, int] = {}  # faces the gate dropped in the latest batch, by reason

    @property
    def active_spec(self) -> ModelSpec:
        """What faces records claim: the loaded model's spec (a pack corrects it on load), else the declared one.

        Precomputed faces get it too: the producer promises they come from this
        pipeline's model, and the indexer refuses faces of any other model_id.
        """
        return self.model.spec if self.model is not None else self.spec

    def process(self, events: Sequence[PhotoEvent]) -> list[Result]:
        """One result per event, in order; failures are returned, not raised."""
        results: list[Result | None] = [None] * len(events)
        to_embed: list[int] = []
        self.last_rejected = {}
        for i, event in enumerate(events):
            try:
                results[i] = self._without_model(event)
            except Exception as exc:
                results[i] = exc
                continue
            if results[i] is None:
                to_embed.append(i)
        if to_embed:
            for i, result in zip(to_embed, self._embed_images([events[i] for i in to_embed]), strict=True):
                results[i] = result
        return _all_filled(results)

    def _without_model(self, event: PhotoEvent) -> FacesChange | None:
        check_id("event_id", event.event_id)
        if event.op == "DELETE_EVENT":
            spec = self.active_spec
            return PhotoFaces(event_id=event.event_id, photo_id="", model_id=spec.model_id,
                              dim=spec.dim, op="DELETE_EVENT", occurred_at=event.occurred_at)
        check_id("photo_id", event.photo_id)
        if event.op == "DELETE":
            return Tombstone(event.event_id, event.photo_id)
        if event.faces is not None:
            return precomputed_faces(event, self.active_spec)
        if not event.image_url:
            raise PoisonRecord("no_image", "photo event has neither image_url nor precomputed faces")
        if self.model is None or self.fetch is None or self.decode is None:
            raise PoisonRecord("no_model", "image_url given but no face model is configured "
                               "(FACEMATCH_MODEL=none accepts precomputed faces only)")
        return None

    def _embed_images(self, events: list[PhotoEvent]) -> list[Result]:
        if self.model is None:  # _without_model() refuses these events first
            raise RuntimeError("no face model to embed images with")
        started = time.perf_counter()
        self.last_model_s = 0.0
        futures = [self._pool.submit(self._fetch_and_decode, event) for event in events]
        position = {future: i for i, future in enumerate(futures)}
        results: list[Result] = [_PENDING] * len(events)
        decoded: dict[int, DecodedImage] = {}
        waiting: set[Future[DecodedImage | BaseException]] = set(futures)
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                outcome = future.result()  # _fetch_and_decode returns its errors
                if isinstance(outcome, BaseException):
                    results[position[future]] = outcome
                else:
                    decoded[position[future]] = outcome
            if not waiting:
                self.last_fetch_s = time.perf_counter() - started
            # The model runs on the decoded images while the other downloads go on.
            if len(decoded) >= self.model_chunk or (decoded and not waiting):
                self._run_model(events, decoded, results)
                decoded = {}
        return results

    def _run_model(self, events: list[PhotoEvent], decoded: dict[int, DecodedImage], results: list[Result]) -> None:
        """One model call over the decoded images; their results land at their events' positions."""
        order = sorted(decoded)
        spec = self.active_spec
        started = time.perf_counter()
        all_faces = self.model.detect_and_embed([decoded[i].bgr for i in order])  # type: ignore[union-attr]
        self.last_model_s += time.perf_counter() - started
        for i, faces in zip(order, all_faces, strict=True):
            event = events[i]
            results[i] = PhotoFaces(
                event_id=event.event_id, photo_id=event.photo_id, model_id=spec.model_id,
                dim=spec.dim, image_url=event.image_url, occurred_at=event.occurred_at,
                faces=self._passing(event, [to_original(f, decoded[i].scale) for f in faces]))

    def _passing(self, event: PhotoEvent, faces: list[DetectedFace]) -> list[Face]:
        """The faces (in original pixels) that pass the gate, as records; the others are counted."""
        kept, rejected = self.gate.split(faces)
        for rejection in rejected:
            self.last_rejected[rejection.reason] = self.last_rejected.get(rejection.reason, 0) + 1
            logger.debug("photo %s/%s: face dropped: %s", event.event_id, event.photo_id, rejection.message)
        return [_to_record(f) for f in kept]

    def _fetch_and_decode(self, event: PhotoEvent) -> DecodedImage | BaseException:
        try:
            if self.fetch is None or self.decode is None or not event.image_url:
                raise RuntimeError("fetching needs a fetcher, a decoder and an image_url")
            return self.decode(self.fetch(event.image_url))
        except Exception as exc:  # PoisonRecord / TransientError flow to the runner
            return exc


_PENDING = RuntimeError("not embedded")  # placeholder; every decoded slot is overwritten below


def _to_record(face: DetectedFace) -> Face:
    """A faces-record face from one already mapped to the original photo's pixels."""
    return Face(bbox=face.bbox, det_score=face.det_score, landmarks=face.landmarks,
                embedding=np.asarray(face.embedding, dtype=np.float32))


def _all_filled(results: Sequence[Result | None]) -> list[Result]:
    """The results, once every slot has one (a None left is a bug in this module)."""
    filled = [r for r in results if r is not None]
    if len(filled) != len(results):
        raise RuntimeError(f"{len(results) - len(filled)} events got no result")
    return filled
