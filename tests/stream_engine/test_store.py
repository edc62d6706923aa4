"""Batches on a real Redis: a round trip cut off anywhere leaves nothing behind."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest
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
