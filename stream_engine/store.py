"""Redis connections for Kairos processes.

Packing commands is the worker's hottest path (tens of arguments per event), and redis-py's
asyncio connection packs them in pure Python; hiredis ships a C packer that produces the
same bytes. The pool blocks for a free connection instead of raising "Too many
connections" (redis-py's default pool).
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis


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
    return aioredis.Redis(connection_pool=pool)
