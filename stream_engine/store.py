"""Redis connections for Kairos processes.

Packing commands is the worker's hottest path (tens of arguments per event), and redis-py's
asyncio connection packs them in pure Python; its connections here use hiredis's C packer,
and `Batches` and `Shared` a compiled one of our own (_resp.pyx, the same bytes). The pool
blocks for a free connection instead of raising "Too many connections" (redis-py's default
pool). The hot round trips (the worker's batches, the API's state reads) go through
`Batches` and `Shared`, a bare asyncio protocol on hiredis's parser.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser  # the exception class of each error reply
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import (
    BusyLoadingError,
    InvalidResponse,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream_engine._resp import pack_commands
from stream_engine.exceptions import ConfigError

# A reply that says this node is not the primary, or not serving yet: READONLY (a replica),
# MASTERDOWN (a replica cut off from its primary), LOADING (reading its data set). After a
# failover behind an address that follows the primary (a DNS name such as ElastiCache's
# primary endpoint, a virtual IP, a proxy), a connection opened before it still reaches
# the old primary, now a replica, which refuses every write with READONLY for as long as
# the connection lasts: a worker retrying its batch on it waited for ever while the new
# primary was one reconnect away. Such a reply drops its connection here, and the next
# call connects again, to the node the address names now: in `_Replies` (Batches, Shared)
# and through redis-py's retry (WRONG_NODE_RETRY). The node refused the command before
# running it, so running it again is safe (tests/stream_engine/test_redis_failover.py).
WRONG_NODE = (ReadOnlyError, MasterDownError, BusyLoadingError)
# Redis unreachable or slow, or refusing writes for now: out of memory under `noeviction`,
# a replica or a failover (still loading its data is a ConnectionError already). The
# worker retries its batch, never treats it as a bad one; the admin routes answer 503.
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError,
                OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError)  # fmt: skip


def store_unavailable(exc: BaseException) -> bool:
    """Redis unreachable, slow or refusing work for now (STORE_ERRORS, or BUSY running a
    script, which redis-py leaves a plain ResponseError): retry, never drop the work (an
    out-of-memory Redis had its refusals counted as erased sessions). Any other error is
    the work's own."""
    return isinstance(exc, STORE_ERRORS) or (
        isinstance(exc, ResponseError) and str(exc).startswith("BUSY")
    )


# redis-py calls its retry's failure callback, which disconnects, for these errors only;
# one more try on a new connection, at once. (Its default here retried nothing.)
WRONG_NODE_RETRY = Retry(NoBackoff(), 1, supported_errors=WRONG_NODE)


