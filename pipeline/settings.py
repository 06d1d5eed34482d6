"""Typed settings from the environment (prefix FACEMATCH_), built in main().

Nothing here is read at import time: each service's main() calls the
constructors, so tests can build settings with explicit values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """How to reach the brokers (FACEMATCH_KAFKA_*, or KAFKA_BOOTSTRAP_SERVERS)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_KAFKA_", frozen=True, populate_by_name=True)

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("FACEMATCH_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"))
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 1000

    def to_librdkafka(self) -> dict[str, Any]:
        """Connection part of a confluent-kafka config."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers,
                                "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        return conf


class LogSettings(BaseSettings):
    """Logging (FACEMATCH_LOG_*); main() builds it and passes level and format to setup_logging."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_", frozen=True)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line (ts, level, logger, msg, pid, exc)
    log_summary_interval_s: float = Field(default=60.0, ge=0)  # periodic per-stage INFO summary; 0 disables


class TopicSettings(BaseSettings):
    """Topic names and sizes (FACEMATCH_TOPIC_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_TOPIC_", frozen=True)

    prefix: str = "facematch."
    partitions: int = 12
    replication_factor: int = 1
    reply_partitions: int = 4
    dlq_partitions: int = 3
    # Match requests carry selfie embeddings: kept minutes, not days (pipeline/topics.py derives the bound).
    request_retention_ms: int = 120_000

    @property
    def photo_events(self) -> str:
        """Photo uploaded/changed/deleted, keyed and partitioned by event_id."""
        return f"{self.prefix}photo-events"

    @property
    def faces(self) -> str:
        """Compacted changelog of the indexes, co-partitioned with match requests."""
        return f"{self.prefix}faces"

    @property
    def match_requests(self) -> str:
        """Queries, partitioned by event_id like faces."""
        return f"{self.prefix}match-requests"

    @property
    def match_replies(self) -> str:
        """Answers; each bridge instance reads its own partition."""
        return f"{self.prefix}match-replies"

    @property
    def dlq(self) -> str:
        """Dead letters of every stage."""
        return f"{self.prefix}dlq"

    @property
    def guests(self) -> str:
        """Compacted: enrolled guests and exclusions, co-partitioned with faces."""
        return f"{self.prefix}guests"

    @property
    def notifications(self) -> str:
        """Compacted: one record per guest and matching photo, co-partitioned with faces."""
        return f"{self.prefix}match-notifications"


class ModelSettings(BaseSettings):
    """Which face model pack (FACEMATCH_MODEL, FACEMATCH_MODEL_ROOT...)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_", frozen=True)

    model: str = "sface"  # sface | buffalo_l | none (precomputed embeddings only)
    model_root: Path = Path(".cache/models")
    embedding_dim: int = 512  # only used when model == "none"
    det_threshold: float | None = None  # None: the pack's own default (SFace 0.8, InsightFace 0.5)


