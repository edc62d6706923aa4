"""Stream engine settings: one frozen object, built once from the environment in `main`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from stream_engine.exceptions import ConfigError
from stream_engine.kafka_security import KafkaSecurity
from stream_engine.store import check_redis_url

T = TypeVar("T")

DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENGINES = ("faust", "aiokafka", "librdkafka")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")


def check_kafka_bootstrap(value: str, name: str = "KAIROS_KAFKA_BOOTSTRAP") -> None:
    """Refuse (ConfigError) a bootstrap list the Kafka clients would misread: each entry is
    host:port (aiokafka raised a traceback on a port that is not a number, librdkafka took
    it as port 0; an empty list or a URL scheme left the API's publisher never connecting)."""
    entries = [e.strip() for e in value.split(",")]
    if not value.strip() or not all(entries):
        raise ConfigError(f"{name}={value!r}: expected host:port[,host:port...]")
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if "://" in entry or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}={value!r}: {entry!r} is not host:port (e.g. 127.0.0.1:9092)")


KAFKA_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # a topic or group name Kafka takes
LOG_FORMATS = ("text", "json")


def _var(field_name: str) -> str:
    return f"KAIROS_{field_name.upper()}"


def check_fields(
    settings: Any,
    *,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    ports: Iterable[str] = (),
    kafka_names: Iterable[str] = (),
) -> None:
    """Refuse (ConfigError, naming the variable) a setting that would start and then fail
    on every use: a TTL of 0 (Redis refuses PX 0, so every write failed), a port past
    65535, a topic name Kafka refuses."""
    for name in positive:
        if not (value := getattr(settings, name)) > 0:
            raise ConfigError(f"{_var(name)} must be > 0, got {value!r}")
    for name in non_negative:
        if not (value := getattr(settings, name)) >= 0:
            raise ConfigError(f"{_var(name)} must be >= 0, got {value!r}")
    for name in ports:
        if not 0 <= (value := getattr(settings, name)) <= 65535:
            raise ConfigError(f"{_var(name)} must be a port, 0 to 65535, got {value!r}")
    for name in kafka_names:
        value = getattr(settings, name)
        if not KAFKA_NAME.fullmatch(value) or value in (".", ".."):
            raise ConfigError(f"{_var(name)} must be 1-249 of A-Z a-z 0-9 . _ -, got {value!r}")


def check_shared(settings: Any) -> None:
    """What the worker's and the API's settings have in common: where Redis and Kafka are,
    the key prefix and the logs."""
    check_redis_url(settings.redis_url)
    check_kafka_bootstrap(settings.kafka_bootstrap)
    prefix = settings.key_prefix
    if not prefix or "{" in prefix or "}" in prefix:
        raise ConfigError(f"KAIROS_KEY_PREFIX must be non-empty and free of braces, got {prefix!r}")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"KAIROS_LOG_FORMAT must be text or json, got {settings.log_format!r}")
    if settings.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(
            "KAIROS_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
            f"got {settings.log_level!r}"
        )


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true/false")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _parse_bool,
}
# Fields that are settings objects of their own, read from the same environment with
# their own variables' prefix (KafkaSecurity: KAIROS_KAFKA_*).
_NESTED: dict[str, Callable[[Mapping[str, str]], Any]] = {"KafkaSecurity": KafkaSecurity.from_env}