class _KairosConnection(AbstractConnection):
    """redis-py's connection for whichever transport the URL names, its commands packed
    by hiredis in C."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # "CONFIG SET"-style command names travel as separate arguments.
        if (isinstance(first, str) and " " in first) or (
            isinstance(first, bytes) and b" " in first
        ):
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


class KairosConnection(_KairosConnection, aioredis.Connection):
    pass


class KairosSSLConnection(_KairosConnection, aioredis.SSLConnection):
    pass


class KairosUnixConnection(_KairosConnection, aioredis.UnixDomainSocketConnection):
    pass


_KAIROS_CLASS: dict[type, type[AbstractConnection]] = {
    aioredis.Connection: KairosConnection,
    aioredis.SSLConnection: KairosSSLConnection,
    aioredis.UnixDomainSocketConnection: KairosUnixConnection,
}


class KairosSentinelConnection(_KairosConnection, SentinelManagedConnection):
    pass


class KairosSentinelSSLConnection(_KairosConnection, SentinelManagedSSLConnection):
    pass


class KairosSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's pool for the primary a Sentinel names, blocking for a free connection
    like every other Kairos pool; closing it closes the Sentinel connections too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client's close (a failover drops only idle ones)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"  # TLS to the Sentinels and to the primary
SENTINEL_PORT = 26379
# A rediss+sentinel URL's TLS parameters (redis-py's, as a rediss:// URL takes them), for
# the Sentinels and the primary alike, and how each is read.
SENTINEL_TLS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": lambda v: _one_of(v, ("none", "optional", "required")),
    "ssl_check_hostname": lambda v: _one_of(v, ("true", "false")) == "true",
}


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value.lower() not in allowed:
        raise ValueError(f"{value!r} is none of {', '.join(allowed)}")
    return value.lower()


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_username=…&sentinel_password=…]`: the Sentinels (port 26379 unless given)
    to ask where the primary of `service` is, at each new connection. The user, password
    and database are the primary's; the Sentinels' own are in the query. `rediss+sentinel`
    speaks TLS to the Sentinels and to the primary, with the TLS parameters of a
    `rediss://` URL (SENTINEL_TLS_OPTIONS) for both."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()  # SENTINEL_TLS_OPTIONS given, read

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """None for a URL of another scheme; ValueError saying what is wrong with one of
        this scheme."""
        parts = urlsplit(url)
        if parts.scheme not in (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME):
            return None
        tls = parts.scheme == SENTINEL_TLS_SCHEME
        hosts = parts.netloc.rsplit("@", 1)[-1]
        sentinels = tuple(_host_port(entry) for entry in hosts.split(","))
        path = [unquote(p) for p in parts.path.strip("/").split("/")] if parts.path else []
        if not path or not path[0]:
            raise ValueError(f"no service name: {parts.scheme}://host:26379/SERVICE[/db]")
        if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"the path must be /service[/db], got {parts.path!r}")
        allowed = {"sentinel_username", "sentinel_password"}
        if tls:
            allowed |= set(SENTINEL_TLS_OPTIONS)
        query = parse_qs(parts.query, keep_blank_values=True)
        if unknown := sorted(set(query) - allowed):
            more = "" if tls else f"; {SENTINEL_TLS_SCHEME}:// takes TLS parameters"
            raise ValueError(f"unknown parameters {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(allowed))}{more})")  # fmt: skip
        tls_options = []
        for name in sorted(set(query) & set(SENTINEL_TLS_OPTIONS)):
            try:
                tls_options.append((name, SENTINEL_TLS_OPTIONS[name](query[name][-1])))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return cls(
            sentinels=sentinels,
            service=path[0],
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            sentinel_username=query.get("sentinel_username", [None])[-1],
            sentinel_password=query.get("sentinel_password", [None])[-1],
            tls=tls,
            tls_options=tuple(tls_options),
        )

    def client(self, max_connections: int, timeout_s: float | None) -> aioredis.Redis:
        tls: dict[str, Any] = {"ssl": True, **dict(self.tls_options)} if self.tls else {}
        ask = {"username": self.sentinel_username, "password": self.sentinel_password,
               "socket_timeout": 2.0, "socket_connect_timeout": 2.0, **tls}  # fmt: skip
        manager = Sentinel(list(self.sentinels), sentinel_kwargs=ask)  # type: ignore[no-untyped-call]
        client: aioredis.Redis = manager.master_for(
            self.service,
            connection_pool_class=KairosSentinelPool,
            connection_class=KairosSentinelSSLConnection if self.tls else KairosSentinelConnection,
            **{k: v for k, v in tls.items() if k != "ssl"},
            max_connections=max_connections,
            timeout=timeout_s or 5.0,
            socket_timeout=timeout_s,
            socket_connect_timeout=2,
            health_check_interval=10,
            retry=WRONG_NODE_RETRY,
            db=self.db,
            username=self.username,
            password=self.password,
        )
        return client


def _host_port(entry: str) -> tuple[str, int]:
    if entry.startswith("["):  # [::1]:26379
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = entry.partition(":")
    if not host or (port and not port.isdigit()) or ":" in port:
        raise ValueError(f"a Sentinel must be host[:port], got {entry!r}")
    return host, int(port) if port else SENTINEL_PORT


def connect(
    url: str,
    max_connections: int = 8,
    timeout_s: float | None = 5.0,
) -> aioredis.Redis:
    """timeout_s=None drops redis-py's per-reply timer (a few µs per command): for callers
    that bound a whole pipeline with one asyncio.timeout instead, like the worker. A
    `redis+sentinel://` URL (SentinelUrl) connects to the primary its Sentinels name."""
    if (sentinel := SentinelUrl.parse(url)) is not None:
        return sentinel.client(max_connections, timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s or 5.0,
        socket_timeout=timeout_s,
        socket_connect_timeout=2,
        health_check_interval=10,
        retry=WRONG_NODE_RETRY,  # copied by each connection
    )
    # The URL chose redis-py's class for its transport (from_url lets it override any
    # connection_class given); Kairos' subclass of it, before any connection is made.
    pool.connection_class = _KAIROS_CLASS[pool.connection_class]
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


def hash_reply(reply: Any) -> dict[Any, Any]:
    """A raw HGETALL reply (as Batches returns it) as a dict: a map under RESP3, a flat
    field, value, ... list under RESP2."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True)) if reply else {}


