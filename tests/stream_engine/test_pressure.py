"""A worker yields Redis to the API: the governor's arithmetic, and the counter between
them on the real Redis (the API's report, the worker's watch)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from api.pressure import MIN_SLOW, SlowReads, report_commands
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.events import Event, EventType, encode_event
from stream_engine.ingest import Ingest
from stream_engine.metrics import WorkerMetrics
from stream_engine.pressure import (
    BURST_S,
    DECREASE,
    HOLD_S,
    RATE_WINDOW_S,
    RELEASE_S,
    WATCH_EVERY_S,
    Governor,
    PressureWatch,
)
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.state import Keys
from tests.conftest import Stack, wait_for


def busy(gov: Governor, rate: float, now: float) -> None:
    """Admits events at `rate`/s over the RATE_WINDOW_S before `now`."""
    steps = 10
    for i in range(steps):
        gov.charge(int(rate * RATE_WINDOW_S / steps), now - RATE_WINDOW_S + (i + 0.5) * 0.05)


def limit_of(gov: Governor) -> float | None:
    return gov.limit  # a call: mypy keeps no narrowing of it across ticks


def started(gov: Governor, now: float) -> Governor:
    """A worker whose slow start is over: its first batch RELEASE_S ago, no reports."""
    gov.charge(1, now - RELEASE_S)
    gov.tick(False, now)
    assert gov.limit is None
    return gov


def test_a_worker_starts_at_the_floor_and_climbs_free_without_reports() -> None:
    gov = Governor(min_rate=2000)
    assert gov.limit == 2000
    for t in range(100):  # no batch yet: the clock has not started
        gov.tick(False, t * WATCH_EVERY_S)
    assert gov.limit == 2000
    assert gov.charge(100, 10.0) == 0  # the first batch (within the burst)
    assert gov.charge(1000, 10.0) == pytest.approx(1000 / 2000)  # the burst is spent
    gov.tick(False, 10.0 + WATCH_EVERY_S)
    gov.tick(False, 11.0)
    assert gov.limit == pytest.approx(2000 + 2 * 2000 * WATCH_EVERY_S)
    for t in range(int(RELEASE_S / WATCH_EVERY_S)):
        gov.tick(False, 11.0 + t * WATCH_EVERY_S)
    assert limit_of(gov) is None
    assert gov.charge(100_000, 30.0) == 0


def test_a_report_halves_the_applied_rate_and_quiet_lets_it_climb_back() -> None:
    gov = started(Governor(min_rate=1000), 9.0)
    busy(gov, 8000, 10.0)
    gov.tick(True, 10.0)
    assert gov.limit == pytest.approx(8000 * DECREASE, rel=0.05)
    first = gov.limit
    gov.tick(True, 10.0 + HOLD_S / 2)  # the cut has not shown yet: no second cut
    assert gov.limit == first
    busy(gov, 3000, 11.0)
    gov.tick(True, 11.0)
    assert gov.limit == pytest.approx(1500, rel=0.05)
    busy(gov, 500, 12.0)
    gov.tick(True, 12.0)
    assert gov.limit == 1000  # never below the floor
    gov.tick(False, 12.1)
    assert gov.limit == pytest.approx(1000 + 1000 * WATCH_EVERY_S)
    gov.tick(False, 12.0 + RELEASE_S)
    assert gov.limit is None


def test_a_disabled_governor_ignores_reports() -> None:
    gov = Governor(min_rate=1000, enabled=False)
    busy(gov, 8000, 10.0)
    gov.tick(True, 10.0)
    assert gov.limit is None


@given(
    limit=st.floats(500, 20_000),
    batches=st.lists(st.integers(1, 500), min_size=20, max_size=200),
)
def test_a_paced_worker_applies_no_faster_than_its_limit(limit: float, batches: list[int]) -> None:
    gov = Governor(min_rate=limit)
    gov.limit, gov.stamp = limit, 0.0
    now = 0.0
    for n in batches:
        now += gov.charge(n, now)  # each batch waits what it is told, then is applied
    # The first BURST_S of the rate came free; everything after waited its turn.
    assert sum(batches) <= limit * (now + BURST_S) + 1e-6 * limit
    assert gov.waited_s == pytest.approx(now)


def test_the_watch_reports_only_a_counter_that_went_up() -> None:
    watch = PressureWatch()
    assert not watch.seen(b"41")  # the first look learns where it stands
    assert not watch.seen(b"41")
    assert watch.seen(b"42")
    assert not watch.seen(None)  # expired
    assert watch.seen(b"1")  # and counted again from nothing
    assert not watch.seen(b"lots")  # not a number (written by something else): as none
    assert watch.seen(b"2")


def test_a_window_reports_only_enough_slow_reads() -> None:
    reads = SlowReads(0.005)
    for _ in range(1000):
        reads.read(0.0004)
    reads.read(0.006)
    assert not reads.take()  # one slow read of a thousand is noise
    for _ in range(MIN_SLOW):
        reads.read(0.0051)
    assert reads.take()
    assert not reads.take()  # a new window
    reads.failed()
    reads.failed()
    assert reads.take()  # timeouts and an open breaker count as slow


@pytest.mark.integration
async def test_the_worker_slows_down_when_the_api_reports_and_climbs_back_after(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    settings = Settings(redis_url=stack.redis_url, key_prefix=key_prefix, yield_min_rate=500)
    metrics = WorkerMetrics()
    ingest = Ingest(settings, Catalog(generate(20)), metrics)
    key = Keys(key_prefix).pressure
    stopping = asyncio.Event()
    watch = asyncio.create_task(ingest.watch_pressure(redis_client, stopping))
    try:
        await asyncio.sleep(3 * WATCH_EVERY_S)  # a first look: the counter is not there
        assert ingest.governor.limit == 500  # the slow start; no batch yet, so no climb
        for _ in range(3):  # what an API sends for a window of slow reads
            for command in report_commands(key):
                await redis_client.execute_command(*command)  # type: ignore[no-untyped-call]
            await asyncio.sleep(2 * WATCH_EVERY_S)
        await wait_for(lambda: _limit(ingest) > 0, 2, "a limit")
        # The worker was idle: the floor, plus what the quiet looks between reports added.
        cut = _limit(ingest)
        assert 500 <= cut <= 700
        assert metrics.apply_limit._value.get() >= 500
        await asyncio.sleep(5 * WATCH_EVERY_S)  # no more reports
        assert _limit(ingest) > cut
        assert metrics.pressure_reports._value.get() >= 1
        assert await redis_client.pttl(key) > 0
    finally:
        stopping.set()
        await asyncio.wait_for(watch, 2)
        await ingest.aclose()


@pytest.mark.integration
async def test_a_pressure_counter_of_another_type_does_not_stop_the_watch(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The watch read the counter with GET and stopped on the error of a key of another
    type (written by something else), and the API's reports failed on it: the worker
    never yielded to the API again. Now the watch reads it as no report and the API's
    next report starts the counter again."""
    settings = Settings(redis_url=stack.redis_url, key_prefix=key_prefix, yield_min_rate=500)
    ingest = Ingest(settings, Catalog(generate(20)), WorkerMetrics())
    key = Keys(key_prefix).pressure
    await redis_client.rpush(key, "not", "a", "counter")
    stopping = asyncio.Event()
    watch = asyncio.create_task(ingest.watch_pressure(redis_client, stopping))
    try:
        await asyncio.sleep(3 * WATCH_EVERY_S)
        assert not watch.done()
        for _ in range(3):
            for command in report_commands(key):
                await redis_client.execute_command(*command)  # type: ignore[no-untyped-call]
            await asyncio.sleep(2 * WATCH_EVERY_S)
        await wait_for(lambda: _limit(ingest) > 0, 2, "a limit")
        assert await redis_client.get(key) == b"3"
        assert await redis_client.pttl(key) > 0
    finally:
        stopping.set()
        await asyncio.wait_for(watch, 2)
        await ingest.aclose()


