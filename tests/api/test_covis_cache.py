"""Co-visitation cache: fresh, then stale but served while read again off the request path."""

from __future__ import annotations

import numpy as np
import pytest
import redis.asyncio as aioredis

from api.aggregates import COVIS_REFRESH_MAX, CovisCache
from api.settings import Settings
from stream_engine.catalog import Catalog
from tests.api.conftest import client_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _neighbours(*rows: int) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(rows, np.int64), np.ones(len(rows), np.float32)


def _cached(clock: Clock, rows: list[int]) -> CovisCache:
    cache = CovisCache(ttl_s=30, stale_s=600, clock=clock)
    for r in rows:
        cache._entries[r] = (clock.t, _neighbours(r + 1))
    return cache


def test_fresh_entries_are_served_and_not_queued() -> None:
    clock = Clock()
    cache = _cached(clock, [1, 2])
    found, missing = cache.lookup([1, 2, 3])
    assert sorted(found) == [1, 2]
    assert missing == [3]
    assert cache.due(10) == []


def test_stale_entries_are_served_and_queued_once_for_a_background_read() -> None:
    clock = Clock()
    cache = _cached(clock, [1, 2])
    clock.t += 31
    found, missing = cache.lookup([2, 1])
    assert sorted(found) == [1, 2]
    assert missing == []
    cache.lookup([1])  # asked again before the refresh: still one entry
    assert cache.due(1) == [2]
    assert cache.due(10) == [1]
    assert cache.due(10) == []


def test_entries_past_the_stale_limit_must_be_read_by_the_request() -> None:
    clock = Clock()
    cache = _cached(clock, [1])
    clock.t += 30 + 601
    found, missing = cache.lookup([1])
    assert found == {}
    assert missing == [1]


def test_the_background_queue_is_bounded() -> None:
    clock = Clock()
    cache = _cached(clock, list(range(COVIS_REFRESH_MAX + 50)))
    clock.t += 31
    found, _ = cache.lookup(list(range(COVIS_REFRESH_MAX + 50)))
    assert len(found) == COVIS_REFRESH_MAX + 50  # all served
    assert len(cache.due(10**6)) == COVIS_REFRESH_MAX


@pytest.mark.integration
async def test_stale_entries_are_refreshed_from_redis_in_the_background(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    a, b, c = (it.item_id for it in catalog.items[:3])
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        clock = Clock()
        rt.covis = CovisCache(ttl_s=30, stale_s=600, clock=clock)
        row = rt.serving.catalog.row(a)
        key = rt.keys.covisit(a)
        await redis_client.zadd(key, {b: 1.0})
        _, missing = rt.covis.lookup([row])
        cmds = rt.covis.commands(rt.keys, rt.serving.catalog, missing)
        rt.covis.store(missing, await rt.reader.execute(cmds, 1.0), rt.serving.catalog)
        await redis_client.zadd(key, {c: 5.0})  # the stream moved on
        clock.t += 31
        stale, _ = rt.covis.lookup([row])
        assert stale[row][0].tolist() == [rt.serving.catalog.row(b)]
        assert await rt.refresh_covis() == 1
        fresh, missing = rt.covis.lookup([row])
        assert missing == []
        assert fresh[row][0].tolist() == [rt.serving.catalog.row(c), rt.serving.catalog.row(b)]
        assert await rt.refresh_covis() == 0  # nothing left to read
        metrics = (await client.get("/metrics")).text
    assert 'kairos_api_covis_reads_total{path="background"} 1.0' in metrics
