"""Benchmarks and load tests; they drive Kairos from outside, over Kafka, Redis and HTTP.

python -m loadtest ingest [--rates 1000,5000,10000] [--duration 15] [--repeats 3]
                        [--engines faust,aiokafka]
    python -m loadtest memory [--sessions 100000] [--events-per-session 4]
    python -m loadtest run SCENARIO [--api URL] [--bootstrap HOST:PORT] [--out DIR]
                               [--compare PREVIOUS.json] [--slo KEY=VALUE ...]
    python -m loadtest simulate [--rate 20] [--sessions 200] [--duration 0]
    python -m loadtest decisions [--rates 500,1000,2000,3000] [--duration 10] [--repeats 3]
                                 [--sessions 100000] [--items 10000] [--rss-items 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import uvloop

from loadtest import decisions, ingest, memory, simulate
from loadtest.scenario import ScenarioError


async def run_suite(args: Any) -> int:
    import dataclasses

    import redis.asyncio as aioredis

    from loadtest import results
    from loadtest.scenario import load_scenario, verdict
    from loadtest.suite import Runner

    scenario = load_scenario(args.scenario)
    slo = dict(scenario.slo)
    for override in args.slo:
        key, _, value = override.partition("=")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ScenarioError(f"--slo {override!r}: expected KEY=NUMBER") from None
    scenario = dataclasses.replace(scenario, slo=slo)
    runner = Runner(scenario, args.api, args.bootstrap, args.topic)
    steps = await runner.run()
    failures = verdict(scenario, steps)
    invalid = [f"step {i}: {s['invalid_because']}" for i, s in enumerate(steps, 1)
               if not s["valid"]]  # fmt: skip
    redis = aioredis.Redis.from_url(os.environ.get("KAIROS_REDIS_URL", "redis://127.0.0.1:6379"))
    try:
        info = await redis.info("server")
    except (OSError, aioredis.RedisError):
        info = {}
    finally:
        await redis.aclose()
    json_path, html_path = results.write(args.out, scenario, steps, failures + invalid, info,
                                         runner.baseline)  # fmt: skip
    print(f"\nresults: {json_path}\nreport:  {html_path}")
    for i, s in enumerate(steps, start=1):
        lat = s["latency_ms"]
        print(f"  step {i}: offered {s['offered_rate']:g}/s achieved {s['achieved_rate']}/s, "
              f"p50 {lat['p50'] or 0:.2f} p99 {lat['p99'] or 0:.2f} p99.9 {lat['p99.9'] or 0:.2f}"
              f" ms, errors {s['errors']}, degraded {s['degraded_share']:.2%}, freshness p99 "
              f"{s['freshness_ms']['p99']} ms")  # fmt: skip
    if args.compare:
        for line in results.compare(orjson.loads(json_path.read_bytes()), args.compare):
            print(f"REGRESSION {line}")
    if failures or invalid:
        print("VERDICT: FAIL")
        for f in failures + invalid:
            print(f"  - {f}")
        return 1
    print("VERDICT: PASS")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="freshness and throughput of the stream worker")
    ing.add_argument("--rates", default="1000,5000,10000")
    ing.add_argument("--duration", type=float, default=15.0)
    ing.add_argument("--repeats", type=int, default=3)
    ing.add_argument("--engines", default="faust,aiokafka")
    ing.add_argument("--out", type=Path, default=Path("artifacts"))
    mem = sub.add_parser("memory", help="Redis memory per session")
    mem.add_argument("--sessions", type=int, default=100_000)
    mem.add_argument("--events-per-session", type=int, default=4)
    mem.add_argument("--engine", default="aiokafka")
    dec = sub.add_parser("decisions", help="decision API latency beside a static baseline")
    dec.add_argument("--rates", default="500,1000,2000,3000")
    dec.add_argument("--duration", type=float, default=10.0)
    dec.add_argument("--warmup", type=float, default=2.0)
    dec.add_argument("--repeats", type=int, default=3)
    dec.add_argument("--sessions", type=int, default=100_000)
    dec.add_argument("--events-per-session", type=int, default=3)
    dec.add_argument("--items", type=int, default=10_000)
    dec.add_argument("--rss-items", type=int, default=100_000)
    dec.add_argument("--out", type=Path, default=Path("artifacts"))
    run = sub.add_parser("run", help="a scenario of the peak-traffic suite; exit 1 on SLO miss")
    run.add_argument("scenario", help="smoke, peak, spike, soak, overload or a .toml file")
    run.add_argument("--api", default=os.environ.get("KAIROS_API_URL", "http://127.0.0.1:8000"))
    run.add_argument(
        "--bootstrap", default=os.environ.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    run.add_argument("--topic", default=os.environ.get("KAIROS_CLICKSTREAM_TOPIC", "clickstream"))
    run.add_argument("--out", type=Path, default=Path("artifacts"))
    run.add_argument("--compare", type=Path)
    run.add_argument("--slo", action="append", default=[], help="override, e.g. p99_ms=10")
    sim = sub.add_parser("simulate", help="simulated shoppers for the demo, until stopped")
    sim.add_argument("--rate", type=float, default=20.0)
    sim.add_argument("--sessions", type=int, default=200)
    sim.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = forever")
    args = parser.parse_args(argv)
    if args.command == "run":
        try:
            return uvloop.run(run_suite(args))
        except ScenarioError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return 2
    if args.command == "simulate":
        uvloop.run(simulate.run(args.rate, args.sessions, args.duration))
        return 0
    if args.command == "decisions":
        uvloop.run(
            decisions.run(
                [int(r) for r in args.rates.split(",") if r.strip()], args.duration,
                args.warmup, args.repeats, args.sessions, args.events_per_session, args.items,
                args.rss_items, args.out,
            )
        )  # fmt: skip
        return 0
    if args.command == "memory":
        uvloop.run(memory.run(args.sessions, args.events_per_session, args.engine))
        return 0
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    engines = [e for e in args.engines.split(",") if e.strip()]
    uvloop.run(ingest.run(rates, args.duration, args.repeats, engines, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
