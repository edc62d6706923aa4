"""Decision API settings: one frozen object, built once in the app factory's caller."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stream_engine.settings import DEFAULT_KAFKA_BOOTSTRAP, DEFAULT_REDIS_URL, from_environment

DEFAULT_API_PORT = 8000


@dataclass(frozen=True, slots=True)
class Settings:
    """Environment: KAIROS_<FIELD> (e.g. KAIROS_API_PORT)."""

    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "kairos"
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    # Budget for one Redis round trip on the request path (the decision deadline is longer).
    redis_timeout_ms: float = 8.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return from_environment(cls, env)