def from_environment(cls: type[T], env: Mapping[str, str], prefix: str = "KAIROS_") -> T:
    """Build a settings dataclass from `PREFIX<FIELD NAME>` variables, keeping the defaults.

    A malformed value raises ConfigError naming the variable, never a bare ValueError.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if (nested := _NESTED.get(str(f.type))) is not None:
            values[f.name] = nested(env)
            continue
        name = f"{prefix}{f.name.upper()}"
        if name not in env:
            continue
        parse = _PARSERS[str(f.type)]
        try:
            values[f.name] = parse(env[name])
        except ValueError as exc:
            raise ConfigError(f"{name}={env[name]!r}: {exc}") from None
    return cls(**values)


@dataclass(frozen=True, slots=True)
class Settings:
    """What a stream worker needs. Environment: KAIROS_<FIELD> (e.g. KAIROS_KAFKA_BOOTSTRAP)."""

    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    # TLS and SASL for every Kafka client of the worker (KAIROS_KAFKA_SECURITY_PROTOCOL...)
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity)
    redis_url: str = DEFAULT_REDIS_URL
    # Prefix for every Redis key this deployment writes; tests use a unique one each.
    key_prefix: str = "kairos"
    clickstream_topic: str = "clickstream"
    dlq_topic: str = "clickstream.dlq"
    catalog_topic: str = "catalog"
    decisions_topic: str = "decisions"
    consumer_group: str = "kairos-stream"
    # "faust" (the faust agent), "aiokafka" (the plain consumer loop; consumer.py) or
    # "librdkafka" (the same loop on confluent-kafka; rdkafka_consumer.py)
    engine: str = "faust"
    partitions: int = 4
    # Catalog file (JSONL or CSV); empty = generate the demo catalog into the stack dir.
    catalog_path: str = ""
    # Micro-batches (faust engine): a batch starts with its first event and is flushed at
    # batch_max events or batch_within_ms later, whichever is first
    # (faust_transport.Handoff.take). 0: no wait; the batch takes what the fetches handed
    # over while the batch before it was applied (session 16, with faust's stream then:
    # at 1,000 events/s p99 6.7 / 5.0 ms against 8.0 / 8.2 with 1 ms, same CPU). The plain
    # engines take what a fetch returned, up to batch_max.
    batch_max: int = 500
    batch_within_ms: float = 0.0
    # faust engine: a batch of this many events or more is applied in parts by partition
    # at once (app.split_batch), a smaller one whole; and while one batch is applied,
    # another starts only once this many events wait (app.PartitionLanes).
    faust_split_from: int = 64
    # plain engines: commit applied offsets at most this often (fences cover redelivery).
    commit_interval_ms: int = 200
    # plain engines: let the broker gather up to fetch_min_bytes for up to fetch_max_wait_ms
    # before answering a fetch. Each fetch is a broker request (and in aiokafka a Python
    # protocol round trip); with 1 byte the wait only bounds a fetch that finds nothing.
    fetch_min_bytes: int = 1
    fetch_max_wait_ms: int = 100
    # What the clickstream and catalog consumers read of a transactional producer's records,
    # every engine alike. read_committed skips what its transactions aborted and waits for
    # their commits (and so does whatever follows an open transaction on its partition);
    # read_uncommitted applies every record at once, aborted ones too. Records of producers
    # without transactions are read at once either way. The default is librdkafka's;
    # aiokafka's and faust's is read_uncommitted (docs/events.md).
    isolation_level: str = "read_committed"
    # partitions are applied in this many lanes at once (partition % lanes), each with its
    # own Redis connection, so one lane's Redis round trips overlap another's planning.
    # Plain engines: a partition stays in one lane, so events of a session stay in order.
    # faust: up to this many batches run at once, each on a lane of its own and of
    # partitions no other running batch holds, so a session's events stay in order
    # (app.PartitionLanes). More lanes than partitions assigned to the worker are idle;
    # the default is one per partition.
    lanes: int = 4
    session_half_life_s: float = 1800.0
    user_half_life_s: float = 14 * 86400.0
    covisit_half_life_s: float = 7 * 86400.0
    trending_half_life_s: float = 6 * 3600.0
    session_ttl_s: int = 2 * 3600
    user_ttl_s: int = 90 * 86400
    aggregate_ttl_s: int = 14 * 86400
    # How long an erasure or consent block outlives the data: at least topic retention, so a
    # replay of the retained clickstream can't bring erased state back.
    erasure_ttl_s: int = 30 * 86400
    # A crashed worker's partitions wait this long for the group to notice (faust: 60 s).
    group_session_timeout_s: float = 10.0
    metrics_port: int = 9464
    log_format: str = "text"  # or "json": one object a line
    log_level: str = "INFO"
    redis_pool_size: int = 8
    # A click counts for a decision that showed the item at most this long before.
    attribution_window_s: float = 1800.0
    # Sessions whose last written state a worker keeps, to skip reading them back (0 = off).
    session_cache_size: int = 50_000
    # Learned item embeddings (stream_engine/latent.py): how often the learner refreshes
    # them, from how many of the most co-visited items, and how often workers look.
    latent_refresh_s: float = 60.0
    latent_max_items: int = 20_000
    latent_poll_s: float = 2.0
    # While the decision API reports slow Redis reads, halve the rate events are applied at,
    # down to yield_min_rate events/s (stream_engine/pressure.py). Binds only a worker
    # applying faster than that: one catching up a backlog.
    yield_to_api: bool = True
    yield_min_rate: int = 2000

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"KAIROS_PARTITIONS must be >= 1, got {self.partitions}")
        if self.engine not in ENGINES:
            raise ConfigError(
                f"KAIROS_ENGINE must be one of {', '.join(ENGINES)}, got {self.engine!r}"
            )
        if self.isolation_level not in ISOLATION_LEVELS:
            raise ConfigError(
                f"KAIROS_ISOLATION_LEVEL must be one of {', '.join(ISOLATION_LEVELS)}, "
                f"got {self.isolation_level!r}"
            )
        if self.faust_split_from < 1:
            raise ConfigError(f"KAIROS_FAUST_SPLIT_FROM must be >= 1, got {self.faust_split_from}")
        if self.lanes < 1:
            raise ConfigError(f"KAIROS_LANES must be >= 1, got {self.lanes}")
        if self.batch_max < 1 or self.batch_within_ms < 0:
            raise ConfigError("KAIROS_BATCH_MAX must be >= 1 and KAIROS_BATCH_WITHIN_MS >= 0")
        if min(self.session_half_life_s, self.user_half_life_s, self.covisit_half_life_s,
               self.trending_half_life_s) <= 0:  # fmt: skip
            raise ConfigError("half-lives (KAIROS_*_HALF_LIFE_S) must be > 0")
        if self.latent_refresh_s <= 0 or self.latent_max_items < 1 or self.latent_poll_s <= 0:
            raise ConfigError(
                "KAIROS_LATENT_REFRESH_S and KAIROS_LATENT_POLL_S must be > 0 and "
                "KAIROS_LATENT_MAX_ITEMS >= 1"
            )
        if self.yield_min_rate < 1:
            raise ConfigError(f"KAIROS_YIELD_MIN_RATE must be >= 1, got {self.yield_min_rate}")
        check_shared(self)
        check_fields(
            self,
            positive=("session_ttl_s", "user_ttl_s", "aggregate_ttl_s", "erasure_ttl_s",
                      "commit_interval_ms", "fetch_min_bytes", "group_session_timeout_s",
                      "redis_pool_size", "attribution_window_s"),
            non_negative=("fetch_max_wait_ms", "session_cache_size"),
            ports=("metrics_port",),
            kafka_names=("clickstream_topic", "dlq_topic", "catalog_topic", "decisions_topic",
                         "consumer_group"),
        )  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return from_environment(cls, env)
