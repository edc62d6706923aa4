"""deploy/compose.yaml can't run here (no Docker); check it agrees with the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from api.settings import Settings as ApiSettings
from stream_engine.settings import Settings as StreamSettings

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_services_are_the_documented_topology() -> None:
    assert set(_compose()["services"]) == {"kafka", "redis", "worker", "api"}


def test_published_ports_match_the_default_settings() -> None:
    services = _compose()["services"]
    stream, api = StreamSettings(), ApiSettings()
    kafka_port = stream.kafka_bootstrap.rsplit(":", 1)[1]
    redis_port = stream.redis_url.rsplit(":", 1)[1].split("/")[0]
    assert f"127.0.0.1:{kafka_port}:9092" in services["kafka"]["ports"]
    assert f"127.0.0.1:{redis_port}:6379" in services["redis"]["ports"]
    assert f"127.0.0.1:{api.api_port}:{api.api_port}" in services["api"]["ports"]


def test_app_services_reach_kafka_and_redis_by_service_name() -> None:
    services = _compose()["services"]
    listeners = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("worker", "api"):
        env = services[name]["environment"]
        settings = StreamSettings.from_env(env)
        assert settings.kafka_bootstrap == "kafka:9092"
        assert f"//{settings.kafka_bootstrap}" in listeners
        assert settings.redis_url.startswith("redis://redis:")
        assert set(services[name]["depends_on"]) == {"kafka", "redis"}
    assert ApiSettings.from_env(services["api"]["environment"]).api_port == 8000
