"""Where the quality gate's defaults come from: size, score and sharpness of real faces vs degraded copies.

Runs YuNet + SFace the way the embedder does (JPEG bytes -> decode_image at
640 px -> detect_and_embed -> original pixels) on the real test photos and on
degraded copies of each: Gaussian blur (sigma given per 640 px of the long
side, so "blur 4" softens every photo alike at the size the model sees it)
and area downscales. For every face it prints the box's shorter side in
original pixels, the detector score, the sharpness (pipeline/facelib/quality.py)
and the cosine to the same face in the undegraded photo: how much identity
survived. Then, per variant, what the gate (FACEMATCH_QUALITY_* or the
defaults) keeps. docs/quality.md holds the numbers of one run.

    .venv/bin/python bench/quality_gate.py [--faces] [--out bench/results/quality_gate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.assets import fetch_sample_photos, fetch_sface_models  # noqa: E402
from pipeline.facelib.geometry import to_original  # noqa: E402
from pipeline.facelib.images import DecodePolicy, decode_image  # noqa: E402
from pipeline.facelib.model import DetectedFace  # noqa: E402
from pipeline.facelib.quality import QualityGate  # noqa: E402
from pipeline.facelib.sface import SFaceModel  # noqa: E402
from pipeline.settings import ModelSettings, QualitySettings  # noqa: E402

IDENTITY_LOST = 0.5  # cosine to the undegraded face below which we call the face unusable (see docs/quality.md)


def blur(sigma_at_640: float) -> Callable[[np.ndarray], np.ndarray]:
    """Gaussian blur whose sigma is sigma_at_640 pixels once the photo is fitted to 640 px."""
    def apply(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (0, 0), sigma_at_640 * max(image.shape[:2]) / 640)
    return apply


def downscale(factor: int) -> Callable[[np.ndarray], np.ndarray]:
    """Area downscale by an integer factor (a smaller upload of the same photo)."""
    def apply(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return cv2.resize(image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA)
    return apply


VARIANTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    # name: (degradation, how much smaller the result is than the original)
    "original": (lambda image: image, 1.0),
    "blur 2": (blur(2), 1.0), "blur 3": (blur(3), 1.0), "blur 4": (blur(4), 1.0), "blur 8": (blur(8), 1.0),
    "down 2x": (downscale(2), 2.0), "down 4x": (downscale(4), 4.0), "down 8x": (downscale(8), 8.0),
}


@dataclass(frozen=True)
class Row:
    """One detected face of one variant of one photo."""

    photo: str
    variant: str
    side_px: float
    det_score: float
    sharpness: float
    cosine: float | None  # to the nearest face of the original photo; None: no original face near
    rejected: str | None  # the gate's reason, or None when kept


def faces_of(model: SFaceModel, image: np.ndarray) -> list[DetectedFace]:
    """The embedder's path: JPEG bytes, decode to 640 px, detect and embed, back to original pixels."""
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    decoded = decode_image(jpeg.tobytes(), DecodePolicy(max_side=640))
    return [to_original(f, decoded.scale) for f in model.detect_and_embed([decoded.bgr])[0]]


def _centre(face: DetectedFace, factor: float) -> np.ndarray:
    x, y, w, h = face.bbox
    return np.array([x + w / 2, y + h / 2]) * factor


def _cosine(face: DetectedFace, factor: float, originals: list[DetectedFace]) -> float | None:
    """Cosine to the original face whose centre is nearest (within half its width), else None."""
    if not originals:
        return None
    distances = [float(np.linalg.norm(_centre(face, factor) - _centre(o, 1.0))) for o in originals]
    nearest = int(np.argmin(distances))
    if distances[nearest] > originals[nearest].bbox[2] / 2:
        return None
    return float(face.embedding @ originals[nearest].embedding)


def measure(model: SFaceModel, photos: dict[str, Path], gate: QualityGate) -> list[Row]:
    """Rows for every face of every variant of every photo."""
    rows: list[Row] = []
    for name in sorted(photos):
        image = cv2.imread(str(photos[name]), cv2.IMREAD_COLOR)
        originals = faces_of(model, image)
        for variant, (degrade, factor) in VARIANTS.items():
            faces = originals if variant == "original" else faces_of(model, degrade(image))
            for face in faces:
                rejection = gate.check(face)
                rows.append(Row(name, variant, min(face.bbox[2], face.bbox[3]), face.det_score,
                                float(face.sharpness or 0.0), _cosine(face, factor, originals),
                                None if rejection is None else rejection.reason))
    return rows


