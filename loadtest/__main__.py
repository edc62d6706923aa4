"""Benchmarks and load tests; they drive Kairos from outside, over Kafka, Redis and HTTP.

python -m loadtest ingest [--rates 1000,5000,10000] [--duration 15] [--repeats 3]
                        [--engines faust,aiokafka,librdkafka]
                        [--find-max [--search-from 6000] [--max-rate 24000]]
    python -m loadtest memory [--sessions 100000] [--events-per-session 4]
    python -m loadtest run SCENARIO [--api URL] [--bootstrap HOST:PORT] [--out DIR]
                               [--compare PREVIOUS.json] [--slo KEY=VALUE ...]
    python -m loadtest simulate [--rate 20] [--sessions 200] [--duration 0]
    python -m loadtest replay --test LOG.csv [--train LOG.csv] [--k 10] | --generate LOG.csv
    python -m loadtest decisions [--rates 500,1000,2000,3000] [--duration 10] [--repeats 3]
                                 [--sessions 100000] [--items 10000] [--rss-items 100000]
                                 [--find-max [--search-from 1000] [--max-rate 32000]]
    python -m loadtest catchup [--backlog 100000] [--rate 1000] [--duration 20] [--repeats 2]
                               [--engine faust] [--items 10000] [--legs idle,yield,no-yield]
    python -m loadtest stalls [--items 100000] [--changes 100] [--new 10] [--repeats 3]
    python -m loadtest cost [--sessions 30000] [--decisions 2000] [--rounds 8] [--items 10000]
    python -m loadtest drain [--events 300000] [--repeats 3] [--engines faust,aiokafka]
                             [--items 10000]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from loadtest import catchup, cost, decisions, drain, ingest, memory, simulate, stalls
from loadtest.producer import PRODUCERS
from loadtest.scenario import STACK_WARMUP_S, ScenarioError
from stream_engine.cli_args import whole_number
from stream_engine.exceptions import ConfigError
from stream_engine.kafka_security import KafkaSecurity
from stream_engine.settings import (
    DEFAULT_KAFKA_BOOTSTRAP,
    DEFAULT_REDIS_URL,
    ENGINES,
    check_kafka_bootstrap,
)
from stream_engine.store import check_redis_url, connect


def _number(zero_ok: bool, unit: str = "seconds") -> Callable[[str], float]:
    """An argparse type: a finite number (of `unit`), more than 0 (or at least 0)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}")
        if value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if zero_ok else 'more than'} 0, got {text}"
            )
        return value

    return parse


def _rates(text: str) -> list[int]:
    """An argparse type: comma-separated arrival rates a second, each at least 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one rate, e.g. 1000,2000")
    rate = whole_number(1)
    try:
        return [rate(p) for p in parts]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"each rate {exc}") from None


def _engines(text: str) -> list[str]:
    """An argparse type: comma-separated worker engines."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise argparse.ArgumentTypeError(
            f"takes {', '.join(ENGINES)} (comma-separated); got {text!r}"
        )
    return engines


