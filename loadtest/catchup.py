"""Decisions while a worker catches up a backlog, beside the same load with the worker idle.

    python -m loadtest catchup [--backlog 100000] [--rate 1000] [--duration 20]
                               [--repeats 2] [--engine faust] [--items 10000]
                               [--legs idle,yield,no-yield]

The SRE's question after an outage or a deploy: a worker comes back to a backlog and
applies it as fast as it can; does the decision API still answer personalized, in budget,
while it does? One API process serves throughout. Each repeat runs three legs, their order
turned around every repeat:

* `idle`: the worker is caught up and running; the API is driven at --rate open-loop for
  --duration seconds. The same run's baseline.
* `yield`: --backlog events are produced with the worker stopped; the API is driven as
  above and the worker started 2 s in (it yields to the API: stream_engine/pressure.py).
* `no-yield`: the same with KAIROS_YIELD_TO_API=false.

Each leg reports decision latency (from the intended send time) p50/p99/p99.9, the share
of answers that degraded (timeout, overload, store_unavailable) and, for the catch-ups,
how long after its start the worker had committed the whole backlog. The decisions ask for
sessions of the backlog, drawn uniformly: while it is being applied, many are not there yet
and get the cold-start ladder (`no_signal`, not degradation).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from loadtest.decisions import (
    TOPICS,
    Step,
    inside_text,
    measure,
    record_run,
    start_api,
    tear_down,
    wait_ready,
)
from loadtest.http import Client, free_port
from loadtest.ingest import (
    Bench,
    _create_topics,
    check_worker,
    start_worker,
    stop_worker,
    warn_bystanders,
)
from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import write_demo_catalog

LEGS = ("idle", "yield", "no-yield")
WORKER_AFTER_S = 2.0  # into the measured leg (after its warm-up), the worker starts
WARMUP_S = 1.0
DRAIN_WITHIN_S = 300.0


class Backlog:
    """Clickstream for the bench's topic, and where the worker's group has got to."""

    def __init__(self, bench: Bench, catalog: Path) -> None:
        self.bench = bench
        self.topic = bench.topic("clickstream")
        self.traffic = Traffic(load_items(catalog), active_sessions=20_000)
        self.sessions: list[str] = []

    async def produce(self, n: int) -> list[str]:
        """n events; the sessions they touch."""
        producer = AIOKafkaProducer(**self.bench.kafka(), linger_ms=5)
        await producer.start()
        touched: set[str] = set()
        try:
            for _ in range(n):
                sid, value, _seq = self.traffic.next_event()
                touched.add(sid)
                await producer.send(self.topic, value, key=sid.encode())
            await producer.flush()
        finally:
            await producer.stop()
        return sorted(touched)

    async def ends(self) -> dict[int, int]:
        consumer = AIOKafkaConsumer(**self.bench.kafka())
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.bench.partitions)]
            return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
        finally:
            await consumer.stop()

    async def wait_committed(
        self, ends: dict[int, int], within_s: float, alive: Callable[[], None] | None = None
    ) -> float | None:
        """Seconds until the worker's group has committed up to `ends` (None: not within).
        `alive` raises if the worker has exited (checked at every look)."""
        admin = AIOKafkaAdminClient(**self.bench.kafka())
        await admin.start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < within_s:
                offsets = await admin.list_consumer_group_offsets(f"kairos-{self.bench.prefix}")
                done = {tp.partition: m.offset for tp, m in offsets.items()
                        if tp.topic == self.topic}  # fmt: skip
                if all(done.get(p, -1) >= end for p, end in ends.items()):
                    return time.monotonic() - t0
                if alive is not None:
                    alive()
                await asyncio.sleep(0.2)
            return None
        finally:
            await admin.close()


async def leg(
    name: str, backlog: Backlog, client: Client, api_pid: int, args: dict[str, Any],
    catalog: Path, workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    bench, engine, rate = backlog.bench, args["engine"], args["rate"]
    extra = {"KAIROS_YIELD_TO_API": "false" if name == "no-yield" else "true"}
    worker: subprocess.Popen[bytes] | None = None
    catching: asyncio.Task[float | None] | None = None
    pick = random.Random(len(backlog.sessions))
    try:
        if name == "idle":
            # caught up and running: whatever the last leg left is applied first
            worker = start_worker(bench, engine, catalog, workdir, extra)
            alive = functools.partial(check_worker, worker, workdir, engine)
            if await backlog.wait_committed(await backlog.ends(), DRAIN_WITHIN_S, alive) is None:
                raise RuntimeError("the worker did not catch up before the idle leg")
            sids = backlog.sessions
        else:
            sids = await backlog.produce(args["backlog"])
            backlog.sessions = sids
            ends = await backlog.ends()

        async def catch_up() -> float | None:
            """Starts the worker 2 s into the leg; seconds until it committed the backlog."""
            nonlocal worker
            await asyncio.sleep(WARMUP_S + WORKER_AFTER_S)
            worker = start_worker(bench, engine, catalog, workdir, extra)
            alive = functools.partial(check_worker, worker, workdir, engine)
            return await backlog.wait_committed(ends, DRAIN_WITHIN_S, alive)

        if worker is None:
            catching = asyncio.create_task(catch_up())
        step = await measure(
            client, "slots", rate, args["duration"], WARMUP_S,
            lambda i: f"/v1/slots/home_recs?session_id={sids[pick.randrange(len(sids))]}",
            api_pid,
        )  # fmt: skip
        drain_s = None if catching is None else await catching
        return _row(name, step, drain_s, args["backlog"] if name != "idle" else 0)
    finally:
        if catching is not None and not catching.done():  # the leg failed: no late start
            catching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await catching
        if worker is not None:
            stop_worker(worker)


def _row(name: str, step: Step, drain_s: float | None, events: int) -> dict[str, Any]:
    return {
        "leg": name,
        **asdict(step.latency),
        "answered": step.answered,
        "errors": step.errors,
        "degraded": step.degraded,
        "degraded_share": step.degraded_share,
        "fallbacks": step.fallbacks,
        "cpu": step.cpu,
        "inside": step.inside,  # the API's handler and state-read p50/p99 (api_split)
        "drain_s": None if drain_s is None else round(drain_s, 1),
        "applied_per_s": round(events / drain_s) if drain_s else None,
    }


def _print_row(rep: int, r: dict[str, Any]) -> None:
    drain = "" if r["leg"] == "idle" else (
        f"  backlog applied in {r['drain_s']} s ({r['applied_per_s']}/s)" if r["drain_s"]
        else "  backlog NOT applied within the wait"
    )  # fmt: skip
    print(f"  repeat {rep + 1} {r['leg']:<8} p50 {r['p50']:6.2f}  p99 {r['p99']:7.2f}  "
          f"p99.9 {r['p999']:7.2f} ms  answered {r['answered']}  errors {r['errors']}  "
          f"degraded {r['degraded']} ({100 * r['degraded_share']:.2f}%){drain}  "
          + "  ".join(f"cpu {k} {v:.0f}%" for k, v in r["cpu"].items())
          + inside_text(r.get("inside", {})), flush=True)  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    print(
        "\nmedian over repeats (latency in ms from the intended send time); degraded: all "
        "repeats together; applied: the backlog from the worker's start to its last commit"
    )
    print(f"{'leg':<9} {'p50':>7} {'p99':>7} {'p99.9':>7} {'degraded':>16} {'applied in':>11}")
    summary: dict[str, Any] = {}
    for name in LEGS:
        mine = [r for r in rows if r["leg"] == name]
        if not mine:
            continue
        drains = [r["drain_s"] for r in mine if r["drain_s"] is not None]
        s = {
            "p50": statistics.median(r["p50"] for r in mine),
            "p99": statistics.median(r["p99"] for r in mine),
            "p999": statistics.median(r["p999"] for r in mine),
            "degraded": sum(r["degraded"] for r in mine),
            "answered": sum(r["answered"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "drain_s": statistics.median(drains) if drains else None,
            "undrained": len(mine) - len(drains) if name != "idle" else 0,
        }
        summary[name] = s
        share = s["degraded"] / s["answered"] if s["answered"] else 0.0
        drain = "-" if name == "idle" else (f"{s['drain_s']:.1f} s" if s["drain_s"] else "no")
        print(f"{name:<9} {s['p50']:7.2f} {s['p99']:7.2f} {s['p999']:7.2f} "
              f"{s['degraded']:>7} ({100 * share:5.2f}%) {drain:>11}")  # fmt: skip
    idle = summary.get("idle")
    if idle and idle["p99"]:
        for name in ("yield", "no-yield"):
            if name in summary:
                print(f"{name} p99 / idle p99: {summary[name]['p99'] / idle['p99']:.2f}x")
    return summary


async def run(
    backlog_events: int, rate: int, duration: float, repeats: int, engine: str, items: int,
    out_dir: Path, legs: tuple[str, ...] = LEGS,
) -> dict[str, Any]:  # fmt: skip
    bench = Bench.from_env()
    args = {"backlog": backlog_events, "rate": rate, "duration": duration, "engine": engine}
    workdir = Path(tempfile.mkdtemp(prefix="kairos-catchup-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", items)
    redis = aioredis.Redis.from_url(bench.redis_url)
    await _create_topics(bench, [bench.topic(n) for n in TOPICS])
    strangers = warn_bystanders()
    backlog = Backlog(bench, catalog)
    proc: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    try:
        # a first backlog applied before the API starts: the idle leg has sessions to ask
        # for, and the API's trending and co-visitation are there from the start
        backlog.sessions = await backlog.produce(backlog_events)
        worker = start_worker(bench, engine, catalog, workdir)
        alive = functools.partial(check_worker, worker, workdir, engine)
        try:
            if await backlog.wait_committed(await backlog.ends(), DRAIN_WITHIN_S, alive) is None:
                raise RuntimeError("the worker did not apply the first backlog")
        finally:
            stop_worker(worker)
        port = free_port()
        proc = start_api(bench, catalog, workdir, port)
        client = Client("127.0.0.1", port)
        await wait_ready(client, proc)
        rows: list[dict[str, Any]] = []
        for rep in range(repeats):
            for name in legs if rep % 2 == 0 else tuple(reversed(legs)):
                row = await leg(name, backlog, client, proc.pid, args, catalog, workdir)
                _print_row(rep, row)
                rows.append(row)
        summary = summarize(rows)
        setup = {**args, "repeats": repeats, "items": items, "legs": legs,
                 "worker_after_s": WORKER_AFTER_S}  # fmt: skip
        await record_run(out_dir, "catchup", summary, {"legs": rows}, redis, strangers, setup,
                         workdir)  # fmt: skip
        return summary
    finally:
        await tear_down(bench, redis, client, proc)