def _range(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}" if values else "-"


def summary(rows: list[Row]) -> list[dict[str, object]]:
    """Per variant: faces found, the ranges, and what the gate kept."""
    out: list[dict[str, object]] = []
    for variant in VARIANTS:
        mine = [r for r in rows if r.variant == variant]
        cosines = [r.cosine for r in mine if r.cosine is not None]
        out.append({
            "variant": variant, "faces": len(mine),
            "side_px": _range([r.side_px for r in mine], ".0f"),
            "det_score": _range([r.det_score for r in mine], ".2f"),
            "sharpness": _range([r.sharpness for r in mine], ".1f"),
            "cosine": _range(cosines, ".2f"),
            "identity_lost": sum(1 for c in cosines if c < IDENTITY_LOST),
            "kept": sum(1 for r in mine if r.rejected is None),
            "too_small": sum(1 for r in mine if r.rejected == "too_small"),
            "low_score": sum(1 for r in mine if r.rejected == "low_score"),
            "too_blurred": sum(1 for r in mine if r.rejected == "too_blurred"),
        })
    return out


def print_markdown(rows: list[Row], gate: QualityGate, per_face: bool) -> None:
    """The summary table (and, with per_face, every face) as Markdown."""
    print(f"gate: min_face_px={gate.min_face_px:g} min_det_score={gate.min_det_score:g} "
          f"min_sharpness={gate.min_sharpness:g}; identity lost = cosine to the original face < {IDENTITY_LOST}\n")
    lines = summary(rows)
    header = list(lines[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(str(line[h]) for h in header) + " |")
    real = [r for r in rows if r.variant == "original"]
    print(f"\nreal faces: {len(real)}, smallest {min(r.side_px for r in real):.0f} px, lowest score "
          f"{min(r.det_score for r in real):.2f}, least sharp {min(r.sharpness for r in real):.1f}; "
          f"rejected by the gate: {sum(1 for r in real if r.rejected)}")
    for kind in ("blur", "down"):
        mine = [r for r in rows if r.variant.startswith(kind) and r.cosine is not None]
        lost = [r for r in mine if r.cosine is not None and r.cosine < IDENTITY_LOST]
        kept = [r.cosine for r in mine if r.rejected is None and r.cosine is not None]
        if lost:
            print(f"{kind}: identity lost in {len(lost)} faces (sharpest {max(r.sharpness for r in lost):.1f}, "
                  f"largest {max(r.side_px for r in lost):.0f} px, best score {max(r.det_score for r in lost):.2f}), "
                  f"the gate kept {sum(1 for r in lost if r.rejected is None)} of them; lowest cosine of a kept "
                  f"face: {min(kept) if kept else float('nan'):.2f}")
    if per_face:
        print("\n| photo | variant | side px | score | sharpness | cosine | gate |\n|---|---|---|---|---|---|---|")
        for r in rows:
            cosine = "-" if r.cosine is None else f"{r.cosine:.2f}"
            print(f"| {r.photo} | {r.variant} | {r.side_px:.0f} | {r.det_score:.2f} | {r.sharpness:.1f} | "
                  f"{cosine} | {r.rejected or 'kept'} |")


def sface_and_photos() -> tuple[SFaceModel, dict[str, Path]]:
    """The loaded SFace pack and the real test photos, fetched (and verified) when missing."""
    model_root = Path(ModelSettings().model_root).resolve()
    fetch_sface_models(model_root)
    photos = fetch_sample_photos(Path(os.environ.get("FACEMATCH_CACHE_DIR", REPO / ".cache")) / "photos")
    model = SFaceModel(model_root)
    model.load()
    return model, photos


def main() -> int:
    """Measure, print Markdown, write JSON (for BENCHMARKS.md)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--faces", action="store_true", help="also print one row per face")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality_gate.json",
                        help="every row and the summary as JSON")
    args = parser.parse_args()
    model, photos = sface_and_photos()
    gate = QualityGate.from_settings(QualitySettings())
    rows = measure(model, photos, gate)
    print_markdown(rows, gate, args.faces)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gate": asdict(gate), "summary": summary(rows),
                                        "faces": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
