"""The ingest bench's keep-up measures: backlog growth and freshness by third of the run."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError

from loadtest.ingest import (
    Bench,
    CpuMeter,
    Visibility,
    _report_dead_watcher,
    _worker_line,
    bystanders,
    p50_by_third,
    parse_sums,
    slope,
    stack_pids,
    worker_means,
)
from loadtest.traffic import TRACKED
from stream_engine.metrics import WorkerMetrics
from stream_engine.store import connect
from tests.conftest import wait_for


def test_a_level_backlog_grows_by_nothing_however_large() -> None:
    assert slope([(t / 4, 3000.0) for t in range(40)]) == pytest.approx(0.0, abs=1e-6)


def test_a_worker_short_of_the_rate_shows_the_shortfall_as_growth() -> None:
    # arrivals 10,000/s, applied 9,000/s: the backlog grows by 1,000 a second
    points = [(t / 4, 200 + 1000 * t / 4) for t in range(40)]
    assert slope(points) == pytest.approx(1000.0)


def test_slope_of_too_few_points_is_zero() -> None:
    assert slope([]) == 0.0
    assert slope([(1.0, 5.0), (1.0, 9.0)]) == 0.0


def test_freshness_by_third_shows_a_worker_falling_behind() -> None:
    start, duration = 100.0, 30.0
    intended = [start + i * 0.01 for i in range(3000)]
    latencies = [0.005 + 0.01 * (t - start) for t in intended]  # 5 ms, growing 10 ms/s
    first, middle, last = p50_by_third(intended, latencies, start, duration)
    assert first < middle < last
    assert first == pytest.approx(55, abs=1)
    assert last == pytest.approx(255, abs=1)


def test_a_third_with_no_events_is_nan_not_zero() -> None:
    thirds = p50_by_third([100.5], [0.004], 100.0, 30.0)
    assert thirds[0] == pytest.approx(4.0)
    assert math.isnan(thirds[1])
    assert math.isnan(thirds[2])


async def test_the_cpu_meter_finds_the_local_redis_and_the_whole_machine(
    redis_client: aioredis.Redis,
) -> None:
    pids = stack_pids(await redis_client.info("server"))
    assert "redis" in pids  # the test stack's Redis runs on this machine
    meter = CpuMeter({"test": os.getpid(), **pids})
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # a busy loop: this process and the machine work
        pass
    used = meter.percent()
    assert used["test"] > 50
    assert 100 / (os.cpu_count() or 1) * 0.5 < used["machine"] <= 100
    assert set(used) >= {"test", "redis", "machine"}


def test_a_process_that_has_gone_is_left_out_not_guessed() -> None:
    proc = subprocess.Popen(["sleep", "0.01"])
    meter = CpuMeter({"gone": proc.pid, "test": os.getpid()})
    proc.wait()
    assert "gone" not in meter.percent()


def test_a_kairos_process_left_running_is_named_and_other_processes_are_not() -> None:
    """A stack's API or worker left up takes CPU from every benchmark figure."""
    sleeper = "import time; time.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", sleeper, "-m", "stream_engine", "worker"])
    other = subprocess.Popen([sys.executable, "-c", sleeper, "-m", "apis"])
    try:
        deadline = time.monotonic() + 5
        found: dict[int, str] = {}
        while worker.pid not in found and time.monotonic() < deadline:
            found = bystanders({os.getpid()})
            time.sleep(0.05)
        assert "stream_engine worker" in found[worker.pid]
        assert other.pid not in found
        assert os.getpid() not in found
        assert worker.pid not in bystanders({worker.pid})
    finally:
        for proc in (worker, other):
            proc.kill()
            proc.wait()


async def test_a_visibility_watcher_that_died_is_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def broken() -> None:
        raise ConnectionError("Connection closed by server.")

    async def waiting() -> None:
        await asyncio.sleep(10)

    died = asyncio.create_task(broken())
    alive = asyncio.create_task(waiting())
    await asyncio.sleep(0)
    _report_dead_watcher(alive)
    assert capsys.readouterr().out == ""
    _report_dead_watcher(died)
    assert "watcher failed mid-run (ConnectionError('Connection closed" in capsys.readouterr().out
    alive.cancel()


