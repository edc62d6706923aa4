"""Reading what the stream engine wrote: one round trip per decision.

The session hash, its impression counts and its consent/erasure block (one script, one
reply) and, when the caller names the user, the user's profile and block travel in one
packed write and one read on a connection held by the API (`stream_engine.store.Shared`,
a small pool of them), with one deadline for the whole round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from stream_engine.catalog import Vector
from stream_engine.state import Keys, stored_int, stored_text
from stream_engine.store import Shared, hash_reply, raise_error_reply
from stream_engine.vectors import from_bytes, user_profile


@dataclass(slots=True)
class SessionView:
    """A session's state as the API sees it. An unknown session is an empty view."""

    session_id: str
    vector: Vector | None = None
    events: int = 0
    recent: list[str] = field(default_factory=list)
    cart: list[str] = field(default_factory=list)
    bought: list[str] = field(default_factory=list)
    impressions: dict[str, int] = field(default_factory=dict)
    written_ms: int | None = None  # when the worker last wrote it (state age)
    user: str | None = None
    block: str | None = None  # "consent" or "erased"
    profile: Vector | None = None
    user_anchor: str | None = None  # the session that first linked the user (holdout)
    user_block: str | None = None


# KEYS: session, impressions, block (one hash slot). One reply instead of three: each
# reply costs the API more to parse than Redis spends running this.
READ_SESSION = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('GET', KEYS[3])}
"""
READ_SESSION_SHA = hashlib.sha1(READ_SESSION.encode()).hexdigest()


def _words(raw: bytes | None) -> list[str]:
    return stored_text(raw).split() if raw else []


def parse_view(
    sid: str,
    replies: Sequence[Any],
    dims: int,
    now_ms: int,
    user_half_life_ms: float,
) -> SessionView:
    session, impressions, block = replies[0]
    s = hash_reply(session)
    imp = hash_reply(impressions)
    view = SessionView(
        session_id=sid,
        vector=from_bytes(s.get(b"v"), dims),
        events=stored_int(s.get(b"n")) or 0,
        recent=_words(s.get(b"r")),
        cart=_words(s.get(b"c")),
        bought=_words(s.get(b"b")),
        impressions={stored_text(k): n for k, v in imp.items() if (n := stored_int(v)) is not None},
        written_ms=stored_int(s.get(b"w")),
        user=stored_text(s[b"u"]) if s.get(b"u") else None,
        block=stored_text(block) if block else None,
    )
    if len(replies) > 1:
        u = hash_reply(replies[1])
        view.profile = user_profile(u, dims, now_ms, user_half_life_ms)
        view.user_anchor = stored_text(u[b"a"]) if u.get(b"a") else None
        view.user_block = stored_text(replies[2]) if replies[2] else None
    return view


class StateReader:
    """Reads pipelined on a few held connections: a read is written at once on the
    connection with the fewest in line, and is one round trip under one deadline, its wait
    for a turn included. At most `bound` reads are in flight; a read holds its turn until
    its caller resumes, so when the process falls behind, the reads waiting for a turn run
    out of budget and get the default (a cheap answer) instead of each costing a whole
    decision late. A read cut off by its deadline leaves its connection in place (`Shared`
    drops its late replies) instead of dropping it.

    Each connection once took one read at a time: a connection was then held for a round
    trip plus the wait for its reader to resume, and at 2,000 requests/s reads timed out
    waiting for one of four while Redis used ~11% of a core (loadtest/JOURNAL.md, session
    31)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        dims: int,
        user_half_life_ms: float,
        size: int,
        bound: int,
    ) -> None:
        self.keys = keys
        self.dims = dims
        self.user_half_life_ms = user_half_life_ms
        self._all = [Shared(redis) for _ in range(size)]
        self._load = [0] * size  # reads in line on each connection
        self.bound = bound
        self.in_flight = 0  # turns held, by reads in line and by waiters handed one
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def execute(self, commands: Sequence[tuple[Any, ...]], timeout_s: float) -> list[Any]:
        """Raises TimeoutError or a Redis/OS error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiting = self._waiting
        while waiting and waiting[0].done():  # waiters that gave up
            waiting.popleft()
        if self.in_flight < self.bound and not waiting:
            self.in_flight += 1  # the usual case: no future, no timer
        else:
            turn: asyncio.Future[None] = loop.create_future()
            waiting.append(turn)
            try:
                async with asyncio.timeout_at(deadline):
                    await turn
            except BaseException:
                if turn.done() and not turn.cancelled():  # handed a turn, then cut off
                    self._done()
                raise
        load = self._load
        i = load.index(min(load))
        load[i] += 1
        conn = self._all[i]
        try:
            try:
                return await conn.execute(commands, deadline - loop.time())
            except NoScriptError:  # a restarted or flushed Redis: load it, once
                await conn.execute([("SCRIPT", "LOAD", READ_SESSION)], deadline - loop.time())
                return await conn.execute(commands, deadline - loop.time())
        finally:
            load[i] -= 1
            self._done()

    def _done(self) -> None:
        """A turn given back: to the oldest waiter still waiting, while the bound allows."""
        self.in_flight -= 1
        waiting = self._waiting
        while waiting and self.in_flight < self.bound:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self.in_flight += 1

    def commands(self, sid: str, uid: str | None) -> list[tuple[Any, ...]]:
        k = self.keys
        cmds: list[tuple[Any, ...]] = [
            ("EVALSHA", READ_SESSION_SHA, 3, k.session(sid), k.impressions(sid),
             k.session_block(sid)),
        ]  # fmt: skip
        if uid is not None:
            cmds += [("HGETALL", k.user(uid)), ("GET", k.user_block(uid))]
        return cmds

    async def read(self, sid: str, uid: str | None, now_ms: int, timeout_s: float) -> SessionView:
        replies = raise_error_reply(await self.execute(self.commands(sid, uid), timeout_s))
        return parse_view(sid, replies, self.dims, now_ms, self.user_half_life_ms)

    async def warm(self, timeout_s: float = 1.0) -> None:
        """Open every held connection and load the read script now, so the first requests
        after a start don't pay a TCP connect and a NOSCRIPT round trip inside their read
        budget. Raises like execute() when Redis is not there (the caller goes on)."""
        for conn in self._all:
            await conn.execute([("SCRIPT", "LOAD", READ_SESSION)], timeout_s)

    async def aclose(self) -> None:
        for b in self._all:
            await b.aclose()
