"""The API tells the workers when its Redis reads are slow: one INCR on the real Redis per
100 ms window that had enough slow reads, nothing while they are fast."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis

from api.settings import Settings
from stream_engine.state import Keys
from tests.api.conftest import client_for
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def views(client: httpx.AsyncClient, n: int) -> None:
    for i in range(n):
        r = await client.get(f"/v1/slots/home_recs?session_id=pressure-{i}")
        assert r.status_code == 200


async def test_slow_reads_are_reported_to_the_workers_and_fast_ones_are_not(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    key = Keys(settings.key_prefix).pressure
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        rt.slow_reads.slow_s = 60.0  # no read is slow
        await views(client, 20)
        await asyncio.sleep(0.3)  # three windows
        assert await redis_client.get(key) is None
        rt.slow_reads.slow_s = 0.0  # every read is slow
        await views(client, 20)

        async def counted() -> bool:
            return int(await redis_client.get(key) or 0) >= 1

        await wait_for(counted, 2, "the slow reads counted in Redis")
        assert rt.metrics.pressure_reports._value.get() >= 1
        assert 0 < await redis_client.pttl(key) <= 60_000
