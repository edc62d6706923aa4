"""Redis connections for Kairos processes.

Packing commands is the worker's hottest path (tens of arguments per event), and redis-py's
asyncio connection packs them in pure Python; hiredis ships a C packer that produces the
same bytes. The pool blocks for a free connection instead of raising "Too many
connections" (redis-py's default pool).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


class HiredisPackingConnection(aioredis.Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # "CONFIG SET"-style command names travel as separate arguments.
        if (isinstance(first, str) and " " in first) or (
            isinstance(first, bytes) and b" " in first
        ):
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


def connect(
    url: str,
    max_connections: int = 8,
    timeout_s: float | None = 5.0,
) -> aioredis.Redis:
    """timeout_s=None drops redis-py's per-reply timer (a few µs per command): for callers
    that bound a whole pipeline with one asyncio.timeout instead, like the worker."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s or 5.0,
        socket_timeout=timeout_s,
        socket_connect_timeout=2,
        health_check_interval=10,
        connection_class=HiredisPackingConnection,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


def hash_reply(reply: Any) -> dict[Any, Any]:
    """A raw HGETALL reply (as Batches returns it) as a dict: a map under RESP3, a flat
    field, value, ... list under RESP2."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True)) if reply else {}


def raise_error_reply(replies: list[Any]) -> list[Any]:
    """The replies of Batches.execute, for callers that take them all or none: the first
    error reply (out of memory, a replica, a script error) raised. Callers that can use the
    other replies of a batch (co-visitation reads, the report) check each one instead."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class Batches:
    """A connection held by one worker for its batches, which it sends one at a time.

    Each call writes all its commands at once and reads the replies in order: the same
    round trip as a redis-py pipeline without its per-command bookkeeping or the pool's
    checkout per pipeline, which together cost the worker more CPU than the rest of a small
    batch. Error replies come back in place as ResponseError objects (a NOSCRIPT is
    raised, so the caller can load its scripts and retry); any other failure drops the
    connection, and the next call reconnects. After aclose() a call raises ConnectionError
    instead: the connection is not the pool's, so a reconnect then would never be closed.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._conn = redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._lock = asyncio.Lock()
        self._closed = False

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with self._lock:
            if self._closed:
                raise RedisConnectionError("Batches used after aclose()")
            conn = self._conn
            if not conn.is_connected:
                await conn.connect()
            try:
                packed = b"".join([hiredis.pack_command(c) for c in commands])
                await conn.send_packed_command(packed, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                await conn.disconnect()
                raise
        for reply in replies:
            if isinstance(reply, NoScriptError):
                raise reply
        return replies

    async def aclose(self) -> None:
        self._closed = True
        await self._conn.disconnect()
