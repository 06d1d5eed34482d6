"""LFW 10-fold face verification: `facematch eval lfw --dir DIR`.

Standard protocol: pairs.txt lists, per fold, n matched pairs then n mismatched
pairs. Each fold's threshold is the best one on the other folds; the accuracy
is measured on the held-out fold. An image where the model finds no face can
not be compared, so its pairs count as wrong (and are reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.facelib.geometry import most_prominent
from pipeline.facelib.images import fit_to_side
from pipeline.facelib.model import FaceModel, ModelUnavailable

logger = logging.getLogger(__name__)

MAX_SIDE = 640  # the pipeline's decode size; LFW's 250 px images are left alone
BATCH_IMAGES = 32


@dataclass(frozen=True)
class Pair:
    """One verification pair; paths are relative to the LFW folder."""

    fold: int
    a: str
    b: str
    same: bool


@dataclass(frozen=True)
class FoldResult:
    """Per-fold held-out accuracy and the threshold chosen on the other folds."""

    accuracies: np.ndarray
    thresholds: np.ndarray

    @property
    def mean(self) -> float:
        """Mean held-out accuracy."""
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Population std of the fold accuracies (the usual LFW "±")."""
        return float(np.std(self.accuracies))


def lfw_image(name: str, index: int) -> str:
    """`Name/Name_0001.jpg`, the LFW file layout."""
    return f"{name}/{name}_{index:04d}.jpg"


def parse_pairs(text: str) -> list[Pair]:
    """Pairs from LFW pairs.txt: header `folds n`, then per fold n matched + n mismatched lines."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError("pairs file must start with a `folds pairs_per_class` header, e.g. `10 300`")
    folds, per_class = int(lines[0][0]), int(lines[0][1])
    body = lines[1:]
    if len(body) != folds * 2 * per_class:
        raise ValueError(f"header says {folds} folds x 2 x {per_class} pairs, file has {len(body)} lines")
    pairs = []
    for i, tokens in enumerate(body):
        fold, same = i // (2 * per_class), (i % (2 * per_class)) < per_class
        if same and len(tokens) == 3:
            pairs.append(Pair(fold, lfw_image(tokens[0], int(tokens[1])), lfw_image(tokens[0], int(tokens[2])), True))
        elif not same and len(tokens) == 4:
            a, b = lfw_image(tokens[0], int(tokens[1])), lfw_image(tokens[2], int(tokens[3]))
            pairs.append(Pair(fold, a, b, False))
        else:
            raise ValueError(f"pairs line {i + 2}: expected {'3' if same else '4'} fields, got {tokens}")
    return pairs


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (same iff score >= t) with the best accuracy; ties take the middle one."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if scores.size == 0:
        raise ValueError("no scored pairs to choose a threshold from")
    uniq = np.unique(scores)
    # Midpoints between neighbouring scores, plus "everything same" / "nothing same".
    candidates = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1] + 1e-6]])
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    true_pos = pos.size - np.searchsorted(pos, candidates, side="left")
    true_neg = np.searchsorted(neg, candidates, side="left")
    accuracy = (true_pos + true_neg) / scores.size
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(candidates[best[len(best) // 2]])


def kfold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: np.ndarray, valid: np.ndarray) -> FoldResult:
    """Held-out accuracy per fold; invalid pairs (no face) never train and always count as wrong."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    folds, valid = np.asarray(folds), np.asarray(valid, bool)
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError("k-fold evaluation needs at least 2 folds")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        train, test = (folds != fold) & valid, folds == fold
        threshold = best_threshold(scores[train], labels[train])
        correct = valid[test] & ((scores[test] >= threshold) == labels[test])
        accuracies.append(float(np.mean(correct)))
        thresholds.append(threshold)
    return FoldResult(np.array(accuracies), np.array(thresholds))


def read_image(path: Path, max_side: int = MAX_SIDE) -> np.ndarray | None:
    """BGR image downscaled to max_side on its long side, or None if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    return fit_to_side(image, max_side)


def embed_images(
    model: FaceModel, root: Path, names: Sequence[str], batch: int = BATCH_IMAGES
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Embedding of the most prominent face per image, and the images without one."""
    embeddings: dict[str, np.ndarray] = {}
    failed: list[str] = []
    for start in range(0, len(names), batch):
        chunk = list(names[start : start + batch])
        loaded = [(name, read_image(root / name)) for name in chunk]
        readable = [(name, image) for name, image in loaded if image is not None]
        failed += [name for name, image in loaded if image is None]
        results = model.detect_and_embed([image for _, image in readable])
        for (name, _), faces in zip(readable, results, strict=True):
            face = most_prominent(faces)
            if face is None:
                failed.append(name)
            else:
                embeddings[name] = face.embedding
        logger.info("embedded %d/%d images", min(start + batch, len(names)), len(names))
    return embeddings, failed


