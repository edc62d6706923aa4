"""What one decision costs the API's CPU, in process, steady to a few percent.

    python -m loadtest cost [--sessions 30000] [--decisions 2000] [--rounds 8]
                            [--items 10000]

The decisions bench (loadtest/decisions.py) measures what a storefront sees, over HTTP at
fixed rates, but its CPU per request moves 10% between runs on this shared machine: too
much to see a change worth 3%. This command measures the decision path itself, in this
process, on state the real worker wrote to the real Redis (seeded through Kafka, as the
decisions bench seeds it), so that a change to it can be judged against the same command
on the code before.

Each round measures, on the same sessions:

  round trip      the cheapest Redis round trip (PING) on the API's own read connections:
                  the same-run baseline, what any read costs before it reads anything;
  decide          `decide_page` and the answer's JSON on sessions already read, back to back;
  decide, cold    the same with a PING awaited (not timed) before each: what the decision
                  costs when the process has just waited on I/O, as in a live API;
  slot_body       the whole endpoint without HTTP: read, decision, exposure, metrics, JSON
                  (CPU of this thread: the librdkafka threads are not in it).

and reports per-decision medians over the rounds, with the spread.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from loadtest.decisions import TOPICS, api_env, seed, write_results
from loadtest.ingest import Bench, _cleanup, _create_topics, environment
from stream_engine.demo_catalog import write_demo_catalog

SLOT = "home_recs"
# In this order in each round: the warm decision first, before the round trips and the
# exposures of the others (librdkafka's threads still sending them) disturb the caches.
MEASURES = ("decide", "decide, cold", "round trip", "slot_body")


@dataclass(frozen=True)
class Spread:
    """Per-decision µs over the rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no rounds measured")
        return cls(statistics.median(values), min(values), max(values))


def summarize(rounds: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and spreads, the cold decision's extra cost, and slot_body beside the round
    trip (how many round trips' worth of CPU a decision is)."""
    spreads = {name: Spread.of(values) for name, values in rounds.items()}
    out: dict[str, Any] = {name: vars(s) for name, s in spreads.items()}
    decide, cold = spreads["decide"].median, spreads["decide, cold"].median
    out["cold_extra_us"] = cold - decide
    out["slot_body_per_round_trip"] = spreads["slot_body"].median / spreads["round trip"].median
    return out


async def cpu_per_call(n: int, call: Callable[[int], Awaitable[object]]) -> float:
    """µs of this thread's CPU per call, over n calls."""
    started = time.thread_time()
    for i in range(n):
        await call(i)
    return (time.thread_time() - started) / n * 1e6


async def measure(bench: Bench, catalog: Path, workdir: Path, sids: list[str], decisions: int,
                  rounds: int) -> dict[str, list[float]]:  # fmt: skip
    """The rounds, in this process, on an API app of its own against the seeded state."""
    os.environ.update(api_env(bench, catalog, workdir))
    # the API's modules only now: they read nothing at import, but loadtest must not need
    # them to start
    from api.app import create_app
    from api.decisions import PageAsk, SlotAsk, decide_page
    from api.endpoints import slot_body
    from api.holdout import Group
    from api.settings import Settings

    app = create_app(Settings.from_env(os.environ))
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        for _ in range(1200):  # the co-visitation warm-up reads ~0.2 s; 60 s at most
            if not rt.covis_warming:
                break
            await asyncio.sleep(0.05)
        serving = rt.serving
        slot = serving.config.slots[SLOT]
        pick = random.Random(7)
        chosen = [sids[pick.randrange(len(sids))] for _ in range(decisions)]
        now_ms = int(time.time() * 1000)
        read: list[tuple[Any, Any, Any]] = []
        for sid in chosen:
            page = PageAsk(sid, None, (SlotAsk(slot, slot.n),))
            view = await rt.reader.read(sid, None, now_ms, 1.0)
            neighbours = await rt._neighbours(page, view, serving, time.perf_counter() + 60)
            read.append((page, view, neighbours))

        async def ping(_: int) -> None:
            await rt.reader.execute([("PING",)], 1.0)

        async def decide(i: int) -> None:
            page, view, neighbours = read[i]
            out = decide_page(serving, page, view, Group.TREATMENT, neighbours, now_ms)
            orjson.dumps(out[0].as_json())

        async def decide_cold(i: int) -> float:
            await ping(i)
            started = time.thread_time()
            await decide(i)
            return time.thread_time() - started

        async def endpoint(i: int) -> None:
            await slot_body(rt, SLOT, {"session_id": chosen[i]}, time.perf_counter())

        out: dict[str, list[float]] = {name: [] for name in MEASURES}
        for r in range(rounds + 1):  # the first round warms up and is left out
            # the last round's exposures sent (they linger 100 ms) and the refresher's turn
            # taken, so that neither lands in this round's decisions
            await asyncio.sleep(1.0)
            figures = {
                "decide": await cpu_per_call(decisions, decide),
                "decide, cold": sum([await decide_cold(i) for i in range(decisions)])
                / decisions * 1e6,
                "round trip": await cpu_per_call(decisions, ping),
                "slot_body": await cpu_per_call(decisions, endpoint),
            }  # fmt: skip
            if r:
                for name, value in figures.items():
                    out[name].append(value)
                print(f"  round {r}  " + "  ".join(f"{k} {v:.1f}" for k, v in figures.items())
                      + " µs", flush=True)  # fmt: skip
        return out


async def run(sessions: int, decisions: int, rounds: int, items: int,
              out_dir: Path) -> dict[str, Any]:  # fmt: skip
    bench = Bench.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="kairos-cost-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", items)
    redis = aioredis.Redis.from_url(bench.redis_url)
    await _create_topics(bench, [bench.topic(n) for n in TOPICS])
    try:
        sids = await seed(bench, catalog, workdir, sessions, 3)
        rounds_out = await measure(bench, catalog, workdir, sids, decisions, rounds)
        summary = summarize(rounds_out)
        print("\nµs of the API's CPU per decision (median over rounds, lowest-highest):")
        for name in MEASURES:
            s = summary[name]
            print(f"  {name:<13} {s['median']:7.1f}  ({s['low']:.1f}-{s['high']:.1f})")
        print(f"  a decision after I/O costs {summary['cold_extra_us']:.1f} µs more than one "
              f"after another; slot_body is {summary['slot_body_per_round_trip']:.1f} Redis "
              "round trips' worth")  # fmt: skip
        summary["environment"] = environment(await redis.info("server"))
        summary["setup"] = {"sessions": len(sids), "decisions": decisions, "rounds": rounds,
                            "items": items, "slot": SLOT}  # fmt: skip
        write_results(out_dir, "cost", {"summary": summary, "rounds": rounds_out}, workdir)
        return summary
    finally:
        await _cleanup(bench, redis)
        await redis.aclose()
