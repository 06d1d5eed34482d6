"""The official Cloud Firestore emulator, once per test run, and a fresh project per test.

Import from tests/conftest.py: `from tests.firestore_fixtures import *`.
FIRESTORE_EMULATOR_HOST, when set, points at an emulator that is already
running. Without the jar the tests that need it skip loudly, or fail when
FACEMATCH_REQUIRE_FIRESTORE=1 (CI images that must have it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.devbroker import free_port

JAR_IN_SDK = Path("platform/cloud-firestore-emulator/cloud-firestore-emulator.jar")
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
MISSING = ("Cloud Firestore emulator jar not found: install the apt package "
           "google-cloud-cli-firestore-emulator (and a Java 11+ runtime), or set "
           "FACEMATCH_FIRESTORE_EMULATOR_JAR; Firestore tests are SKIPPED")

__all__ = ["firestore_emulator", "firestore_project", "firestore_db"]


def emulator_jar() -> Path | None:
    """The emulator jar: FACEMATCH_FIRESTORE_EMULATOR_JAR, else under gcloud's SDK root."""
    override = os.environ.get("FACEMATCH_FIRESTORE_EMULATOR_JAR")
    if override:
        return Path(override) if Path(override).is_file() else None
    roots = []
    if shutil.which("gcloud"):
        try:
            out = subprocess.run(["gcloud", "info", "--format=value(installation.sdk_root)"],
                                 capture_output=True, text=True, timeout=30, check=False)
            roots.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    roots += [Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk")]
    for root in roots:
        if str(root) and (root / JAR_IN_SDK).is_file():
            return root / JAR_IN_SDK
    return None


def _skip_loudly(reason: str) -> None:
    if os.environ.get("FACEMATCH_REQUIRE_FIRESTORE") == "1":
        pytest.fail(reason)
    warnings.warn(reason, stacklevel=2)  # shows in the summary even under -q
    pytest.skip(reason)


def _wait_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Firestore emulator exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.read().strip() == b"Ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Firestore emulator not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def start_emulator(jar: Path, port: int, log: Path, timeout_s: float = 60) -> subprocess.Popen[bytes]:
    """Start the emulator on 127.0.0.1:port; returns once GET / answers Ok."""
    # java directly: the gcloud wrapper script leaves java orphaned when killed.
    with log.open("ab") as out:
        proc = subprocess.Popen(["java", "-Duser.language=en", "-Xmx512m", "-cp", str(jar), MAIN_CLASS, "start",
                                 "--host=127.0.0.1", f"--port={port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ok(f"http://127.0.0.1:{port}/", proc, log, timeout_s)
    except BaseException:
        stop_emulator(proc)
        raise
    return proc


def stop_emulator(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def require_emulator_jar() -> Path:
    """The jar, or a loud skip (a failure under FACEMATCH_REQUIRE_FIRESTORE=1)."""
    jar = emulator_jar()
    if jar is None or not shutil.which("java"):
        _skip_loudly(MISSING)
    assert jar is not None
    return jar


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a running Cloud Firestore emulator."""
    external = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if external:
        yield external
        return
    jar = require_emulator_jar()
    port = free_port()
    proc = start_emulator(jar, port, tmp_path_factory.mktemp("firestore") / "emulator.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_emulator(proc)


@pytest.fixture
def firestore_project(firestore_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh project id (isolates tests); FIRESTORE_EMULATOR_HOST set for in-process clients."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def firestore_db(firestore_project: str) -> Iterator[Any]:
    """A client of the emulator on this test's project."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    client = firestore.Client(project=firestore_project, credentials=AnonymousCredentials())
    yield client
    client.close()