def wrong_type(reply: Any) -> bool:
    """Whether a reply (or a raised error) is Redis's WRONGTYPE: the key holds another type
    than the command works on, written by something else than Kairos."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


_T = TypeVar("_T")


async def unless_wrong_type(read: Awaitable[_T], instead: _T) -> _T:
    """The reply of one read, or `instead` when its key holds another type (wrong_type);
    any other error raised."""
    try:
        return await read
    except ResponseError as exc:
        if wrong_type(exc):
            return instead
        raise


def wrong_type_as_none(replies: list[Any]) -> list[Any]:
    """Replies of a batch or a pipeline (error replies in place), with those on a key of
    another type (wrong_type) as None and any other error reply raised (raise_error_reply):
    for readers that take a key something else wrote as none."""
    return raise_error_reply([None if wrong_type(r) else r for r in replies])


def raise_error_reply(replies: list[Any]) -> list[Any]:
    """The replies of Batches.execute, for callers that take them all or none: the first
    error reply (out of memory, a replica, a script error) raised. Callers that can use the
    other replies of a batch (co-visitation reads, the report) check each one instead."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


@dataclass(slots=True)
class _Call:
    count: int
    future: asyncio.Future[list[Any]]
    sent: float  # loop time
    replies: list[Any] = field(default_factory=list)


