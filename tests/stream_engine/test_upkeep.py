"""Aggregate sets are trimmed and re-expired on a schedule, not on every write."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.events import Event, EventType, encode_event
from stream_engine.planning import Tuning
from stream_engine.processor import AggregateUpkeep, BatchProcessor, Record, Ttls
from stream_engine.state import Keys

TUNING = Tuning(1_800_000, 14 * 86_400_000, 7 * 86_400_000, 6 * 3_600_000)
TTLS = Ttls(3_600_000, 86_400_000, 86_400_000, 86_400_000)
CATALOG = Catalog(generate(300))
ITEMS = [it.item_id for it in CATALOG.items]


def test_a_set_it_does_not_know_is_checked_and_expired_at_once() -> None:
    upkeep = AggregateUpkeep(ttl_ms=86_400_000)
    assert upkeep.due("cv:a", 50, 1, now_ms=0) == (50, True)
    assert upkeep.due("cv:a", 50, 1, now_ms=0) == (0, False)  # recorded as done


def test_size_is_checked_once_a_quarter_of_keep_arrived() -> None:
    upkeep = AggregateUpkeep(ttl_ms=86_400_000)
    assert upkeep.due("cv:a", 50, 3, now_ms=0)[0] == 50
    sent = 0
    while upkeep.due("cv:a", 50, 5, now_ms=1)[0] == 0:
        sent += 5
    assert sent == 10  # 12 = 50 // 4 is reached by the third write of 5
    assert upkeep.due("cv:a", 50, 1, now_ms=1)[0] == 0


def test_ttl_is_refreshed_after_refresh_ms_and_never_later_than_a_quarter_ttl() -> None:
    upkeep = AggregateUpkeep(ttl_ms=86_400_000, refresh_ms=60_000)
    assert upkeep.due("tr", 1000, 1, now_ms=1_000)[1] is True
    assert upkeep.due("tr", 1000, 1, now_ms=60_999)[1] is False
    assert upkeep.due("tr", 1000, 1, now_ms=61_000)[1] is True
    assert upkeep.due("tr", 1000, 1, now_ms=61_001)[1] is False
    short = AggregateUpkeep(ttl_ms=8_000, refresh_ms=60_000)
    assert short.refresh_ms == 2_000


def test_forget_starts_over_and_so_does_a_full_book() -> None:
    upkeep = AggregateUpkeep(ttl_ms=86_400_000)
    upkeep.due("tr", 1000, 1, now_ms=0)
    upkeep.forget()
    assert upkeep.due("tr", 1000, 1, now_ms=1) == (1000, True)
    upkeep.MAX_KNOWN = 3
    for key in ("a", "b"):
        upkeep.due(key, 1000, 1, now_ms=1)
    assert upkeep.due("tr", 1000, 1, now_ms=1) == (0, False)  # known: nothing forgotten
    assert upkeep.due("c", 1000, 1, now_ms=1) == (1000, True)  # a fourth set: start over
    assert upkeep.due("tr", 1000, 1, now_ms=1) == (1000, True)


@pytest.mark.integration
async def test_a_write_redis_refused_makes_the_schedule_start_over(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The schedule counts a write when it is planned; a fence conflict (another worker
    wrote the partition's aggregates meanwhile) must not leave sets marked as trimmed and
    expired by a write that never happened."""
    keys = Keys(key_prefix)
    proc = BatchProcessor(redis_client, keys, CATALOG, TUNING, TTLS)
    t0 = int(time.time() * 1000) - 60_000
    sid = "conflicted"

    def views(first: int) -> list[Record]:
        return [
            Record(0, first + k, sid.encode(), encode_event(Event(
                f"e{first + k}", EventType.VIEW, sid, t0 + first + k, item_id=ITEMS[k + first])),
                t0)
            for k in range(3)
        ]  # fmt: skip

    try:
        await proc.process(views(0))
        await asyncio.sleep(0.3)
        await redis_client.hset(keys.agg_fence, "0", "7")  # another worker's write
        out = await proc.process(views(10))
        assert out.conflicts >= 1  # refused once, then read again and applied
    finally:
        await proc.aclose()
    # The refused write made it forget, so the retry re-expired the sets it touched: the
    # global trending set's TTL is fresh, not 0.3 s older as the first batch left it.
    assert await redis_client.pttl(keys.trending()) > TTLS.aggregate_ms - 250
    for key in [k async for k in redis_client.scan_iter(match=f"{key_prefix}:{{agg}}:*")]:
        assert await redis_client.pttl(key) > 0, key


@pytest.mark.integration
async def test_sets_stay_near_keep_and_keep_their_ttl_on_the_real_redis(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Many sessions view item 0 then each a different item: item 0's co-visitation set
    receives far more members than it may keep (48: checked every 12 increments)."""
    proc = BatchProcessor(redis_client, Keys(key_prefix), CATALOG, TUNING, TTLS, covisit_keep=48)
    sizes = []
    t0 = int(time.time() * 1000) - 60_000
    offset = 0
    try:
        for batch in range(16):
            records = []
            for s in range(10):
                sid = f"s{batch}-{s}"
                for k, item in enumerate((ITEMS[0], ITEMS[1 + (batch * 10 + s) % 250])):
                    event = Event(f"e{offset}", EventType.VIEW, sid, t0 + offset + k,
                                  item_id=item)  # fmt: skip
                    records.append(Record(0, offset, sid.encode(), encode_event(event), t0))
                    offset += 1
            await proc.process(records)
            size = await redis_client.zcard(Keys(key_prefix).covisit(ITEMS[0]))
            sizes.append(size)
            assert size <= 48 + 48 // 4
    finally:
        await proc.aclose()
    assert max(sizes) > 48  # trimmed on schedule, not after every write
    keys = [k async for k in redis_client.scan_iter(match=f"{key_prefix}:{{agg}}:*")]
    assert len(keys) > 100
    for key in keys:
        assert await redis_client.pttl(key) > 0, key
