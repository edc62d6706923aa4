"""Batches and Shared on a real Redis: a round trip cut off anywhere leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_engine.store import Batches, Shared, connect, psubscribe
from tests.conftest import wait_for


@pytest.mark.integration
async def test_a_connect_cut_off_by_a_deadline_leaves_no_reply_for_the_next_call(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A call cut off by its deadline while connecting (redis-py's handshake, CLIENT
    SETINFO, runs inside the first call) or while reading must drop the connection: one
    that kept the late replies would hand them to the next call as its own, and leave that
    call's for the one after (the API would serve one visitor's state to the next)."""
    url, proc = private_redis
    client = connect(url, timeout_s=None)
    batches = Batches(client)
    try:
        await client.set("k", "v")
        proc.send_signal(signal.SIGSTOP)  # the kernel still accepts the connection
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await batches.execute([("GET", "k")])
        finally:
            proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)  # the handshake's replies arrive now, if anyone listens
        assert await batches.execute([("GET", "k")]) == [b"v"]
        assert await batches.execute([("GET", "missing"), ("GET", "k")]) == [None, b"v"]
        proc.send_signal(signal.SIGSTOP)  # now cut off a connected call mid-read
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await batches.execute([("SET", "k", "late"), ("GET", "k")])
        finally:
            proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)
        assert await batches.execute([("GET", "missing")]) == [None]
    finally:
        await batches.aclose()
        await client.aclose()