async def run_suite(args: Any) -> int:
    import dataclasses

    import redis.asyncio as aioredis

    from loadtest import results
    from loadtest.scenario import SLO_KEYS, invalid_steps, load_scenario, verdict
    from loadtest.suite import Runner

    scenario = load_scenario(args.scenario)
    slo = dict(scenario.slo)
    for override in args.slo:
        key, _, value = override.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if key not in SLO_KEYS:
            raise ScenarioError(f"--slo {override!r}: KEY is one of {', '.join(SLO_KEYS)}")
        if not 0 <= number <= 1e9:  # as a scenario file's slo table (scenario.py)
            raise ScenarioError(f"--slo {override!r}: expected KEY=NUMBER, a number >= 0")
        slo[key] = number
    scenario = dataclasses.replace(scenario, slo=slo)
    if args.stack_warmup is not None:
        scenario = dataclasses.replace(scenario, stack_warmup_s=args.stack_warmup)
    previous = results.load_previous(args.compare, scenario.name) if args.compare else None
    runner = Runner(scenario, args.api, args.bootstrap, args.topic, args.producer)
    steps = await runner.run()
    failures = verdict(scenario, steps)
    invalid, notes = invalid_steps(scenario, steps)
    # connect(): any URL the services take (a Sentinel one too), not only redis-py's
    redis = connect(os.environ.get("KAIROS_REDIS_URL") or DEFAULT_REDIS_URL, max_connections=1)
    try:
        info = await redis.info("server")
    except (OSError, aioredis.RedisError):
        info = {}
    finally:
        await redis.aclose()
    json_path, html_path = results.write(args.out, scenario, steps, failures + invalid, info,
                                         runner.baseline, notes, runner.stack_warmup)  # fmt: skip
    print(f"\nresults: {json_path}\nreport:  {html_path}")
    for i, s in enumerate(steps, start=1):
        lat = s["latency_ms"]
        print(f"  step {i}: offered {s['offered_rate']:g}/s achieved {s['achieved_rate']}/s, "
              f"p50 {lat['p50'] or 0:.2f} p99 {lat['p99'] or 0:.2f} p99.9 {lat['p99.9'] or 0:.2f}"
              f" ms, errors {s['errors']}, degraded {s['degraded_share']:.2%}, "
              f"cold starts {results.cold_share(s)}, {_freshness(s['freshness_ms'])}{_api_cpu(s)}"
              f"{_undelivered(s)}")  # fmt: skip
    if previous is not None:
        for line in results.compare(orjson.loads(json_path.read_bytes()), previous):
            print(f"REGRESSION {line}")
    print(results.knee_line(results.knee(scenario, steps)))
    for note in notes:
        print(f"NOTE (not a nominal step) {note}")
    if failures or invalid:
        print("VERDICT: FAIL")
        for f in failures + invalid:
            print(f"  - {f}")
        return 1
    print("VERDICT: PASS")
    return 0


def run_cost(args: Any) -> int:
    uvloop.run(cost.run(args.sessions, args.decisions, args.rounds, args.items, args.out))
    return 0


def run_stalls(args: Any) -> int:
    if args.changes * args.repeats > args.items:
        print("loadtest stalls: --changes x --repeats must not exceed --items", file=sys.stderr)
        return 2
    uvloop.run(stalls.run(args.items, args.changes, args.repeats, args.new))
    return 0


# the commands that measure the API in this process
IN_PROCESS = {"cost": run_cost, "stalls": run_stalls}


def _undelivered(step: dict[str, Any]) -> str:
    n = step.get("events_failed", 0)
    return f", {n} events not delivered" if n else ""


def _freshness(f: dict[str, Any]) -> str:
    """The step's freshness line: p99 over the clicks followed, and how many never showed."""
    p99 = "none came back" if f["p99"] is None else f"{f['p99']:.1f} ms"
    lost = f", {f['lost']} lost" if f.get("lost") else ""
    return f"freshness p99 {p99} ({f['samples']} clicks followed{lost})"


def _api_cpu(step: dict[str, Any]) -> str:
    api = step.get("cpu", {}).get("api")
    return "" if api is None else f", API {api:g}% of a core"


async def run_replay(args: Any) -> int:
    import time

    from loadtest import replay
    from stream_engine.catalog import load_items
    from stream_engine.demo_catalog import resolve_catalog_path

    catalog = resolve_catalog_path(os.environ.get("KAIROS_CATALOG_PATH", ""),
                                   os.environ.get("KAIROS_STACK_DIR", ".stack"))  # fmt: skip
    if args.generate:
        print(replay.generate(args.generate, catalog, args.sessions, args.seed, args.anonymous))
        return 0
    if args.test is None:
        print("loadtest replay: give --test LOG.csv (or --generate LOG.csv)", file=sys.stderr)
        return 2
    try:
        train = replay.read_log(args.train) if args.train else []
        test = replay.read_log(args.test)
    except (OSError, ValueError) as exc:
        print(f"loadtest replay: {exc}", file=sys.stderr)
        return 2
    known = {it.item_id for it in load_items(catalog)}
    pipeline = replay.Pipeline(args.api, args.bootstrap, args.topic, args.catalog_topic,
                               args.redis, args.key_prefix,
                               KafkaSecurity.from_env(os.environ))  # fmt: skip
    player = replay.Replayer(pipeline, known, args.k, learn=not args.no_learn)
    result = await player.run_logs(train, test)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"replay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    k = args.k
    for name in ("kairos", "popularity"):
        r = result[name]
        print(f"{name:<11} hit rate@{k} {r[f'hit_rate@{k}']:.3f}  MRR@{k} {r[f'mrr@{k}']:.3f}  "
              f"over {r['questions']} next-item questions")  # fmt: skip
    print(f"{result['registered_items']} items registered without metadata; latent model "
          f"{result['latent_version'] or 'none'}; results: {path}")  # fmt: skip
    return 0


