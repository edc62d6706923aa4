"""Redis memory per session: push N realistic sessions through a real worker, then read
INFO memory and MEMORY USAGE.

    python -m loadtest memory [--sessions 100000] [--events-per-session 4] [--engine aiokafka]

Reports the growth of `used_memory` divided by the sessions written (conservative: it also
counts the co-visitation and trending keys those sessions created) and the median
MEMORY USAGE of a sample of session keys (hash + impressions).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from loadtest.ingest import (
    Bench,
    _cleanup,
    _create_topics,
    discard_workdir,
    start_worker,
    stop_worker,
)
from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import write_demo_catalog

TOPICS = ("clickstream", "dlq", "catalog", "decisions")


async def _used_memory(redis: aioredis.Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def _applied(redis: aioredis.Redis, prefix: str, sids: list[str]) -> int:
    total = 0
    for start in range(0, len(sids), 5000):
        pipe = redis.pipeline(transaction=False)
        for sid in sids[start : start + 5000]:
            pipe.hget(f"{prefix}:{{{sid}}}:s", "n")
        total += sum(int(n or 0) for n in await pipe.execute())
    return total


async def run(sessions: int, per_session: int, engine: str) -> dict[str, Any]:
    bench = Bench.from_env()
    redis = aioredis.Redis.from_url(bench.redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="kairos-memory-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", 10_000)
    traffic = Traffic(load_items(catalog), active_sessions=sessions,
                      mean_session_events=10**9)  # fmt: skip
    await _create_topics(bench, [bench.topic(n) for n in TOPICS])
    before = await _used_memory(redis)
    worker = start_worker(bench, engine, catalog, workdir)
    producer = AIOKafkaProducer(**bench.kafka(), linger_ms=5)
    await producer.start()
    sent: set[str] = set()
    total = sessions * per_session
    t0 = time.monotonic()
    try:
        for _ in range(total):
            sid, value, _seq = traffic.next_event()
            sent.add(sid)
            await producer.send(bench.topic("clickstream"), value, key=sid.encode())
        await producer.flush()
        print(f"produced {total} events for {len(sent)} sessions in "
              f"{time.monotonic() - t0:.0f}s; waiting for the worker ...", flush=True)  # fmt: skip
        sids = sorted(sent)
        deadline = time.monotonic() + 900
        while (done := await _applied(redis, bench.prefix, sids)) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{total} events applied after 15 minutes")
            await asyncio.sleep(2)
        elapsed = time.monotonic() - t0
        after = await _used_memory(redis)
        sample = sids[:: max(1, len(sids) // 1000)]
        usage = []
        for sid in sample:
            # samples=0: every field. By default MEMORY USAGE extrapolates from five, and a
            # session hash's one large field (the vector) made the median 768 bytes in one
            # run and 1,392 in another; counted exactly it is 1,032 in both of two runs
            s = await redis.memory_usage(f"{bench.prefix}:{{{sid}}}:s", samples=0) or 0
            imp = await redis.memory_usage(f"{bench.prefix}:{{{sid}}}:imp", samples=0) or 0
            usage.append(int(s) + int(imp))
        report = {
            "sessions": len(sids),
            "events": total,
            "seconds_to_apply": round(elapsed, 1),
            "used_memory_growth_bytes": after - before,
            "bytes_per_session_incl_aggregates": round((after - before) / len(sids)),
            "session_keys_median_bytes": statistics.median(usage),
        }
    finally:
        await producer.stop()
        stop_worker(worker)
        await _cleanup(bench, redis)
        await redis.aclose()
    discard_workdir(workdir)
    for k, v in report.items():
        print(f"  {k:<36} {v}")
    return report
