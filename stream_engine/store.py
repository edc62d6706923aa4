"""Redis connections for Kairos processes.

Packing commands is the worker's hottest path (tens of arguments per event), and redis-py's
asyncio connection packs them in pure Python; hiredis ships a C packer that produces the
same bytes. The pool blocks for a free connection instead of raising "Too many
connections" (redis-py's default pool). The hot round trips (the worker's batches, the API's
state reads) go through `Batches`, a bare asyncio protocol on hiredis's parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis._parsers import BaseParser  # the exception class of each error reply
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError


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


class _Replies(asyncio.Protocol):
    """One Batches connection's reading side: hiredis parses replies as they arrive, and
    the waiting call gets them all at once. Error replies stay in place as redis-py's
    exception objects (ResponseError, NoScriptError, OutOfMemoryError, ...)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=_error_reply)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[list[Any]] | None = None
        self.expected = 0
        self.replies: list[Any] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                self.replies.append(reply)
        except InvalidResponse as exc:
            self._fail(RedisConnectionError(f"Redis sent an unreadable reply: {exc}"))
            return
        waiter = self.waiter
        if waiter is None or len(self.replies) > self.expected:
            # a reply nobody asked for: replies and calls no longer line up
            self._fail(RedisConnectionError("Redis sent more replies than were asked for"))
        elif len(self.replies) == self.expected and not waiter.done():
            waiter.set_result(self.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            why = f": {exc}" if exc else ""
            self.waiter.set_exception(RedisConnectionError(f"Redis closed the connection{why}"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    async def call(self, packed: bytes, count: int) -> list[Any]:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("the Redis connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.expected, self.replies = count, []
        self.transport.write(packed)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join([hiredis.pack_command(c) for c in commands])


def _error_reply(message: str) -> Exception:
    exc: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return exc


class Batches:
    """A connection held by one worker for its batches, which it sends one at a time.

    Each call writes all its commands at once and reads the replies in order: the same
    round trip as a redis-py pipeline, on a bare asyncio protocol with hiredis's parser.
    redis-py's stream reader, per-reply bookkeeping and the pool's checkout per pipeline
    cost more CPU than the rest of a small batch (the API's state read: 19 µs of CPU here,
    31-33 through a redis-py connection, four reads in flight). Error replies come back in
    place as ResponseError objects (a NOSCRIPT is raised, so the caller can load its
    scripts and retry); any other failure, or a call cut off while waiting, drops the
    connection (late replies must never reach the next call), and the next call
    reconnects. After aclose() a call raises ConnectionError.

    Connection settings come from the client's pool (host, port, db, username, password,
    connect timeout): a redis:// URL, as `connect` takes it.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        kwargs = redis.connection_pool.connection_kwargs
        self._host = kwargs.get("host", "localhost")
        self._port = int(kwargs.get("port", 6379))
        self._db = int(kwargs.get("db", 0) or 0)
        self._username = kwargs.get("username")
        self._password = kwargs.get("password")
        self._connect_timeout = kwargs.get("socket_connect_timeout") or 5.0
        self._conn: _Replies | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with self._lock:
            if self._closed:
                raise RedisConnectionError("Batches used after aclose()")
            if not commands:
                return []
            try:
                conn = self._conn
                if conn is None or conn.lost:
                    conn = await self._open()
                replies = await conn.call(_pack(commands), len(commands))
            except BaseException:
                self._drop()
                raise
        for reply in replies:
            if isinstance(reply, NoScriptError):
                raise reply
        return replies

    async def _open(self) -> _Replies:
        self._drop()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Replies, self._host, self._port)
        except TimeoutError:
            raise RedisConnectionError(
                f"connecting to Redis at {self._host}:{self._port} timed out"
            ) from None
        except OSError as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._conn = conn
        hello: list[tuple[Any, ...]] = []
        if self._password is not None:
            auth = (self._username, self._password) if self._username else (self._password,)
            hello.append(("AUTH", *auth))
        if self._db:
            hello.append(("SELECT", self._db))
        if hello:
            for reply in await conn.call(_pack(hello), len(hello)):
                if isinstance(reply, Exception):
                    raise reply
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        self._closed = True
        self._drop()
        await asyncio.sleep(0)  # the transport closes its socket on the next loop turn