def _search(args: argparse.Namespace) -> tuple[int, int] | None:
    """--find-max's (from, to); raises ValueError on a range that is not one."""
    if not args.find_max:
        return None
    if not 1 <= args.search_from <= args.max_rate:
        raise ValueError("--search-from must be at least 1 and at most --max-rate")
    return args.search_from, args.max_rate


def _searching(
    args: argparse.Namespace, run: Callable[[tuple[int, int] | None], Coroutine[Any, Any, Any]]
) -> int:
    """`run(find)` for a bench with --find-max (2 and a line on a range that is not one)."""
    try:
        find = _search(args)
    except ValueError as exc:
        print(f"loadtest {args.command}: {exc}", file=sys.stderr)
        return 2
    uvloop.run(run(find))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    return _searching(args, lambda find: ingest.run(args.rates, args.duration, args.repeats,
                                                    args.engines, args.out, args.producer,
                                                    find))  # fmt: skip


def _decisions(args: argparse.Namespace) -> int:
    return _searching(args, lambda find: decisions.run(
        args.rates, args.duration, args.warmup, args.repeats, args.sessions,
        args.events_per_session, args.items, args.rss_items, args.out, find,
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="freshness and throughput of the stream worker")
    ing.add_argument("--rates", type=_rates, default="1000,5000,10000")
    ing.add_argument("--duration", type=_number(False), default=15.0)
    ing.add_argument("--repeats", type=whole_number(1), default=3)
    ing.add_argument("--engines", type=_engines, default="faust,aiokafka,librdkafka")
    ing.add_argument(
        "--producer",
        choices=PRODUCERS,
        default="aiokafka",
        help="the client of both the raw and the engines' legs",
    )
    ing.add_argument("--out", type=Path, default=Path("artifacts"))
    ing.add_argument("--find-max", action="store_true",
                     help="also search each engine's highest live rate sustained with flat "
                          "lag (#3: at least 10,000 events/s)")  # fmt: skip
    ing.add_argument("--search-from", type=whole_number(1), default=6000)
    ing.add_argument("--max-rate", type=whole_number(1), default=24_000)
    mem = sub.add_parser("memory", help="Redis memory per session")
    mem.add_argument("--sessions", type=whole_number(1), default=100_000)
    mem.add_argument("--events-per-session", type=whole_number(1), default=4)
    mem.add_argument("--engine", choices=ENGINES, default="aiokafka")
    dec = sub.add_parser("decisions", help="decision API latency beside a static baseline")
    dec.add_argument("--rates", type=_rates, default="500,1000,2000,3000")
    dec.add_argument("--duration", type=_number(False), default=10.0)
    dec.add_argument("--warmup", type=_number(True), default=2.0)
    dec.add_argument("--repeats", type=whole_number(1), default=3)
    dec.add_argument("--sessions", type=whole_number(1), default=100_000)
    dec.add_argument("--events-per-session", type=whole_number(1), default=3)
    dec.add_argument("--items", type=whole_number(100), default=10_000)
    dec.add_argument(
        "--rss-items",
        type=whole_number(0),
        default=100_000,
        help="also the API's memory with a catalog this large (0: not measured)",
    )
    dec.add_argument("--find-max", action="store_true",
                     help="also search each endpoint's highest rate held (#4: slots at least "
                          "half the baseline's)")  # fmt: skip
    dec.add_argument("--search-from", type=whole_number(1), default=1000)
    dec.add_argument("--max-rate", type=whole_number(1), default=32_000)
    dec.add_argument("--out", type=Path, default=Path("artifacts"))
    cat = sub.add_parser("catchup", help="decisions while a worker catches up a backlog")
    cat.add_argument("--backlog", type=whole_number(1), default=100_000)
    cat.add_argument("--rate", type=whole_number(1), default=1000)
    cat.add_argument("--duration", type=_number(False), default=20.0)
    cat.add_argument("--repeats", type=whole_number(1), default=2)
    cat.add_argument("--engine", choices=ENGINES, default="faust")
    cat.add_argument("--items", type=whole_number(100), default=10_000)
    cat.add_argument("--legs", default=",".join(catchup.LEGS))
    cat.add_argument("--out", type=Path, default=Path("artifacts"))
    cst = sub.add_parser("cost", help="CPU per decision in process, beside a Redis round trip")
    cst.add_argument("--sessions", type=whole_number(1), default=30_000)
    cst.add_argument("--decisions", type=whole_number(1), default=2_000)
    cst.add_argument("--rounds", type=whole_number(1), default=8)
    cst.add_argument("--items", type=whole_number(100), default=10_000)
    cst.add_argument("--out", type=Path, default=Path("artifacts"))
    stl = sub.add_parser("stalls", help="how long the API's background work holds its loop")
    stl.add_argument("--items", type=whole_number(100), default=100_000)
    stl.add_argument("--changes", type=whole_number(1), default=100)
    stl.add_argument("--repeats", type=whole_number(1), default=3)
    stl.add_argument("--new", type=whole_number(1), default=10)
    dra = sub.add_parser("drain", help="one worker's events/s on a backlog, beside a raw read")
    dra.add_argument("--events", type=whole_number(10), default=300_000)
    dra.add_argument("--repeats", type=whole_number(1), default=3)
    dra.add_argument("--engines", type=_engines, default="faust")
    dra.add_argument("--items", type=whole_number(100), default=10_000)
    dra.add_argument("--out", type=Path, default=Path("artifacts"))
    run = sub.add_parser("run", help="a scenario of the peak-traffic suite; exit 1 on SLO miss")
    run.add_argument("scenario", help="smoke, peak, spike, soak, overload or a .toml file")
    run.add_argument("--api", default=os.environ.get("KAIROS_API_URL", "http://127.0.0.1:8000"))
    run.add_argument(
        "--bootstrap", default=os.environ.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    run.add_argument("--topic", default=os.environ.get("KAIROS_CLICKSTREAM_TOPIC", "clickstream"))
    run.add_argument(
        "--producer",
        choices=PRODUCERS,
        default="aiokafka",
        help="the clickstream's client (loadtest/producer.py)",
    )
    run.add_argument("--out", type=Path, default=Path("artifacts"))
    run.add_argument("--compare", type=Path)
    run.add_argument("--slo", action="append", default=[], help="override, e.g. p99_ms=10")
    run.add_argument("--stack-warmup", type=_number(True), default=None, metavar="SECONDS",
                     help=f"the scenario's stack_warmup_s ({STACK_WARMUP_S:g} s unless it "
                          "says): the nominal step's traffic, unmeasured, before the first "
                          "step; 0 on a stack already warm")  # fmt: skip
    rep = sub.add_parser("replay", help="hit rate@k and MRR@k of a session log vs popularity")
    rep.add_argument("--test", type=Path)
    rep.add_argument("--train", type=Path)
    rep.add_argument("--generate", type=Path, help="write a sample log here and exit")
    rep.add_argument("--sessions", type=whole_number(1), default=300)
    rep.add_argument("--seed", type=int, default=5, help="with --generate: session ids differ")
    rep.add_argument("--k", type=whole_number(1), default=10)
    rep.add_argument("--api", default=os.environ.get("KAIROS_API_URL", "http://127.0.0.1:8000"))
    rep.add_argument(
        "--bootstrap", default=os.environ.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    rep.add_argument("--topic", default=os.environ.get("KAIROS_CLICKSTREAM_TOPIC", "clickstream"))
    rep.add_argument("--catalog-topic", default=os.environ.get("KAIROS_CATALOG_TOPIC", "catalog"))
    rep.add_argument("--redis", default=os.environ.get("KAIROS_REDIS_URL",
                                                       "redis://127.0.0.1:6379/0"))  # fmt: skip
    rep.add_argument("--key-prefix", default=os.environ.get("KAIROS_KEY_PREFIX", "kairos"))
    rep.add_argument(
        "--no-learn",
        action="store_true",
        help="skip learning embeddings after the training log (an ablation)",
    )
    rep.add_argument("--anonymous", action="store_true",
                     help="with --generate: item ids no catalog knows")  # fmt: skip
    rep.add_argument("--out", type=Path, default=Path("artifacts"))
    sim = sub.add_parser("simulate", help="simulated shoppers for the demo, until stopped")
    sim.add_argument(
        "--rate", type=_number(False, "events a second"), default=20.0, help="events a second"
    )
    sim.add_argument("--sessions", type=whole_number(1), default=200)
    sim.add_argument("--duration", type=_number(True), default=0.0, help="seconds; 0 = forever")
    args = parser.parse_args(argv)
    # SIGTERM (a CI job's timeout, `kill`) as Ctrl-C: the run is cancelled and its cleanup
    # runs. Killed outright, a bench left the API or worker it had started running, in a
    # session of its own, and its topics and keys behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        check_redis_url(os.environ.get("KAIROS_REDIS_URL") or DEFAULT_REDIS_URL)
        check_kafka_bootstrap(os.environ.get("KAIROS_KAFKA_BOOTSTRAP") or DEFAULT_KAFKA_BOOTSTRAP)
        if args.command == "replay":
            check_redis_url(args.redis, "--redis")
        if args.command in ("run", "replay"):
            check_kafka_bootstrap(args.bootstrap, "--bootstrap")
        KafkaSecurity.from_env(os.environ)
    except ConfigError as exc:
        print(f"loadtest {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return _command(args)
    except KeyboardInterrupt:
        print(f"loadtest {args.command}: interrupted; what it had started is stopped",
              file=sys.stderr)  # fmt: skip
        return 130
    except (KafkaConnectionError, RedisConnectionError, ConnectionRefusedError) as exc:
        # a stack that is not up, or the variables pointing elsewhere: one line, not a trace
        print(f"loadtest {args.command}: {exc}\n  Kafka {_env('KAIROS_KAFKA_BOOTSTRAP')}, "
              f"Redis {_env('KAIROS_REDIS_URL')}: `make up` starts both on loopback; "
              "KAIROS_KAFKA_BOOTSTRAP and KAIROS_REDIS_URL point at others",
              file=sys.stderr)  # fmt: skip
        return 2


def _env(name: str) -> str:
    return os.environ.get(name) or "(default)"


def _command(args: argparse.Namespace) -> int:
    if args.command == "replay":
        return uvloop.run(run_replay(args))
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
        return _decisions(args)
    if args.command == "catchup":
        legs = tuple(leg.strip() for leg in args.legs.split(",") if leg.strip())
        unknown = sorted(set(legs) - set(catchup.LEGS))
        if args.duration <= catchup.WORKER_AFTER_S:
            print(f"loadtest catchup: --duration must be more than {catchup.WORKER_AFTER_S:g} s",
                  file=sys.stderr)  # fmt: skip
            return 2
        if unknown or not legs:
            print(f"loadtest catchup: --legs takes {', '.join(catchup.LEGS)}; got {args.legs!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        uvloop.run(catchup.run(args.backlog, args.rate, args.duration, args.repeats,
                               args.engine, args.items, args.out, legs))  # fmt: skip
        return 0
    if args.command in IN_PROCESS:
        return IN_PROCESS[args.command](args)
    if args.command == "drain":
        uvloop.run(drain.run(args.events, args.repeats, args.engines, args.out, args.items))
        return 0
    if args.command == "memory":
        uvloop.run(memory.run(args.sessions, args.events_per_session, args.engine))
        return 0
    return _ingest(args)


if __name__ == "__main__":
    raise SystemExit(main())
