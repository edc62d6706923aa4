"""Stream engine settings: one frozen object, built once from the environment in `main`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from stream_engine.exceptions import ConfigError

T = TypeVar("T")

DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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


def from_environment(cls: type[T], env: Mapping[str, str], prefix: str = "KAIROS_") -> T:
    """Build a settings dataclass from `PREFIX<FIELD NAME>` variables, keeping the defaults.

    A malformed value raises ConfigError naming the variable, never a bare ValueError.
    """
    values: dict[str, Any] = {}
    for field in fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}{field.name.upper()}"
        if name not in env:
            continue
        parse = _PARSERS[str(field.type)]
        try:
            values[field.name] = parse(env[name])
        except ValueError as exc:
            raise ConfigError(f"{name}={env[name]!r}: {exc}") from None
    return cls(**values)


@dataclass(frozen=True, slots=True)
class Settings:
    """What a stream worker needs. Environment: KAIROS_<FIELD> (e.g. KAIROS_KAFKA_BOOTSTRAP)."""

    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    redis_url: str = DEFAULT_REDIS_URL
    # Prefix for every Redis key this deployment writes; tests use a unique one each.
    key_prefix: str = "kairos"
    clickstream_topic: str = "clickstream"
    dlq_topic: str = "clickstream.dlq"
    catalog_topic: str = "catalog"
    decisions_topic: str = "decisions"
    consumer_group: str = "kairos-stream"
    partitions: int = 4

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"KAIROS_PARTITIONS must be >= 1, got {self.partitions}")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise ConfigError(
                f"KAIROS_KEY_PREFIX must be non-empty and free of braces, got {self.key_prefix!r}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return from_environment(cls, env)
