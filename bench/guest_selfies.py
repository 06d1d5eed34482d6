"""Several selfies per guest: max over selfies vs the mean embedding, on the labelled real photos.

The Obama photos (obama.jpg, obama2.jpg, obama3.jpg) show one person; every
other face of the test photos is someone else. For each way to enrol
selfies from the Obama photos, every face of every photo is scored under both
rules; the margin (lowest genuine score minus highest impostor score) says how
cleanly a threshold separates him from everyone else. Genuine faces are the
Obama photos not enrolled (a photo of the guest the platform has not seen).

    .venv/bin/python bench/guest_selfies.py [--out bench/results/guest_selfies.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.quality_gate import faces_of, sface_and_photos  # noqa: E402
from pipeline.facelib.spec import SFACE_SPEC  # noqa: E402

OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")


def rule_scores(selfies: np.ndarray, faces: np.ndarray) -> dict[str, np.ndarray]:
    """Each face's score for the guest under the max rule and the mean-embedding rule."""
    mean = selfies.mean(axis=0)
    mean /= np.linalg.norm(mean)
    return {"max": (faces @ selfies.T).max(axis=1), "mean": faces @ mean}


def main() -> int:
    """Print the table and write JSON (for BENCHMARKS.md)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "guest_selfies.json")
    args = parser.parse_args()
    model, photos = sface_and_photos()
    import cv2

    faces = {name: faces_of(model, cv2.imread(str(path))) for name, path in sorted(photos.items())
             if not name.startswith("obama_partial")}
    rows = []
    print(f"| enrolled | rule | lowest genuine | highest impostor | margin | found at {SFACE_SPEC.default_threshold} |")
    print("|---|---|---|---|---|---|")
    for size in (1, 2):
        for enrolled in itertools.combinations(OBAMA, size):
            selfies = np.stack([faces[name][0].embedding for name in enrolled])
            genuine = np.stack([faces[n][0].embedding for n in OBAMA if n not in enrolled])
            impostors = np.stack([f.embedding for n, fs in faces.items() if n not in OBAMA for f in fs])
            for rule in ("max", "mean") if size > 1 else ("max",):
                good = rule_scores(selfies, genuine)[rule]
                bad = rule_scores(selfies, impostors)[rule]
                found = int((good >= SFACE_SPEC.default_threshold).sum())
                row = {"enrolled": list(enrolled), "rule": rule, "lowest_genuine": float(good.min()),
                       "highest_impostor": float(bad.max()), "margin": float(good.min() - bad.max()),
                       "genuine_found": found, "genuine": len(good), "impostors": len(bad)}
                rows.append(row)
                print(f"| {' + '.join(enrolled)} | {rule} | {row['lowest_genuine']:.3f} | "
                      f"{row['highest_impostor']:.3f} | {row['margin']:.3f} | {found}/{len(good)} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "threshold": SFACE_SPEC.default_threshold}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