@pytest.mark.integration
async def test_after_aclose_a_call_fails_instead_of_opening_a_connection_nobody_closes(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _proc = private_redis
    client = connect(url, timeout_s=None)
    batches = Batches(client)
    try:
        assert await batches.execute([("PING",)]) == [b"PONG"]
        await batches.aclose()
        before = (await client.info("clients"))["connected_clients"]
        with pytest.raises(RedisConnectionError):
            await batches.execute([("PING",)])
        assert (await client.info("clients"))["connected_clients"] == before
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_the_url_s_password_and_database_are_used_and_error_replies_stay_in_place(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """Batches opens its own connections (not redis-py's): it must still log in and select
    the URL's database, and hand back an error reply as redis-py's exception, in place."""
    url, _proc = private_redis
    admin = connect(url, timeout_s=5.0)
    await admin.config_set("requirepass", "s3cret")
    port = url.rsplit(":", 1)[1].split("/")[0]
    client = connect(f"redis://:s3cret@127.0.0.1:{port}/3", timeout_s=5.0)
    batches = Batches(client)
    wrong_client = connect(f"redis://:nope@127.0.0.1:{port}/3", timeout_s=5.0)
    wrong = Batches(wrong_client)
    try:
        assert await batches.execute([]) == []
        replies = await batches.execute([("SET", "k", "v"), ("INCR", "k"), ("GET", "k")])
        assert replies[0] == b"OK"
        assert replies[2] == b"v"
        assert isinstance(replies[1], ResponseError)
        assert "not an integer" in str(replies[1])
        assert await client.get("k") == b"v"  # redis-py's own connection, same db
        assert await client.dbsize() == 1
        with pytest.raises(AuthenticationError):
            await wrong.execute([("PING",)])
    finally:
        await batches.aclose()
        await wrong.aclose()
        await wrong_client.aclose()
        await client.aclose()
        await admin.aclose()


@pytest.mark.integration
async def test_calls_at_once_on_one_shared_connection_each_get_their_own_replies(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _proc = private_redis
    async with _shared(url) as (client, shared):
        await client.mset({f"k{i}": f"v{i}" for i in range(200)})
        before = (await client.info("clients"))["connected_clients"]
        replies = await asyncio.gather(
            *[shared.execute([("GET", f"k{i}"), ("INCR", f"k{i}")], 1.0) for i in range(200)]
        )
        assert [r[0] for r in replies] == [f"v{i}".encode() for i in range(200)]
        assert all(isinstance(r[1], ResponseError) for r in replies)
        assert (await client.info("clients"))["connected_clients"] == before + 1


@pytest.mark.integration
async def test_a_shared_call_cut_off_by_its_deadline_keeps_the_connection_in_step(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """The late replies of a call that ran out of time must be read and dropped, not
    handed to the next call (the API would serve one visitor's state to the next); the
    connection is kept, not reopened for every cut-off read."""
    url, proc = private_redis
    async with _shared(url) as (client, shared):
        await client.set("k", "v")
        (first_id,) = await shared.execute([("CLIENT", "ID")], 1.0)
        proc.send_signal(signal.SIGSTOP)
        try:
            started = time.perf_counter()
            late = [shared.execute([("SET", "k", f"late{i}"), ("GET", "k")], 0.1) for i in range(3)]
            outcomes = await asyncio.gather(*late, return_exceptions=True)
            assert time.perf_counter() - started < 0.5
            assert all(isinstance(o, TimeoutError) for o in outcomes)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert await shared.execute([("GET", "missing"), ("GET", "k")], 1.0) == [None, b"late2"]
        assert await shared.execute([("CLIENT", "ID")], 1.0) == [first_id]


@pytest.mark.integration
async def test_a_shared_connection_without_replies_for_too_long_is_replaced(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = private_redis
    async with _shared(url, stale_s=0.2) as (_client, shared):
        (first_id,) = await shared.execute([("CLIENT", "ID")], 1.0)
        proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await shared.execute([("PING",)], 0.05)
            await asyncio.sleep(0.3)
            with pytest.raises(TimeoutError):  # on a new connection the kernel accepted
                await shared.execute([("PING",)], 0.05)
        finally:
            proc.send_signal(signal.SIGCONT)
        (second_id,) = await shared.execute([("CLIENT", "ID")], 1.0)
        assert second_id != first_id
        assert await shared.execute([("PING",)], 1.0) == [b"PONG"]


@pytest.mark.integration
async def test_a_shared_connection_killed_fails_its_calls_at_once_and_the_next_reconnects(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _proc = private_redis
    async with _shared(url) as (client, shared):
        (first_id,) = await shared.execute([("CLIENT", "ID")], 1.0)
        blocked = asyncio.ensure_future(shared.execute([("BLPOP", "nothing", 5)], 10.0))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await client.client_kill_filter(_id=first_id)
        with pytest.raises(RedisConnectionError):
            await blocked
        assert time.perf_counter() - started < 1.0
        (second_id,) = await shared.execute([("CLIENT", "ID")], 1.0)
        assert second_id != first_id
        await shared.aclose()
        with pytest.raises(RedisConnectionError):
            await shared.execute([("PING",)], 1.0)


@contextlib.asynccontextmanager
async def _shared(url: str, stale_s: float = 2.0) -> AsyncIterator[tuple[aioredis.Redis, Shared]]:
    client = connect(url, timeout_s=5.0)
    shared = Shared(client, stale_s=stale_s)
    try:
        yield client, shared
    finally:
        await shared.aclose()
        await client.aclose()


def _reply_in_hand(url: str) -> Callable[[], Coroutine[Any, Any, list[Any]]]:
    async def scenario() -> list[Any]:
        async with _shared(url) as (_client, shared):
            await shared.execute([("PING",)], 1.0)
            call = asyncio.ensure_future(shared.execute([("ECHO", "mine")], 0.01))
            await asyncio.sleep(0)  # the call writes its command
            time.sleep(0.05)  # noqa: ASYNC251 (busy past the deadline; the reply comes in)
            return await call

    return scenario


@pytest.mark.integration
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reply_that_arrived_while_the_process_was_busy_beats_its_deadline(
    private_redis: tuple[str, subprocess.Popen[bytes]], loop: str
) -> None:
    """The reply is read while the caller's task waits its turn to run, after the deadline:
    asyncio.timeout would cancel that task all the same, and the API serve its default."""
    url, _proc = private_redis
    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(_reply_in_hand(url)()) == [b"mine"]


@pytest.mark.integration
async def test_a_pattern_subscription_hands_each_message_over_as_it_is_read(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _proc = private_redis
    admin = connect(url, timeout_s=5.0)
    await admin.config_set("requirepass", "s3cret")
    port = url.rsplit(":", 1)[1].split("/")[0]
    client = connect(f"redis://:s3cret@127.0.0.1:{port}/0", timeout_s=5.0)
    got: list[tuple[bytes, bytes]] = []
    sub = await psubscribe(client, ["news.*", "alerts"], lambda ch, data: got.append((ch, data)))
    try:
        assert await client.publish("news.sport", "goal") == 1
        assert await client.publish("weather", "rain") == 0
        assert await client.publish("alerts", "fire") == 1
        await wait_for(lambda: len(got) == 2, 1.0, "two messages", step=0.01)
        assert got == [(b"news.sport", b"goal"), (b"alerts", b"fire")]
        wrong = connect(f"redis://:nope@127.0.0.1:{port}/0", timeout_s=5.0)
        with pytest.raises(AuthenticationError):
            await psubscribe(wrong, ["x"], lambda ch, data: None)
        await wrong.aclose()
    finally:
        sub.close()
        await client.aclose()
        await admin.aclose()
