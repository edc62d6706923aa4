"""A Redis that refuses writes for now (out of memory, a replica, a long script) is waited
for, like one that is down: the batch is retried, never counted as applied, erased or dead."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.events import Event, EventType, encode_event
from stream_engine.ingest import Ingest
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.store import store_unavailable

CATALOG = Catalog(generate(200))
ITEMS = [it.item_id for it in CATALOG.items]


def test_refusals_are_told_from_errors_of_the_batch_itself() -> None:
    assert store_unavailable(OutOfMemoryError("command not allowed when used memory"))
    assert store_unavailable(ReadOnlyError("You can't write against a read only replica."))
    assert store_unavailable(ResponseError("BUSY Redis is busy running a script."))
    assert store_unavailable(ConnectionError("refused"))
    assert not store_unavailable(ResponseError("ERR user_script:3: attempt to compare nil"))
    assert not store_unavailable(ValueError("bad event"))


def _view(offset: int, sid: str, item: str, now: int) -> Record:
    event = Event(f"e{offset}", EventType.VIEW, sid, now, item_id=item)
    return Record(0, offset, sid.encode(), encode_event(event), now)


@pytest.mark.integration
async def test_an_out_of_memory_redis_holds_the_batch_until_it_has_room(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _proc = private_redis
    admin = aioredis.Redis.from_url(url)
    metrics = WorkerMetrics()
    ingest = Ingest(Settings(redis_url=url, key_prefix="oom"), CATALOG, metrics)
    now = int(time.time() * 1000)
    try:
        first = await ingest.apply([_view(1, "s1", ITEMS[0], now)])
        assert first.applied == 1
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", str(used // 2))
        batch = [_view(2, "s2", ITEMS[1], now), _view(3, "s1", ITEMS[2], now)]
        pending = asyncio.create_task(ingest.apply(batch))
        await asyncio.sleep(1.0)
        assert not pending.done()  # waiting for room, not dropping or dead-lettering
        assert (metrics.registry.get_sample_value("kairos_store_errors_total") or 0) >= 1
        assert await admin.exists("oom:{s2}:s") == 0
        await admin.config_set("maxmemory", "0")
        outcome = await asyncio.wait_for(pending, 10)
    finally:
        await admin.config_set("maxmemory", "0")
        await ingest.aclose()
        await admin.aclose()
    assert (outcome.applied, outcome.blocked, outcome.dead) == (2, 0, [])
    # Each batch's apply time is recorded once, the wait for room included.
    sample = metrics.registry.get_sample_value
    assert sample("kairos_batch_apply_seconds_count") == 2
    assert (sample("kairos_batch_apply_seconds_sum") or 0) >= 1.0
    assert sample("kairos_batch_apply_seconds_bucket", {"le": "0.25"}) == 1
    check = aioredis.Redis.from_url(url)
    try:
        assert await check.hget("oom:{s2}:s", "n") == b"1"
        assert await check.hget("oom:{s1}:s", "n") == b"2"
    finally:
        await check.aclose()


@pytest.mark.integration
async def test_a_lost_write_that_kafka_cannot_give_back_yet_holds_the_batch(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """Redis behind what this worker wrote (StoreRegressed) while the broker is out of
    reach: the worker neither crashes nor goes on past the gap; it waits and retries."""
    url, _proc = private_redis
    admin = aioredis.Redis.from_url(url)
    metrics = WorkerMetrics()
    settings = Settings(redis_url=url, key_prefix="gap", kafka_bootstrap="127.0.0.1:1")
    ingest = Ingest(settings, CATALOG, metrics)
    now = int(time.time() * 1000)
    try:
        first = await ingest.apply([_view(n, f"s{n}", ITEMS[n], now) for n in (1, 2, 3)])
        assert (first.applied, ingest.written_through) == (3, {0: 3})
        await admin.hset(Keys("gap").agg_fence, "0", "1")  # Redis lost offsets 2 and 3
        ingest.processor().cache.clear()  # as after the errors a failover causes
        pending = asyncio.create_task(ingest.apply([_view(4, "s4", ITEMS[4], now)]))
        # Meanwhile a commit of partition 0 (of batches applied before) notes the gap's
        # end, for the next owner to find it if this worker stops (Ingest.check_notes):
        # also while an attempt to read it again is under way.
        notes: set[str] = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            notes.add(ingest.commit_note(0))
            await asyncio.sleep(0)
        assert notes == {"kairos:1:0:3"}
        assert not pending.done()
        assert (metrics.registry.get_sample_value("kairos_store_regressions_total") or 0) >= 1
        assert await admin.exists("gap:{s4}:s") == 0  # not applied past the gap
        assert ingest.written_through == {0: 3}  # still known to be missing
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    finally:
        await ingest.aclose()
        await admin.aclose()
