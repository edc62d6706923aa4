"""`python -m stream_engine` commands, run as a person would, against the real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from stream_engine.catalog import load_items
from stream_engine.state import Keys
from tests.conftest import Stack


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_engine", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_catalog_command_writes_a_loadable_demo_catalog(tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    done = _run("catalog", "--out", str(out), "--items", "300", env={})
    assert done.returncode == 0, done.stderr
    items = load_items(out)
    assert len(items) == 300
    assert orjson.loads(out.read_text().splitlines()[0])["item_id"] == "sku-000000"


@pytest.mark.parametrize("items", ["0", "-1", "many"])
def test_a_catalog_of_no_items_is_refused_not_written(tmp_path: Path, items: str) -> None:
    """--items 0 wrote an empty file, which the worker and the API only refused later."""
    out = tmp_path / "c.jsonl"
    done = _run("catalog", "--out", str(out), "--items", items, env={})
    assert done.returncode == 2
    assert "argument --items:" in done.stderr
    assert not out.exists()


def test_bad_settings_fail_with_the_variable_named() -> None:
    done = _run("topics", env={"KAIROS_PARTITIONS": "lots"})
    assert done.returncode == 2
    assert "bad setting: KAIROS_PARTITIONS='lots'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
async def test_erase_command_removes_a_user_and_their_sessions(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    await redis_client.hset(keys.user("u1"), mapping={"s:s1": b"\x00" * 8, "n:s1": 1})
    await redis_client.sadd(keys.user_sessions("u1"), "s1")
    await redis_client.hset(keys.session("s1"), mapping={"n": 3, "o": 7, "p": 0, "v": b"x"})
    env = {"KAIROS_REDIS_URL": stack.redis_url, "KAIROS_KEY_PREFIX": key_prefix}
    done = _run("erase", "--user", "u1", env=env)
    assert done.returncode == 0, done.stderr
    assert "erased user u1 and 1 session(s)" in done.stdout
    assert await redis_client.exists(keys.user("u1")) == 0
    assert await redis_client.get(keys.user_block("u1")) == b"erased"
    assert await redis_client.get(keys.session_block("s1")) == b"erased"
    # Only the fence stays, so a replay of old offsets is still recognised.
    assert set(await redis_client.hkeys(keys.session("s1"))) == {b"o", b"p"}


def test_erase_needs_a_target() -> None:
    done = _run("erase", env={})
    assert done.returncode == 2
    assert "--user or --session" in done.stderr


def test_erase_refuses_an_id_no_event_could_carry() -> None:
    done = _run("erase", "--user", "bad id!", env={})
    assert done.returncode == 2
    assert "--user must be 1-128 characters" in done.stderr


def test_an_erase_that_redis_fails_says_so_and_that_it_can_be_run_again() -> None:
    done = _run("erase", "--session", "s1", env={"KAIROS_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 1
    assert "Redis failed" in done.stderr
    assert "run it again" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["worker", "attribution", "latent"])
def test_a_missing_or_malformed_catalog_stops_a_command_with_one_line(
    command: str, tmp_path: Path
) -> None:
    bad = tmp_path / "catalog.jsonl"
    bad.write_text('{"item_id": "a", "title": "t", "category": "A", "price": 1}\n{nope\n')
    for path, says in ((tmp_path / "none.jsonl", "catalog file not found"), (bad, ":2: not JSON")):
        done = _run(command, env={"KAIROS_CATALOG_PATH": str(path),
                                  "KAIROS_REDIS_URL": "redis://127.0.0.1:1/0"})  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert f"stream_engine {command}: {path}" in done.stderr
        assert says in done.stderr
        assert "Traceback" not in done.stderr


def test_topics_without_kafka_says_where_it_looked() -> None:
    done = _run("topics", env={"KAIROS_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert done.returncode == 1
    assert "stream_engine topics: Kafka at 127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr
