"""Erasure: remove every piece of state of a user or session, and keep replays from
bringing it back (a block record, checked by every apply, that outlives topic retention)."""

from __future__ import annotations

import redis.asyncio as aioredis

from stream_engine import state
from stream_engine.state import Keys


async def erase_session(redis: aioredis.Redis, keys: Keys, sid: str, ttl_ms: int) -> None:
    await redis.eval(
        state.ERASE_SESSION,
        3,
        keys.session(sid),
        keys.impressions(sid),
        keys.session_block(sid),
        ttl_ms,
    )
    await redis.delete(keys.exposures(sid))


async def erase_user(redis: aioredis.Redis, keys: Keys, uid: str, ttl_ms: int) -> list[str]:
    """Erase the user's profile and every session linked to it; returns those sessions."""
    members = await redis.eval(
        state.BLOCK_USER,
        3,
        keys.user(uid),
        keys.user_sessions(uid),
        keys.user_block(uid),
        "erased",
        ttl_ms,
    )
    sessions = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    for sid in sessions:
        await erase_session(redis, keys, sid, ttl_ms)
    await redis.delete(keys.user_sessions(uid))
    return sessions
