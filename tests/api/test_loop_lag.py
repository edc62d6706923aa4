"""Reads and deadlines overrun because this process was busy are overloads, not store
failures: they don't open the breaker, and the fallback says so."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.config import SlotKind
from api.decisions import PageAsk, SlotAsk
from api.settings import Settings
from stream_engine.looplag import LoopLag
from tests.api.conftest import client_for, with_


def _burn(seconds: float) -> None:
    """CPU work that holds the event loop, like a request's scoring does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_the_monitor_sees_a_blocked_loop() -> None:
    lag = LoopLag(tick_s=0.005)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.02)
        assert lag.recent_s < 0.04
        _burn(0.05)  # what a burst of other requests' CPU does to the loop
        await asyncio.sleep(0.02)
        assert lag.recent_s >= 0.04
    finally:
        task.cancel()


@pytest.mark.integration
async def test_decisions_late_because_the_process_is_saturated_are_overloads(
    settings: Settings,
) -> None:
    # the production budgets: a loop 20 ms late is an overload only against those
    async with client_for(with_(settings, redis_timeout_ms=15.0, deadline_ms=20.0)) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        slot = next(s for s in rt.serving.config.slots.values() if s.kind is SlotKind.ITEMS)
        page = PageAsk("busy-shopper", None, (SlotAsk(slot, 4),))
        idle = await rt.decide(page)
        assert idle[0].fallback_reason is None or idle[0].fallback_reason.value != "overload"
        stop = asyncio.Event()

        async def request_cpu() -> None:  # 40 requests in flight, 0.5 ms of CPU per step
            while not stop.is_set():
                _burn(0.0005)
                await asyncio.sleep(0)

        busy = [asyncio.create_task(request_cpu()) for _ in range(40)]
        try:
            await asyncio.sleep(0.05)
            answers = [await rt.decide(page) for _ in range(8)]  # > the breaker's 5 failures
        finally:
            stop.set()
            await asyncio.gather(*busy)
        metrics = (await client.get("/metrics")).text
    assert {a[0].fallback_reason.value for a in answers if a[0].fallback_reason} == {"overload"}
    assert rt.breaker.state == "closed"  # Redis was fine: nobody was sent to the defaults
    assert "kairos_api_loop_lag_seconds" in metrics
