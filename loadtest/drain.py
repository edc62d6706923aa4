"""`python -m loadtest drain`: how many events a second one worker process applies when it
has a backlog and the machine to itself: its capacity, apart from the load generator.

The live ingest bench runs the generator (~40% of a core at 10,000 events/s), the broker,
Redis and the worker on one 2-core box, so whether the worker keeps up at 10,000/s there is
as much about the generator's share of the box as about the worker. Here `--events` are
produced first, with no worker running; then one worker starts and applies them. Reported:

* the rate between 10% and 90% applied (the worker's start-up and the tail left out), read
  from the worker's own `kairos_events_total`;
* the worker's and Redis's CPU over that span (% of one core), and the worker's CPU per
  event;
* beside the same run's baseline: a plain aiokafka consumer reading an identical backlog
  and doing nothing with it, the rate Kafka can hand one Python process on this box.

Medians over `--repeats`. The bench's keys and topics are removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadtest.catchup import Backlog
from loadtest.decisions import write_results
from loadtest.http import free_port
from loadtest.ingest import (
    Bench,
    CpuMeter,
    _cleanup,
    _create_topics,
    check_worker,
    environment,
    stack_pids,
    start_worker,
    stop_worker,
    warn_bystanders,
)
from stream_engine.demo_catalog import write_demo_catalog

FROM, TO = 0.1, 0.9  # the span measured, as shares of the backlog applied
POLL_S = 0.1
WITHIN_S = 300.0  # a leg that has not applied its backlog by then reports what it did
_APPLIED = re.compile(rb'^kairos_events_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', re.M)


@dataclass
class Leg:
    kind: str  # "raw" or the engine
    events: int
    rate: float  # events/s between FROM and TO, or over what was done when it stopped early
    done: int  # events applied (or read) when the leg stopped
    finished: bool  # got to TO of the backlog (else `rate` is over the whole leg)
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, over the span
    us_per_event: float = float("nan")  # the worker's (or consumer's) CPU per event


class Span:
    """When a count passed FROM and TO of its target, and the CPU used in between."""

    def __init__(self, target: int, pids: dict[str, int], own: str) -> None:
        self.target = target
        self.pids = pids
        self.own = own  # the process whose CPU per event is reported
        self.t0: float | None = None
        self.meter: CpuMeter | None = None
        self.rate = float("nan")
        self.cpu: dict[str, float] = {}
        self.count0 = 0

    def see(self, count: int) -> bool:
        """Record the count at this moment; True once the span is over."""
        now = time.monotonic()
        if self.t0 is None and count >= FROM * self.target:
            self.t0, self.count0 = now, count
            self.meter = CpuMeter(self.pids)
        if self.t0 is not None and self.meter is not None and count >= TO * self.target:
            if now > self.t0 and count > self.count0:
                self.rate = (count - self.count0) / (now - self.t0)
                self.cpu = self.meter.percent()
            return True
        return False

    def leg(self, kind: str, done: int, started: float) -> Leg:
        finished = self.rate == self.rate
        if not finished:  # never got to TO: what it did over the whole leg
            self.rate = done / max(time.monotonic() - started, 1e-9)
        own = self.cpu.get(self.own, float("nan"))
        per_event = own / 100 / self.rate * 1e6 if self.rate > 0 else float("nan")
        return Leg(kind, self.target, round(self.rate, 1), done, finished, self.cpu,
                   round(per_event, 1))  # fmt: skip


async def raw_leg(bench: Bench, backlog: Backlog, events: int) -> Leg:
    """A plain consumer reads the backlog from the start and drops it."""
    await backlog.produce(events)
    consumer = AIOKafkaConsumer(**bench.kafka(), enable_auto_commit=False)
    await consumer.start()
    span = Span(events, {"consumer": os.getpid()}, "consumer")
    started = time.monotonic()
    read = 0
    try:
        tps = [TopicPartition(backlog.topic, p) for p in range(bench.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while read < events and time.monotonic() - started < WITHIN_S:
            batch = await consumer.getmany(timeout_ms=200)
            read += sum(len(records) for records in batch.values())
            span.see(read)
    finally:
        await consumer.stop()
    return span.leg("raw", read, started)


async def engine_leg(
    bench: Bench, backlog: Backlog, events: int, engine: str, catalog: Path, workdir: Path,
    others: dict[str, int],
) -> Leg:  # fmt: skip
    """The backlog first, then a worker started on it, followed through its own metrics."""
    await backlog.produce(events)
    port = free_port()
    proc = start_worker(bench, engine, catalog, workdir, {"KAIROS_METRICS_PORT": str(port)})
    span = Span(events, {"worker": proc.pid, **others}, "worker")
    started = time.monotonic()
    applied = 0
    try:
        while applied < events and time.monotonic() - started < WITHIN_S:
            check_worker(proc, workdir, engine)
            await asyncio.sleep(POLL_S)
            applied = await asyncio.to_thread(_applied, port)
            if span.see(applied):
                break
    finally:
        stop_worker(proc)
    return span.leg(engine, applied, started)


def _applied(port: int) -> int:
    """Events the worker has applied so far (0 while its metrics are not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read()
    except OSError:
        return 0
    return int(sum(float(v) for v in _APPLIED.findall(body)))


async def run(
    events: int, repeats: int, engines: list[str], out_dir: Path, items: int = 10_000
) -> dict[str, Any]:
    redis_url = os.environ.get("KAIROS_REDIS_URL", "redis://127.0.0.1:6379/0")
    workdir = Path(tempfile.mkdtemp(prefix="kairos-drain-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", items)
    redis = aioredis.Redis.from_url(redis_url)
    server = await redis.info("server")
    others = stack_pids(server)
    strangers = warn_bystanders()
    legs: list[Leg] = []
    benches: list[Bench] = []
    try:
        for rep in range(repeats):
            for kind in ["raw", *engines]:
                bench = Bench.from_env()
                benches.append(bench)
                names = ("clickstream", "dlq", "catalog", "decisions")
                await _create_topics(bench, [bench.topic(n) for n in names])
                backlog = Backlog(bench, catalog)
                if kind == "raw":
                    leg = await raw_leg(bench, backlog, events)
                else:
                    leg = await engine_leg(bench, backlog, events, kind, catalog, workdir, others)
                legs.append(leg)
                print(f"  repeat {rep + 1} {_line(leg)}", flush=True)
                await _cleanup(benches.pop(), redis)  # the next leg starts on a clean Redis
    finally:
        for bench in benches:
            await _cleanup(bench, redis)
        await redis.aclose()
    summary = summarize(legs, ["raw", *engines])
    env = {**environment(server), "other_kairos_processes": strangers}
    body = {"summary": summary, "legs": [asdict(leg) for leg in legs], "environment": env}
    write_results(out_dir, "drain", body, workdir)
    return summary


def _line(leg: Leg) -> str:
    cpu = "".join(f"  cpu {k} {v:.0f}%" for k, v in leg.cpu.items())
    done = "" if leg.finished else f"  stopped at {leg.done:,} of {leg.events:,}"
    return f"{leg.kind:<9} {leg.rate:>9,.0f} events/s  {leg.us_per_event:6.1f} us/event{cpu}{done}"


def summarize(legs: list[Leg], kinds: list[str]) -> dict[str, Any]:
    """Median rate and CPU per kind, and each engine's rate as a share of the raw read's."""
    print(f"\nmedian over repeats, {int(FROM * 100)}% to {int(TO * 100)}% of the backlog")
    print(f"{'path':<9} {'events/s':>10} {'of raw':>7} {'us/event':>9}  worker/consumer cpu")
    summary: dict[str, Any] = {}
    raw_rate = float("nan")
    for kind in kinds:
        mine = [leg for leg in legs if leg.kind == kind]
        if not mine:
            continue
        rate = statistics.median(leg.rate for leg in mine)
        raw_rate = rate if kind == "raw" else raw_rate
        own = "consumer" if kind == "raw" else "worker"
        cpus = [leg.cpu[own] for leg in mine if own in leg.cpu]
        row = {
            "events_per_s": rate,
            "of_raw": rate / raw_rate if raw_rate == raw_rate and raw_rate > 0 else float("nan"),
            "us_per_event": statistics.median(leg.us_per_event for leg in mine),
            "cpu": statistics.median(cpus) if cpus else float("nan"),
            "all_finished": all(leg.finished for leg in mine),
        }
        summary[kind] = row
        unfinished = "" if row["all_finished"] else "  (not all finished)"
        print(f"{kind:<9} {rate:>10,.0f} {row['of_raw']:>7.2f} {row['us_per_event']:>9.1f}"
              f"  {row['cpu']:.0f}%{unfinished}")  # fmt: skip
    return summary