class _Replies(asyncio.Protocol):
    """One connection's reading side: hiredis parses replies as they arrive, and each call
    gets its own, in the order the calls were written (Redis answers a connection's
    commands in order). A call whose caller gave up keeps its place: its replies are read
    and dropped, so the calls behind it still get theirs. Error replies stay in place as
    redis-py's exception objects (ResponseError, NoScriptError, OutOfMemoryError, ...).
    One that says the node is the wrong one (WRONG_NODE) makes the connection `lost`, so
    its owner opens a new one; the calls already in line still get their replies."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=_error_reply)
        self.transport: asyncio.Transport | None = None
        self.calls: deque[_Call] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if not self.deliver(reply):
                    return
        except InvalidResponse as exc:
            self.close(RedisConnectionError(f"Redis sent an unreadable reply: {exc}"))

    def deliver(self, reply: Any) -> bool:
        """Hands a reply to the oldest call; False when nobody asked for it (the
        connection is closed: replies and calls no longer line up)."""
        calls = self.calls
        if not calls:
            self.close(RedisConnectionError("Redis sent more replies than were asked for"))
            return False
        call = calls[0]
        call.replies.append(reply)
        if isinstance(reply, WRONG_NODE):
            self.lost = True  # retired (WRONG_NODE): no new calls; closed once these are
        if len(call.replies) == call.count:
            calls.popleft()
            if not call.future.done():
                call.future.set_result(call.replies)
            if self.lost and not calls:
                self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.close(RedisConnectionError(f"Redis closed the connection{why}"))

    def send(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Writes one call's commands; the future gets its `count` replies."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("the Redis connection is closed")
        loop = asyncio.get_running_loop()
        call = _Call(count, loop.create_future(), loop.time())
        self.calls.append(call)
        self.transport.write(packed)
        return call.future

    def waited_s(self, now: float) -> float:
        """How long the oldest call still in line has waited for its replies."""
        return now - self.calls[0].sent if self.calls else 0.0

    def close(self, exc: Exception | None = None) -> None:
        """Closes the connection; every call still in line fails with `exc`."""
        self.lost = True
        calls, self.calls = self.calls, deque()
        for call in calls:
            if not call.future.done():
                call.future.set_exception(
                    exc or RedisConnectionError("the Redis connection was closed")
                )
        if self.transport is not None:
            self.transport.close()


class Subscription(_Replies):
    """A connection subscribed to channel patterns (`psubscribe`): each published message
    goes to `on_message(channel, data)` as soon as it is parsed; the replies to its own
    calls (the subscriptions) go to those calls."""

    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        super().__init__()
        self.on_message = on_message

    def deliver(self, reply: Any) -> bool:
        if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
            self.on_message(reply[2], reply[3])
            return True
        return super().deliver(reply)


async def psubscribe(
    redis: aioredis.Redis, patterns: Sequence[str], on_message: Callable[[bytes, bytes], None]
) -> Subscription:
    """A new connection (the client's address and login) subscribed to `patterns`; close()
    it when done. Messages are handled in the read callback, with no polling: redis-py's
    PubSub.get_message costs a wait and a Python reply parse per message."""
    conn = await _Address.of(redis).open(lambda: Subscription(on_message))
    await _set_up(conn, [("PSUBSCRIBE", *patterns)], replies=len(patterns))
    return conn


async def _set_up(conn: _Replies, commands: list[tuple[Any, ...]], replies: int) -> None:
    """A new connection's set-up commands: an error reply is raised, and the connection is
    closed if they fail or are cut off."""
    try:
        raise_error_reply(await conn.send(pack_commands(commands), replies))
    except BaseException:
        conn.close()
        raise


_P = TypeVar("_P", bound=_Replies)


@dataclass(frozen=True, slots=True)
class _Address:
    """Where and how to connect: from the client's pool (host and port or a unix socket's
    path, TLS, db, username, password, connect timeout), so any URL `connect` takes, opened
    as redis-py's own connection for it would be.

    It once took host and port alone: a `unix://` URL connected to localhost:6379, another
    Redis or none, and a `rediss://` one spoke plaintext to the TLS port (its AUTH in the
    clear to whatever listened), while redis-py's connections of the same process did it
    right (tests/stream_engine/test_redis_transports.py)."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    connect_timeout_s: float
    path: str | None = None  # a unix socket's, instead of host and port
    tls: ssl.SSLContext | None = None
    # where the primary is now, asked at each connection (a Sentinel-managed pool's)
    resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None
    service: str = ""

    @classmethod
    def of(cls, redis: aioredis.Redis) -> _Address:
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        tls = None
        if issubclass(pool.connection_class, aioredis.SSLConnection):
            # redis-py's context for the URL's ssl_* parameters: the same certificates,
            # checks and versions as the pool's own connections (building one connects
            # nothing)
            ssl_kwargs = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
            tls = aioredis.SSLConnection(**ssl_kwargs).ssl_context.get()
        if isinstance(pool, SentinelConnectionPool):
            return cls(
                host="", port=0, db=int(kwargs.get("db", 0) or 0),
                username=kwargs.get("username"), password=kwargs.get("password"),
                connect_timeout_s=kwargs.get("socket_connect_timeout") or 5.0,
                tls=tls, resolve=pool.get_master_address, service=pool.service_name,
            )  # fmt: skip
        return cls(
            host=kwargs.get("host", "localhost"),
            port=int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            connect_timeout_s=kwargs.get("socket_connect_timeout") or 5.0,
            path=kwargs.get("path") if issubclass(
                pool.connection_class, aioredis.UnixDomainSocketConnection) else None,
            tls=tls,
        )  # fmt: skip

    @property
    def where(self) -> str:
        if self.resolve is not None:
            return f"the primary of {self.service!r} (Sentinel)"
        return self.path or f"{self.host}:{self.port}"

    async def open(self, protocol: Callable[[], _P]) -> _P:
        """A logged-in connection on the right database; one cut off midway is closed."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, conn = await loop.create_unix_connection(protocol, self.path)
                else:
                    host, port = self.host, self.port
                    if self.resolve is not None:  # MasterNotFoundError: a ConnectionError
                        host, port = await self.resolve()
                    _, conn = await loop.create_connection(protocol, host, port, ssl=self.tls)
        except TimeoutError:
            raise RedisConnectionError(f"connecting to Redis at {self.where} timed out") from None
        except OSError as exc:  # ssl.SSLError included
            raise RedisConnectionError(
                f"cannot connect to Redis at {self.where}: {exc.strerror or exc}"
            ) from None
        hello: list[tuple[Any, ...]] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            hello.append(("AUTH", *auth))
        if self.db:
            hello.append(("SELECT", self.db))
        if hello:
            await _set_up(conn, hello, replies=len(hello))
        return conn


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
    connection (a cut-off write batch may or may not have run; the next call starts
    clean), and the next call reconnects. After aclose() a call raises ConnectionError.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._address = _Address.of(redis)
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
                    self._drop()
                    conn = self._conn = await self._address.open(_Replies)
                replies = await conn.send(pack_commands(commands), len(commands))
            except BaseException:
                self._drop()
                raise
        _raise_no_script(replies)
        return replies

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        self._closed = True
        self._drop()
        await asyncio.sleep(0)  # the transport closes its socket on the next loop turn


class Shared:
    """A connection that several callers may use at once, for the API's reads.

    Each call writes its commands at once and gets its own replies; calls do not wait for
    each other's round trips. Its deadline ends a call only if the replies have not been
    read when the timer runs. asyncio.timeout cancels the waiting task instead, and so also
    cuts off a call whose replies were read while the process was busy and whose task was
    queued to resume: in the decisions bench at 2,000 requests/s, 132 of 148 reads cut
    off on a connection had their replies in hand.

    A call whose caller gave up or ran out of time keeps its place in line, its late
    replies are dropped, and the connection stays (Batches drops it, and the next call
    paid a reconnect). If the oldest call in line has had no reply for `stale_s` (a frozen
    or vanished Redis), the connection is closed, its calls fail, and the next call opens
    a new one. After aclose() a call raises ConnectionError.
    """

    def __init__(self, redis: aioredis.Redis, stale_s: float = 2.0) -> None:
        self._address = _Address.of(redis)
        self.stale_s = stale_s
        self._conn: _Replies | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def execute(self, commands: Sequence[tuple[Any, ...]], timeout_s: float) -> list[Any]:
        """Raises TimeoutError after `timeout_s` (connecting included), or a Redis/OS
        error; a NOSCRIPT reply is raised, other error replies stay in place."""
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = self._conn
        if conn is None or conn.lost or conn.waited_s(loop.time()) > self.stale_s:
            async with asyncio.timeout_at(deadline):
                conn = await self._connected()
        future = conn.send(pack_commands(commands), len(commands))
        timer = loop.call_at(deadline, _expire, future)
        try:
            replies = await future
        finally:
            timer.cancel()
        _raise_no_script(replies)
        return replies

    async def _connected(self) -> _Replies:
        async with self._opening:
            if self._closed:
                raise RedisConnectionError("Shared used after aclose()")
            conn = self._conn
            if conn is not None and not conn.lost:
                if conn.waited_s(asyncio.get_running_loop().time()) <= self.stale_s:
                    return conn
                conn.close(RedisConnectionError(f"no reply from Redis in {self.stale_s} s"))
            self._conn = None
            self._conn = await self._address.open(_Replies)
            return self._conn

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        await asyncio.sleep(0)  # the transport closes its socket on the next loop turn


def _expire(future: asyncio.Future[list[Any]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _raise_no_script(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, NoScriptError):
            raise reply


CLUSTER_SLOTS = 16384


def _shown(url: str) -> str:
    """`url` without its password, for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


