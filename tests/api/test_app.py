"""Health, readiness and error shapes, on the real Redis and on an absent one."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from api.settings import Settings
from tests.api.conftest import client_for, with_
from tests.conftest import free_port


def _no_redis(settings: Settings) -> Settings:
    return with_(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")


async def test_healthz_answers_without_dependencies(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_with_the_real_redis(settings: Settings) -> None:
    async with client_for(settings) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["redis"] == "ok"
    assert body["config"] == {"version": "demo-2026-11-22.1", "reload_error": None}


# Holds the (real) Redis busy for ~60 ms: every other client's command waits behind it.
_BUSY_60_MS = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 60000
return 1
"""


async def test_readyz_stays_ready_when_a_ping_outlasts_the_decisions_read_budget(
    settings: Settings,
) -> None:
    """Readiness is "Redis reachable": a busy Redis slows the ping past a decision's 2 ms
    budget, and the API stays in rotation (its decisions fall back on their own)."""
    tight = with_(settings, redis_timeout_ms=2.0, deadline_ms=4.0)
    blocker = aioredis.Redis.from_url(settings.redis_url)
    try:
        async with client_for(tight) as client:
            await blocker.ping()  # connected before the clock starts
            busy = asyncio.ensure_future(blocker.eval(_BUSY_60_MS, 0))
            await asyncio.sleep(0.005)  # the script is running
            started = time.perf_counter()
            response = await client.get("/readyz")
            waited = time.perf_counter() - started
            await busy
    finally:
        await blocker.aclose()
    assert response.status_code == 200, response.text
    assert response.json()["redis"] == "ok"
    assert waited > 0.02  # the ping did wait for the script


async def test_readyz_says_why_when_redis_is_down(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] == "unavailable"


async def test_unknown_paths_answer_json(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}


async def test_without_kafka_decisions_and_beacons_are_answered_and_the_loss_counted(
    settings: Settings,
) -> None:
    """Kafka is reported, not required: decisions are served, beacons accepted (queued for
    librdkafka), /readyz ready with kafka disconnected, and the app stops in bounded time."""
    no_kafka = with_(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}", publish_queue=2)
    started = time.monotonic()
    async with client_for(no_kafka) as client:
        decision = await client.get("/v1/slots/home_recs?session_id=k1")
        ready = await client.get("/readyz")
        events = [{"type": "view", "session_id": "k1", "item_id": "sku-000001"}]
        first = await client.post("/v1/events", json={"events": events})
        second = await client.post("/v1/events", json={"events": events * 2})
        metrics = (await client.get("/metrics")).text
    assert decision.status_code == 200
    assert decision.json()["decision_id"]
    assert decision.elapsed.total_seconds() < 1
    assert ready.status_code == 200
    assert ready.json()["kafka"] == "disconnected"
    assert first.status_code == 202
    # the queue (2) holds the first beacon and the decision's exposure: no room for two more
    assert second.status_code == 503
    assert 'kairos_api_beacon_events_total{outcome="dropped"} 2.0' in metrics
    assert time.monotonic() - started < 30  # start, six requests, a bounded flush at stop