class RunnerSettings(BaseSettings):
    """The shared consume/process/produce loop (FACEMATCH_RUNNER_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_RUNNER_", frozen=True)

    batch_size: int = 64
    poll_timeout_s: float = 0.1
    max_attempts: int = 4
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    fetch_wait_max_ms: int = 5
    stats_interval_ms: int = 5000
    # A batch blocks the poll thread for stage.handle() + up to 2 x flush_timeout_s
    # (retries never sleep there); keep that well under max_poll_interval_ms.
    max_poll_interval_ms: int = 300_000
    flush_timeout_s: float = 30.0
    # How long an output to a topic the brokers do not know waits before it is dead-lettered.
    unknown_topic_timeout_ms: int = 5000


class EmbedderSettings(BaseSettings):
    """The embedder service (FACEMATCH_EMBEDDER_*, fetch limits FACEMATCH_FETCH_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_", frozen=True)

    embedder_group: str = "facematch-embedder"
    embedder_batch_size: int = 16  # photos a batch (fetched and embedded together)
    # Without a model (FACEMATCH_MODEL=none) every record carries its embeddings and costs ~0.1 ms, so
    # batches are larger: fewer waits for acks. 16 a batch held precomputed ingest to ~4,000 faces/s here.
    embedder_precomputed_batch_size: int = Field(default=256, ge=1)
    embedder_max_side: int = 640
    embedder_metrics_port: int = 0
    # Keys faces as event/photo/<model id>, so this model's faces live beside another model's on the
    # compacted faces topic: for embedders that re-embed events with a new model (docs/reembed.md).
    embedder_model_keys: bool = False
    fetch_allow_list: str = ""
    fetch_connect_timeout_s: float = 3.0
    fetch_read_timeout_s: float = 10.0
    fetch_total_timeout_s: float = 20.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_max_pixels: int = 40_000_000


class QualitySettings(BaseSettings):
    """The face quality gate of the embedder and the bridge's selfies (FACEMATCH_QUALITY_*); 0 disables a check.

    Defaults measured on the real test photos with YuNet + SFace: docs/quality.md.
    """

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_QUALITY_", frozen=True)

    min_face_px: float = Field(default=40.0, ge=0)  # shorter side of the face box, original-image pixels
    min_det_score: float = Field(default=0.0, ge=0, le=1)  # 0: the pack's detector threshold alone decides
    min_sharpness: float = Field(default=10.0, ge=0)  # variance of the Laplacian of the 112 px aligned crop


class IndexerSettings(BaseSettings):
    """The indexer + match service (FACEMATCH_INDEXER_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_INDEXER_", frozen=True)

    group: str = "facematch-indexer"
    state_dir: Path = Path(".state/indexer")
    snapshot_interval_s: float = 30.0
    snapshot_min_records: int = 1
    metrics_port: int = 0
    max_top_k: int = 1000
    # An event's exact index becomes IVF-SQ8 above this many faces (0: never); see pipeline/indexer/promotion.py.
    index_promote_at: int = 100_000
    index_nprobe: int = 64  # inverted lists scanned per query, at least
    index_probe_fraction: float = 0.15  # ...and at least this share of them (recall as events grow)
    index_regrow_factor: float = 4.0  # retrain once an event has grown this many times past its last build
    index_build_threads: int = 1  # OpenMP threads of the background build; the other core keeps answering
    # Direct queries (pipeline/direct.py): bridges ask the owner of an event's partition over TCP
    # instead of through Kafka. Bind it where only the bridges reach it (it answers any query).
    direct_queries: bool = True
    query_host: str = "127.0.0.1"
    query_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port (several indexers on one host)
    query_advertised_host: str = ""  # what bridges connect to; empty: query_host (the host name if it binds all)
    # Re-embedding (docs/reembed.md): models whose faces build an event's next index beside the
    # current one, "model_id:dim,model_id:dim" (e.g. "insightface-buffalo_l:512").
    extra_models: str = ""

    def extra_model_dims(self) -> tuple[tuple[str, int], ...]:
        """FACEMATCH_INDEXER_EXTRA_MODELS parsed; ValueError naming the bad entry."""
        pairs = []
        for entry in filter(None, (e.strip() for e in self.extra_models.split(","))):
            model_id, _, dim = entry.rpartition(":")
            if not model_id or not dim.isdigit() or int(dim) <= 0:
                raise ValueError(f"FACEMATCH_INDEXER_EXTRA_MODELS: {entry!r} is not model_id:dim")
            pairs.append((model_id, int(dim)))
        return tuple(pairs)


class BridgeSettings(BaseSettings):
    """The HTTP bridge (FACEMATCH_HTTP_*, FACEMATCH_BRIDGE_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_", frozen=True)

    http_host: str = "127.0.0.1"
    http_port: int = 5000
    # None: each bridge process (each worker) claims a free reply partition by itself
    # (an exclusive lock per partition in bridge_runtime_dir); a number pins it.
    bridge_reply_partition: int | None = Field(default=None, ge=0)
    bridge_reply_partitions: str = ""  # the partitions this host may claim, "0-3,8"; empty: all of them
    bridge_runtime_dir: Path | None = None  # the claim locks; None: <tmp>/facematch-<uid>
    bridge_workers: int = Field(default=1, ge=1)  # uvicorn worker processes of `facematch bridge`
    bridge_model_instances: int = Field(default=1, ge=1)  # selfie models per worker (each runs one image at a time)
    bridge_timeout_s: float = 5.0
    # Ask the indexer that owns an event directly (pipeline/direct.py); Kafka when it cannot answer.
    bridge_direct_queries: bool = True
    bridge_direct_timeout_s: float = Field(default=1.0, gt=0)  # then the query goes through Kafka
    bridge_publish_timeout_s: float = 5.0  # broker unreachable this long: 503 + Retry-After
    bridge_max_image_bytes: int = 10 * 1024 * 1024
    api_keys: str = ""  # "sha256:<hex>:role:event,event;..." (`facematch keys hash`); empty disables auth
    # Signs guest tokens (pipeline/matcher/guest_tokens.py); every bridge process needs the same one.
    # Unset: a random secret per process, so tokens work only where they were issued (development).
    guest_token_secret: SecretStr | None = None
    guest_token_ttl_s: int = Field(default=30 * 86_400, ge=60)
