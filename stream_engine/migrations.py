"""One-time moves of state stored by earlier versions, run by the worker before it applies
its first batch (BatchProcessor.process). Each is recorded in Keys.migrations once done, so
a later start skips it; each is safe to run twice, by two workers at once, and to cut off
midway (the next start runs it again).
"""

from __future__ import annotations

import logging
import re
import time

import redis.asyncio as aioredis

from stream_engine.state import Keys

log = logging.getLogger(__name__)

USER_BLOCKS = "user-blocks-ux"

# KEYS: a block under the key a user's block had before session 31 ({u:<id>}:x), the
# user's block now ({u:<id>}:ux). The old key may also be the block of a session named
# "u:<id>": copied all the same (the user then stays blocked: the safe side of a withdrawn
# consent). An erasure is never overwritten; a block already set under the new key is
# newer than the old one. The old key stays for such a session, until its TTL.
COPY_USER_BLOCK = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return 0 end
local old = redis.call('GET', KEYS[1])
local cur = false
local t = redis.call('TYPE', KEYS[2]).ok
if t == 'string' then cur = redis.call('GET', KEYS[2]) elseif t ~= 'none' then return 0 end
if cur == 'erased' or (cur and old ~= 'erased') then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[2], old, 'PX', ttl)
else
  redis.call('SET', KEYS[2], old)
end
return 1
"""

SCAN_COUNT = 1000


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


async def migrate(redis: aioredis.Redis, keys: Keys) -> None:
    """Runs the moves not yet recorded as done; raises like the Redis client."""
    if not await redis.hexists(keys.migrations, USER_BLOCKS):
        started = time.monotonic()
        copied = await copy_user_blocks(redis, keys)
        await redis.hset(keys.migrations, USER_BLOCKS, int(time.time() * 1000))
        log.info("user consent and erasure blocks carried over to their new key: %d copied in "
                 "%.2f s", copied, time.monotonic() - started)  # fmt: skip


async def copy_user_blocks(redis: aioredis.Redis, keys: Keys) -> int:
    copy = redis.register_script(COPY_USER_BLOCK)
    head, tail = f"{keys.prefix}:{{u:", "}:x"
    pattern = f"{_glob_escape(head)}*{tail}"
    cursor, copied = 0, 0
    while True:
        cursor, found = await redis.scan(cursor, match=pattern, count=SCAN_COUNT)
        if found:
            pipe = redis.pipeline(transaction=False)
            for raw in found:
                old = raw.decode() if isinstance(raw, bytes) else raw
                uid = old[len(head) : -len(tail)]
                await copy(keys=[old, keys.user_block(uid)], client=pipe)
            copied += sum(await pipe.execute())
        if cursor == 0:
            return copied
