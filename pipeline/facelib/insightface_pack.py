"""InsightFace model packs (buffalo_l: SCRFD-10G + ArcFace r50, 512-d) from a model root the user fills.

The packs are licensed for non-commercial research only and cannot be
downloaded here, so this module never downloads: it loads
`<model_root>/models/<pack>/*.onnx` or refuses with ModelUnavailable.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.facelib.model import DetectedFace, ModelUnavailable, preferred_providers
from pipeline.facelib.quality import crop_sharpness
from pipeline.facelib.spec import INSIGHTFACE_LICENSE as LICENSE
from pipeline.facelib.spec import insightface_spec
from pipeline.facelib.vectors import l2_normalize, split_per_image

logger = logging.getLogger(__name__)

DEFAULT_DET_THRESHOLD = 0.5  # SCRFD's own default
DET_SIZE = (640, 640)
MAX_BATCH = 32


class InsightFacePack:
    """An InsightFace pack through insightface.app.FaceAnalysis (detection + recognition only)."""

    def __init__(
        self,
        model_root: Path,
        pack: str = "buffalo_l",
        det_threshold: float | None = None,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        det_size: tuple[int, int] = DET_SIZE,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.model_root = Path(model_root)
        self.pack = pack
        self.spec = insightface_spec(pack)
        self.det_threshold = DEFAULT_DET_THRESHOLD if det_threshold is None else float(det_threshold)
        self._providers = list(providers) if providers is not None else None
        self._threads = intra_op_threads or min(os.cpu_count() or 1, 8)
        self.det_size = det_size
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._app: Any = None
        self._provider = "not loaded"

    @property
    def pack_dir(self) -> Path:
        """Where the pack's .onnx files must be."""
        return self.model_root / "models" / self.pack

    @property
    def provider(self) -> str:
        """The onnxruntime provider the recognizer runs on."""
        return self._provider

    def load(self) -> None:
        """Build FaceAnalysis over the pack folder; ModelUnavailable names where files go."""
        if self._app is not None:
            return
        if not self.pack_dir.is_dir() or not any(self.pack_dir.glob("*.onnx")):
            raise ModelUnavailable(self._missing_message())
        providers = self._providers or preferred_providers()
        app = _face_analysis(self.pack_dir, self.model_root, providers, self._threads)
        if "detection" not in app.models or "recognition" not in app.models:
            raise ModelUnavailable(
                f"{self.pack_dir} needs a detection and a recognition .onnx; found tasks "
                f"{sorted(app.models)}. {self._missing_message()}"
            )
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1  # -1 pins the sessions to CPU
        app.prepare(ctx_id=ctx_id, det_thresh=self.det_threshold, det_size=self.det_size)
        if not getattr(app.det_model, "use_kps", False):
            raise ModelUnavailable(f"{self.pack_dir}: the detector gives no landmarks, so faces cannot be aligned")
        rec = app.models["recognition"]
        self._provider = str(rec.session.get_providers()[0])
        dim = _output_dim(rec)
        if dim != self.spec.dim:
            logger.warning("%s emits %d-d embeddings, not the declared %d", self.pack, dim, self.spec.dim)
        self.spec = replace(self.spec, dim=dim)
        self._app = app
        logger.info("insightface %s loaded: %d-d on %s", self.pack, dim, self._provider)

    def _missing_message(self) -> str:
        return (
            f"InsightFace pack {self.pack!r} not found: put its .onnx files in {self.pack_dir}/ "
            f"(for buffalo_l: det_10g.onnx and w600k_r50.onnx; the other files are not needed). "
            f"License: {LICENSE}; facematch cannot download them. "
            "The offline default is FACEMATCH_MODEL=sface (`facematch models fetch`)."
        )

    def detect_and_embed(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces per image; all aligned faces of the call are embedded together."""
        from insightface.utils import face_align

        self.load()
        rec = self._app.models["recognition"]
        with self._lock:
            detections = [self._app.det_model.detect(image, max_num=0) for image in images]
            crops = [
                face_align.norm_crop(image, landmark=kps, image_size=rec.input_size[0])
                for image, (_, kpss) in zip(images, detections, strict=True)
                for kps in kpss
            ]
            embeddings = self._embed(rec, crops)
        counts = [len(boxes) for boxes, _ in detections]
        per_image = split_per_image(counts, embeddings)
        per_image_sharpness = split_per_image(counts, np.array([crop_sharpness(c) for c in crops], np.float32))
        return [[_to_face(boxes[i], kpss[i], image_embeddings[i], float(sharpness[i])) for i in range(len(boxes))]
                for (boxes, kpss), image_embeddings, sharpness
                in zip(detections, per_image, per_image_sharpness, strict=True)]

    def _embed(self, rec: Any, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.spec.dim), np.float32)
        # A recognizer exported with batch 1 takes one crop per run.
        step = self.max_batch if _batch_is_dynamic(rec) else 1
        chunks = [rec.get_feat(crops[i : i + step]) for i in range(0, len(crops), step)]
        return l2_normalize(np.concatenate(chunks).reshape(len(crops), -1))


def _face_analysis(pack_dir: Path, model_root: Path, providers: Sequence[str], threads: int) -> Any:
    import onnxruntime as ort
    from insightface.app import FaceAnalysis

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        # The folder path, not the pack name: FaceAnalysis downloads a missing
        # named pack from the internet, and a path it can only load.
        return FaceAnalysis(
            name=str(pack_dir),
            root=str(model_root),
            allowed_modules=["detection", "recognition"],
            providers=list(providers),
            sess_options=options,
        )
    except AssertionError as exc:  # FaceAnalysis asserts that a detector was found
        raise ModelUnavailable(f"no face detector .onnx recognised in {pack_dir}") from exc
    except Exception as exc:  # onnxruntime raises its own classes for corrupt files
        raise ModelUnavailable(f"cannot load the InsightFace pack in {pack_dir}: {exc}") from exc


def _batch_is_dynamic(rec: Any) -> bool:
    first = rec.input_shape[0]
    return not (isinstance(first, int) and first == 1)


def _output_dim(rec: Any) -> int:
    last = rec.output_shape[-1]
    if isinstance(last, int) and last > 0:
        return last
    probe = np.zeros((rec.input_size[1], rec.input_size[0], 3), np.uint8)  # symbolic dim: ask the model
    return int(np.asarray(rec.get_feat(probe)).reshape(-1).shape[0])


def _to_face(box: np.ndarray, kps: np.ndarray, embedding: np.ndarray, sharpness: float) -> DetectedFace:
    x1, y1, x2, y2, score = (float(v) for v in box[:5])
    return DetectedFace(
        bbox=(x1, y1, x2 - x1, y2 - y1),
        det_score=score,
        landmarks=tuple(float(v) for v in np.asarray(kps).reshape(-1)),
        embedding=embedding,
        sharpness=sharpness,
    )