@pytest.mark.integration
async def test_an_event_is_visible_once_a_notified_count_covers_it_and_not_before(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = private_redis
    redis = connect(url, timeout_s=5.0)
    await redis.config_set("notify-keyspace-events", "Kh")
    vis = Visibility(redis, "bench")
    sid, other = f"{TRACKED}a", f"{TRACKED}b"
    watcher = asyncio.create_task(vis.watch(0))
    try:
        await asyncio.sleep(0.2)  # subscribed
        t0 = time.monotonic()
        for seq in (1, 2, 3):
            vis.sent(sid, seq, t0)
        vis.sent(other, 1, t0)
        await redis.hset(f"bench:{{{sid}}}:imp", "x", 1)  # not the session hash: ignored
        await redis.hset(f"bench:{{{sid}}}:s", "n", 2)
        await wait_for(lambda: vis.outstanding == 2, 1.0, "two events visible", step=0.01)
        assert len(vis.latencies) == 2
        assert vis.intended == [t0, t0]
        assert all(0 < lat < time.monotonic() - t0 for lat in vis.latencies)
        await asyncio.sleep(0.1)
        assert vis.outstanding == 2  # event 3 and the other session's wait
        await redis.hset(f"bench:{{{sid}}}:s", "n", 3)
        await redis.hset(f"bench:{{{other}}}:s", "n", 1)
        await wait_for(lambda: vis.outstanding == 0, 1.0, "every event visible", step=0.01)
        assert len(vis.latencies) == 4
        assert not watcher.done()
        proc.kill()  # Redis gone: the watcher fails instead of waiting for ever
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(5):
                await watcher
    finally:
        watcher.cancel()
        await redis.aclose()


def test_the_worker_split_is_the_runs_means_from_the_workers_own_metrics() -> None:
    metrics = WorkerMetrics()

    def exported() -> dict[str, tuple[float, float]]:
        return parse_sums(generate_latest(metrics.registry).decode())

    metrics.freshness_produced.observe_many([1.0] * 10)  # before the run: left out
    metrics.handoff_wait.observe_many([1.0] * 10)
    before = exported()
    metrics.freshness_produced.observe_many([0.010, 0.020, 0.030])
    metrics.handoff_wait.observe_many([0.001, 0.002, 0.006])
    for size, seconds in ((2, 0.004), (1, 0.002)):
        metrics.batch_size.observe(size)
        metrics.apply_seconds.observe(seconds)
    means = worker_means(before, exported())
    assert means == pytest.approx(
        {"fresh_ms": 20.0, "wait_ms": 3.0, "apply_ms": 3.0, "batch_events": 1.5}
    )
    assert "(waiting 3.0)" in _worker_line(means)


def test_an_engine_without_a_hand_off_has_no_wait_and_a_silent_worker_no_split() -> None:
    metrics = WorkerMetrics()
    before = parse_sums(generate_latest(metrics.registry).decode())
    metrics.freshness_produced.observe_many([0.004])
    metrics.batch_size.observe(1)
    metrics.apply_seconds.observe(0.001)
    means = worker_means(before, parse_sums(generate_latest(metrics.registry).decode()))
    assert set(means) == {"fresh_ms", "apply_ms", "batch_events"}
    assert "waiting" not in _worker_line(means)
    assert worker_means({}, {}) == {}
    assert _worker_line({}) == ""


def test_the_runs_late_loop_ticks_come_from_the_workers_loop_lag_histogram() -> None:
    metrics = WorkerMetrics()
    for lag in (0.0001, 0.3):  # before the run: left out
        metrics.loop_lag.observe(lag)
    before = parse_sums(generate_latest(metrics.registry).decode())
    for lag in (0.0002, 0.0003, 0.004, 0.015, 0.04):
        metrics.loop_lag.observe(lag)
    means = worker_means(before, parse_sums(generate_latest(metrics.registry).decode()))
    assert means == {"late_ticks": 2.0, "loop_worst_ms": 50.0}
    metrics.loop_lag.observe(9.0)  # beyond the last finite bucket
    assert worker_means(before, parse_sums(generate_latest(metrics.registry).decode()))[
        "loop_worst_ms"
    ] == float("inf")


def test_a_bench_from_the_environment_speaks_to_a_secured_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every bench is built by Bench.from_env and every client of one (the baseline's, the
    admin, the probes) takes bench.kafka(). ingest and drain had built theirs without the
    security the worker they start reads: the baseline spoke plaintext to a SASL_SSL
    listener and the run stopped at once (loadtest/JOURNAL.md, session 39)."""
    monkeypatch.setenv("KAIROS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAIROS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAIROS_KAFKA_SASL_USERNAME", "kairos")
    monkeypatch.setenv("KAIROS_KAFKA_SASL_PASSWORD", "secret")
    kafka = Bench.from_env().kafka()
    assert (kafka["security_protocol"], kafka["sasl_mechanism"], kafka["sasl_plain_username"]) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-512",
        "kairos",
    )
