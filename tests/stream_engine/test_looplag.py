"""The worker's loop-lag histogram: a loop held by a long piece of work shows as a tick
late by about that long."""

from __future__ import annotations

import asyncio
import time

from stream_engine.looplag import LoopLag
from stream_engine.metrics import WorkerMetrics


def _bucket(metrics: WorkerMetrics, le: str) -> float:
    value = metrics.registry.get_sample_value("kairos_worker_loop_lag_seconds_bucket",
                                              {"le": le})  # fmt: skip
    assert value is not None
    return value


async def test_a_held_loop_is_one_late_tick_in_the_histogram() -> None:
    metrics = WorkerMetrics()
    task = asyncio.create_task(LoopLag(observe=metrics.loop_lag.observe).run())
    try:
        await asyncio.sleep(0.1)
        assert _bucket(metrics, "+Inf") >= 5  # ticking
        end = time.perf_counter() + 0.06  # what a long batch does to the loop
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert _bucket(metrics, "0.1") - _bucket(metrics, "0.05") >= 1  # the held tick, ~55 ms late
    assert _bucket(metrics, "0.005") >= 5  # the others on time
