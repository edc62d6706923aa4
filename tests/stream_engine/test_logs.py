from __future__ import annotations

import logging

import orjson
import pytest

from stream_engine.exceptions import ConfigError
from stream_engine.logs import JsonFormatter
from stream_engine.settings import Settings


def test_json_lines_carry_message_level_and_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "kairos.worker", "levelno": logging.WARNING, "levelname": "WARNING",
         "msg": "retrying batch in %.2fs", "args": (0.5,), "partition": 3}
    )  # fmt: skip
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "retrying batch in 0.50s"
    assert line["level"] == "warning"
    assert line["logger"] == "kairos.worker"
    assert line["partition"] == 3
    assert line["ts"].endswith("Z")


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="KAIROS_LOG_FORMAT"):
        Settings(log_format="yaml")