def _limit(ingest: Ingest) -> float:
    return ingest.governor.limit or 0.0


def test_a_limited_worker_takes_a_batch_in_slices_of_its_burst() -> None:
    gov = Governor(min_rate=2000)
    assert gov.slice() == int(2000 * BURST_S)
    gov.limit = None
    assert gov.slice() is None


@pytest.mark.integration
async def test_a_batch_applied_in_slices_counts_every_event_once(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    catalog = Catalog(generate(50))
    ingest = Ingest(Settings(redis_url=stack.redis_url, key_prefix=key_prefix,
                             yield_min_rate=2000), catalog, WorkerMetrics())  # fmt: skip
    now = int(time.time() * 1000)
    records = [
        Record(i % 2, i, f"s{i % 40}".encode(),
               encode_event(Event(f"e{i}", EventType.VIEW, f"s{i % 40}", now + i,
                                  item_id=catalog.items[i % 50].item_id)), now)
        for i in range(250)
    ]  # fmt: skip
    try:
        assert ingest.governor.slice() == 100  # the slow start: 2,000/s, 100 at once
        outcome = await ingest.apply(records)
        assert outcome.applied == 250
        assert len(outcome.valid) == 250
        # 100 went at once; the other 150 waited their turn at 2,000/s (less the time
        # the slices before them took to write)
        assert 0 < ingest.governor.waited_s <= 150 / 2000 + 0.005
        replay = await ingest.apply(records)  # redelivered whole: every slice is fenced
        assert replay.applied == 0
        assert replay.duplicates == 250
    finally:
        await ingest.aclose()
    counts = [int(await redis_client.hget(Keys(key_prefix).session(f"s{s}"), "n") or 0)
              for s in range(40)]  # fmt: skip
    assert sum(counts) == 250
