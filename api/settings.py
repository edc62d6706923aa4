"""Decision API settings: one frozen object, built once in the app factory's caller."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from api.limits import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_HEADER_BYTES, SEND_TIMEOUT_S
from stream_engine.exceptions import ConfigError
from stream_engine.kafka_security import KafkaSecurity
from stream_engine.settings import (
    DEFAULT_KAFKA_BOOTSTRAP,
    DEFAULT_REDIS_URL,
    check_fields,
    check_shared,
    from_environment,
)

DEFAULT_API_PORT = 8000
PLACEHOLDER_TOKENS = frozenset({"changeme", "changethis", "secret", "admin", "token"})


_ORIGIN = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[^/\s:?#\[\]]+)(:[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class Settings:
    """Environment: KAIROS_<FIELD> (e.g. KAIROS_API_PORT)."""

    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    # TLS and SASL for the exposures' and beacons' producers (KAIROS_KAFKA_SECURITY_PROTOCOL...)
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity)
    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "kairos"
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    # "local" allows an empty admin token (admin routes then answer 403); anything else
    # refuses to start without a real one.
    environment: str = "local"
    admin_token: str = ""
    # Decision config (YAML); empty = the demo config shipped in api/demo_config.yaml.
    config_path: str = ""
    # Catalog file, the same one the worker reads; empty = the demo catalog in stack_dir.
    catalog_path: str = ""
    stack_dir: str = ".stack"
    clickstream_topic: str = "clickstream"
    decisions_topic: str = "decisions"
    # Whole-decision deadline, and the budget of the Redis read within it (waiting for a
    # turn included). 15 ms leaves 5 for the decision (~0.3 ms) and the
    # answer. At 2,000 requests/s on the 2-core box an 8 ms budget sent 1.35-2.08% of
    # visitors to the defaults and 12 ms 0.11-0.55%; 15 ms timed out 44 reads in eight
    # steps where 12 ms timed out 101, at the same p99 (loadtest/JOURNAL.md, session 17).
    deadline_ms: float = 20.0
    redis_timeout_ms: float = 15.0
    # The held connections the state reads share, pipelined, and how many reads may be in
    # flight on them at once (a read past that waits for a turn within its budget). Four
    # connections each taking one read at a time timed out 19-111 reads a step at 2,000
    # requests/s waiting for one; sixteen reads in flight, none to two. At 3x, no errors
    # and p99 4.5-5.4 ms either way; 27-30% degraded against 16-24% (loadtest/JOURNAL.md,
    # session 31).
    redis_connections: int = 4
    redis_reads: int = 16
    # When > 0, the in-flight limit also shrinks while the API uses more than this share of
    # a core (over 100 ms windows), so overload sheds to the defaults instead of queueing in
    # front of the event loop, where no deadline sees it. 0.9 by default since session 14:
    # with a decision at ~365 µs of CPU the API runs at ~75% of a core at 2,000/s, where the
    # share costs nothing measurable (0.01-0.22% defaults with it, 0.00-0.08% without),
    # and at 6,000/s it keeps p99 at 5-11 ms instead of 19-28 ms. In session 11, at 84-93%
    # of a core, it had cost 3-14% defaults at 2,000/s. With the worker beside it (the peak
    # suite) the API stays under 60% of a core and the share never acts (loadtest/JOURNAL.md).
    max_cpu_share: float = 0.9
    # When > 0, the limit also shrinks while the event loop's thread waits for a core more
    # than this share of the time (Linux schedstat, smoothed over 100 ms windows) and the
    # API uses at least half a core: a machine full of other work (the worker, Redis, the
    # broker, a load generator) starves the loop, and requests queue in front of it where
    # neither the latency nor the API's own CPU share sees them. In the peak suite's
    # overload scenario the loop waited 20-55% of the time with the API at 72% of a core;
    # at 2,000 decisions/s on an otherwise quiet box, 0-7% (loadtest/JOURNAL.md, session 38).
    max_runqueue_share: float = 0.25
    # Must match the worker's KAIROS_USER_HALF_LIFE_S (the profile decays with it).
    user_half_life_s: float = 14 * 86400.0
    # Trending, catalog changes and config file changes are picked up this often.
    refresh_interval_s: float = 1.0
    # Must be at least the worker's KAIROS_ERASURE_TTL_S (erasures from /admin/erase).
    erasure_ttl_s: int = 30 * 86400
    publish_queue: int = 10_000
    max_body_bytes: int = 64 * 1024
    # A request's head and body, and a client's reading of the answer (api/server.py,
    # api/limits.py): header names and values at most this long (431 beyond), the head
    # complete this long after the connection opened or its first bytes (408), the body
    # this long after the endpoint starts reading it (408), an answer written within this
    # long once the client's buffers are full (else the connection is cut).
    max_header_bytes: int = MAX_HEADER_BYTES
    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    send_timeout_s: float = SEND_TIMEOUT_S
    # Comma-separated origins allowed to post beacons from a browser ("*" = any).
    cors_origins: str = ""
    log_format: str = "text"  # or "json"
    log_level: str = "INFO"
    # Adds GET /bench/static, the benchmark's same-process baseline endpoint.
    bench_static: bool = False

    def __post_init__(self) -> None:
        if self.environment != "local" and (
            len(self.admin_token) < 16 or self.admin_token.lower() in PLACEHOLDER_TOKENS
        ):
            raise ConfigError(
                "KAIROS_ADMIN_TOKEN must be a real secret (16+ chars) outside "
                f"KAIROS_ENVIRONMENT=local (environment is {self.environment!r})"
            )
        check_shared(self)
        check_fields(
            self,
            positive=("user_half_life_s", "refresh_interval_s", "erasure_ttl_s"),
            ports=("api_port",),
            kafka_names=("clickstream_topic", "decisions_topic"),
        )
        if not 0 < self.redis_timeout_ms < self.deadline_ms:
            raise ConfigError("KAIROS_REDIS_TIMEOUT_MS must be > 0 and < KAIROS_DEADLINE_MS")
        if not 0 <= self.max_cpu_share <= 1:
            raise ConfigError("KAIROS_MAX_CPU_SHARE must be between 0 and 1 (0 = off)")
        if not 0 <= self.max_runqueue_share <= 1:
            raise ConfigError("KAIROS_MAX_RUNQUEUE_SHARE must be between 0 and 1 (0 = off)")
        if (
            min(self.redis_connections, self.redis_reads, self.publish_queue) < 1
            or self.max_body_bytes < 1024
        ):
            raise ConfigError(
                "KAIROS_REDIS_CONNECTIONS, KAIROS_REDIS_READS and KAIROS_PUBLISH_QUEUE must be "
                ">= 1, KAIROS_MAX_BODY_BYTES >= 1024"
            )
        if (
            self.max_header_bytes < 1024
            or min(self.head_timeout_s, self.body_timeout_s, self.send_timeout_s) <= 0
        ):
            raise ConfigError(
                "KAIROS_MAX_HEADER_BYTES must be >= 1024, KAIROS_HEAD_TIMEOUT_S, "
                "KAIROS_BODY_TIMEOUT_S and KAIROS_SEND_TIMEOUT_S > 0"
            )

        for origin in self.origins:
            m = _ORIGIN.fullmatch(origin)
            if origin != "*" and (m is None or int((m.group(2) or ":0")[1:]) > 65535):
                raise ConfigError(
                    f"KAIROS_CORS_ORIGINS: {origin!r} is not an origin; a browser sends "
                    "scheme://host[:port], no path and no trailing slash (e.g. "
                    "https://shop.example), and an entry that differs never matches"
                )

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return from_environment(cls, env)