def check_redis_url(url: str, name: str = "KAIROS_REDIS_URL") -> None:
    """Refuse (ConfigError, the password masked) a Redis URL redis-py can't use, or one it
    would quietly read differently: a database that is not a number was database 0."""
    try:
        if SentinelUrl.parse(url) is not None:
            return
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"{name}={_shown(url)!r}: {exc}") from None
    parts = urlsplit(url)
    db = parts.path.lstrip("/")
    if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
        raise ConfigError(f"{name}={_shown(url)!r}: the database must be a number, got {db!r}")


def check_topology(url: str, timeout_s: float = 2.0) -> None:
    """Refuse (ConfigError) a Redis Kairos can't run on: a node of a Redis Cluster that
    does not serve all 16,384 slots as a primary, or database other than 0 on one. Every
    key of one script or pipeline entry shares a hash tag, so a cluster of one shard
    works, but the clients here send everything through the one node the URL names and
    follow no MOVED redirection: on a cluster of several shards every command for a key
    elsewhere would fail, and the worker would send every event to the dead letters. A
    Redis that does not answer passes: the processes handle that as an outage. A primary
    that Sentinels name is never a cluster node (Sentinel does not manage clusters)."""
    if SentinelUrl.parse(url) is not None:
        return
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    db = int(options.get("db") or 0)
    options["db"] = 0  # a cluster node refuses SELECT: ask it anyway, then say why
    pool = redis.ConnectionPool(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                **options)  # fmt: skip
    client = redis.Redis(connection_pool=pool)
    client.response_callbacks.pop("CLUSTER SLOTS", None)  # the raw reply, with node ids
    try:
        if not int(client.info("cluster").get("cluster_enabled", 0)):
            return
        me = client.execute_command("CLUSTER MYID")  # type: ignore[no-untyped-call]
        ranges = client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    except RedisError:
        return
    finally:
        client.close()
        pool.disconnect()
    where = _shown(url)
    if db:
        raise ConfigError(f"KAIROS_REDIS_URL ({where}) names database {db} of a Redis Cluster "
                          "node, which has database 0 only")  # fmt: skip
    primaries = {entry[2][2] for entry in ranges}
    served = sum(end - start + 1 for start, end, primary, *_ in ranges if primary[2] == me)
    if served < CLUSTER_SLOTS:
        raise ConfigError(
            f"KAIROS_REDIS_URL ({where}) is a node of a Redis Cluster whose "
            f"{CLUSTER_SLOTS} slots it serves {served} of as a primary ({len(primaries)} "
            "primaries in all): Kairos sends every command to the node its URL names and "
            "follows no MOVED redirection, so it needs a standalone Redis (replicas or "
            "Sentinel for failover) or the primary of a cluster of one shard"
        )
