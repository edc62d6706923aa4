from __future__ import annotations

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
