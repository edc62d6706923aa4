from __future__ import annotations

import re

import pytest

from stream_engine.exceptions import ConfigError
from stream_engine.settings import Settings


def test_defaults_point_at_the_local_stack() -> None:
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.clickstream_topic == "clickstream"
    assert s.dlq_topic == "clickstream.dlq"


def test_environment_overrides_and_parses_types() -> None:
    s = Settings.from_env({"KAIROS_PARTITIONS": "8", "KAIROS_KEY_PREFIX": "shop1"})
    assert s.partitions == 8
    assert s.key_prefix == "shop1"


def test_malformed_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="KAIROS_PARTITIONS='many'"):
        Settings.from_env({"KAIROS_PARTITIONS": "many"})


@pytest.mark.parametrize("prefix", ["", "a{b}"])
def test_key_prefix_must_not_break_the_hash_tag(prefix: str) -> None:
    with pytest.raises(ConfigError, match="KAIROS_KEY_PREFIX"):
        Settings(key_prefix=prefix)


def test_a_batch_may_wait_for_nothing_but_not_for_negative_time() -> None:
    assert Settings.from_env({"KAIROS_BATCH_WITHIN_MS": "0"}).batch_within_ms == 0
    with pytest.raises(ConfigError, match="KAIROS_BATCH_WITHIN_MS >= 0"):
        Settings.from_env({"KAIROS_BATCH_WITHIN_MS": "-1"})


@pytest.mark.parametrize(
    ("url", "says"),
    [("localhost:6379", "must specify one of the following schemes"),
     ("redis://db:port/0", "Port could not be cast"),
     ("redis://:s3cret@db:6379/cache", "'redis://***@db:6379/cache': the database must be")],
)  # fmt: skip
def test_a_redis_url_redis_py_cannot_use_or_would_misread_is_refused(url: str, says: str) -> None:
    """A URL without a scheme was a traceback from whichever client connected first; a
    database that is not a number was quietly database 0. Both settings objects refuse it,
    the password masked."""
    from api.settings import Settings as ApiSettings

    for settings in (Settings, ApiSettings):
        with pytest.raises(ConfigError, match="KAIROS_REDIS_URL=") as refused:
            settings.from_env({"KAIROS_REDIS_URL": url})
        assert says in str(refused.value)
        assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("url", ["redis://db:6379", "redis://db:6379/3", "rediss://u:p@db/0",
                                 "unix:///run/redis.sock"])  # fmt: skip
def test_the_redis_urls_redis_py_takes_are_taken(url: str) -> None:
    assert Settings.from_env({"KAIROS_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    "bootstrap", ["127.0.0.1:abc", "", "kafka://127.0.0.1:9092", "a:1,,b:2", "db", "db:0"]
)
def test_a_kafka_bootstrap_the_clients_would_misread_is_refused(bootstrap: str) -> None:
    """aiokafka raised a traceback on a port that is not a number; librdkafka (the API's
    publisher) took it as port 0, and ran without a broker on an empty list or a URL."""
    from api.settings import Settings as ApiSettings

    for settings in (Settings, ApiSettings):
        with pytest.raises(ConfigError, match=f"KAIROS_KAFKA_BOOTSTRAP={bootstrap!r}"):
            settings.from_env({"KAIROS_KAFKA_BOOTSTRAP": bootstrap})


@pytest.mark.parametrize("bootstrap", ["kafka:9092", "[::1]:9092", "a:9092, b:9093"])
def test_the_kafka_bootstraps_the_clients_take_are_taken(bootstrap: str) -> None:
    assert Settings.from_env({"KAIROS_KAFKA_BOOTSTRAP": bootstrap}).kafka_bootstrap == bootstrap


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [("KAIROS_SESSION_TTL_S", "0", "KAIROS_SESSION_TTL_S must be > 0, got 0"),
     ("KAIROS_ERASURE_TTL_S", "-1", "KAIROS_ERASURE_TTL_S must be > 0, got -1"),
     ("KAIROS_METRICS_PORT", "70000", "KAIROS_METRICS_PORT must be a port"),
     ("KAIROS_CLICKSTREAM_TOPIC", "", "KAIROS_CLICKSTREAM_TOPIC must be 1-249 of"),
     ("KAIROS_DLQ_TOPIC", "dead letters", "KAIROS_DLQ_TOPIC must be 1-249 of"),
     ("KAIROS_CONSUMER_GROUP", "..", "KAIROS_CONSUMER_GROUP must be 1-249 of"),
     ("KAIROS_LOG_LEVEL", "LOUD", "KAIROS_LOG_LEVEL must be one of DEBUG"),
     ("KAIROS_FETCH_MAX_WAIT_MS", "-5", "KAIROS_FETCH_MAX_WAIT_MS must be >= 0"),
     ("KAIROS_ISOLATION_LEVEL", "committed",
      "KAIROS_ISOLATION_LEVEL must be one of read_committed, read_uncommitted")],
)  # fmt: skip
def test_a_worker_setting_that_would_fail_on_every_use_is_refused_at_start(
    variable: str, value: str, says: str
) -> None:
    """A TTL of 0 started, then every write failed (Redis refuses PX 0); a log level
    logging does not know was a traceback; a topic name Kafka refuses, a failure later."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("KAIROS_KEY_PREFIX", "{x}"), ("KAIROS_LOG_FORMAT", "xml"), ("KAIROS_LOG_LEVEL", "LOUD"),
     ("KAIROS_API_PORT", "70000"), ("KAIROS_REFRESH_INTERVAL_S", "0"),
     ("KAIROS_USER_HALF_LIFE_S", "0"), ("KAIROS_ERASURE_TTL_S", "-1"),
     ("KAIROS_DECISIONS_TOPIC", "")],
)  # fmt: skip
def test_the_api_refuses_the_same_kind_of_setting(variable: str, value: str) -> None:
    """The API took every one of these (a key prefix with braces read other keys than the
    worker wrote; a refresh interval of 0 refreshed back to back, on Redis)."""
    from api.settings import Settings as ApiSettings

    with pytest.raises(ConfigError, match=variable):
        ApiSettings.from_env({variable: value})


def test_a_log_level_in_lower_case_is_taken() -> None:
    assert Settings.from_env({"KAIROS_LOG_LEVEL": "debug"}).log_level == "debug"
