"""Benchmarks and load tests; they drive Kairos from outside, over Kafka, Redis and HTTP.

python -m loadtest ingest [--rates 1000,5000,10000] [--duration 15] [--repeats 3]
                        [--engines faust,aiokafka]
    python -m loadtest memory [--sessions 100000] [--events-per-session 4]
    python -m loadtest simulate [--rate 20] [--sessions 200] [--duration 0]
    python -m loadtest decisions [--rates 500,1000,2000,3000] [--duration 10] [--repeats 3]
                                 [--sessions 100000] [--items 10000] [--rss-items 100000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvloop

from loadtest import decisions, ingest, memory, simulate


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
    sim = sub.add_parser("simulate", help="simulated shoppers for the demo, until stopped")
    sim.add_argument("--rate", type=float, default=20.0)
    sim.add_argument("--sessions", type=int, default=200)
    sim.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = forever")
    args = parser.parse_args(argv)
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