@dataclass(frozen=True)
class LfwReport:
    """What `facematch eval lfw` prints and writes as JSON."""

    model_id: str
    provider: str
    folds: int
    pairs: int
    images: int
    images_no_face: int
    pairs_no_face: int
    accuracy_mean: float
    accuracy_std: float
    threshold_mean: float
    threshold_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    no_face_images: list[str]
    seconds: float


def evaluate(model: FaceModel, root: Path, pairs: Sequence[Pair], batch: int = BATCH_IMAGES) -> LfwReport:
    """Embed every image named by the pairs and run the k-fold protocol."""
    started = time.perf_counter()
    names = sorted({p.a for p in pairs} | {p.b for p in pairs})
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in the pairs file are missing, e.g. {missing[:3]}")
    embeddings, failed = embed_images(model, root, names, batch)
    valid = np.array([p.a in embeddings and p.b in embeddings for p in pairs])
    scores = np.array(
        [float(embeddings[p.a] @ embeddings[p.b]) if p.a in embeddings and p.b in embeddings else np.nan for p in pairs]
    )
    result = kfold_accuracy(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), valid)
    return LfwReport(
        model_id=model.spec.model_id,
        provider=model.provider,
        folds=len(result.accuracies),
        pairs=len(pairs),
        images=len(names),
        images_no_face=len(failed),
        pairs_no_face=int((~valid).sum()),
        accuracy_mean=result.mean,
        accuracy_std=result.std,
        threshold_mean=float(np.mean(result.thresholds)),
        threshold_std=float(np.std(result.thresholds)),
        fold_accuracies=[float(a) for a in result.accuracies],
        fold_thresholds=[float(t) for t in result.thresholds],
        no_face_images=sorted(failed),
        seconds=round(time.perf_counter() - started, 3),
    )


def format_report(report: LfwReport) -> str:
    """A few human lines."""
    return "\n".join(
        [
            f"LFW {report.folds}-fold verification, {report.model_id} on {report.provider}",
            f"  accuracy  {report.accuracy_mean:.4f} ± {report.accuracy_std:.4f}",
            f"  threshold {report.threshold_mean:.3f} ± {report.threshold_std:.3f} (cosine, chosen per fold)",
            f"  pairs {report.pairs}, images {report.images}, no face found in {report.images_no_face} images "
            f"({report.pairs_no_face} pairs counted wrong)",
            f"  {report.seconds:.1f} s",
        ]
    )


def _parser(model_root: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facematch eval lfw", description="LFW 10-fold face verification")
    parser.add_argument("--dir", type=Path, required=True, help="LFW folder: <Name>/<Name>_0001.jpg")
    parser.add_argument("--pairs", type=Path, default=None, help="pairs.txt (default: DIR/pairs.txt)")
    parser.add_argument("--model", default="sface")
    parser.add_argument("--model-root", type=Path, default=model_root)
    parser.add_argument("--det-threshold", type=float, default=None, help="default: the pack's own")
    parser.add_argument("--batch", type=int, default=BATCH_IMAGES, help="images per model call")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser


def lfw_main(argv: Sequence[str]) -> int:
    """`facematch eval lfw --dir DIR [--pairs FILE] [--model sface] [--model-root DIR] [--json OUT]`."""
    from pipeline.facelib.packs import load_model
    from pipeline.logs import setup_logging
    from pipeline.settings import LogSettings, ModelSettings

    args = _parser(ModelSettings().model_root).parse_args(list(argv))
    setup_logging(LogSettings().log_level)
    try:
        pairs = parse_pairs((args.pairs or args.dir / "pairs.txt").read_text())
        model = load_model(args.model, args.model_root, det_threshold=args.det_threshold)
        if model is None:
            raise ValueError("model 'none' has no detector: choose a face model pack, e.g. --model sface")
        model.load()
        report = evaluate(model, args.dir, pairs, max(1, args.batch))
    except (OSError, ValueError, ModelUnavailable) as exc:
        print(f"eval lfw: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0
