"""The worker's freshness counts reach the report's counters on the real Redis."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from api.report import freshness
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.events import Event, EventType, encode_event
from stream_engine.ingest import Ingest
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.state import FRESHNESS_FIELDS
from tests.conftest import Stack

CATALOG = Catalog(generate(200))


def test_percentiles_are_the_upper_bounds_of_the_buckets() -> None:
    totals = {"fr|2": 50.0, "fr|5": 49.0, "fr|100": 1.0}
    assert freshness(totals) == {"events": 100, "p50_ms_at_most": 2, "p99_ms_at_most": 5}
    assert freshness({}) == {"events": 0}


@pytest.mark.integration
async def test_freshness_counts_are_flushed_into_the_minute_counters(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    ingest = Ingest(Settings(redis_url=stack.redis_url, key_prefix=key_prefix), CATALOG,
                    WorkerMetrics())  # fmt: skip
    now = int(time.time() * 1000)
    records = [
        Record(0, i, f"s{i}".encode(),
               encode_event(Event(f"e{i}", EventType.VIEW, f"s{i}", now, item_id="sku-000001")),
               now - 3)
        for i in range(40)
    ]  # fmt: skip
    try:
        outcome = await ingest.apply(records)
        ingest.observe(outcome, records)
        await ingest.flush_report()
        await ingest.flush_report()  # nothing pending: nothing counted twice
    finally:
        await ingest.aclose()
    keys = [k async for k in redis_client.scan_iter(match=f"{key_prefix}:{{report}}:m:*")]
    fields: dict[str, int] = {}
    for k in keys:
        for name, n in (await redis_client.hgetall(k)).items():
            fields[name.decode() if isinstance(name, bytes) else name] = int(n)
    assert sum(fields.values()) == 40
    assert set(fields) <= set(FRESHNESS_FIELDS)
    for k in keys:
        assert await redis_client.pttl(k) > 0
