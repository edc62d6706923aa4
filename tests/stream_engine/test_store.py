"""Batches on a real Redis: a round trip cut off anywhere leaves nothing behind."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_engine.store import Batches, connect


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
