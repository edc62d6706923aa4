"""Decision latency at fixed arrival rates, beside a static endpoint of the same process.

    python -m loadtest decisions [--rates 500,1000,2000,3000] [--duration 10] [--repeats 3]
                                 [--sessions 100000] [--items 10000] [--rss-items 100000]

1. Seeds Redis through the real pipeline: a worker consumes --sessions sessions of
   realistic clickstream (Zipf popularity, drifting category affinity) from Kafka.
2. Starts one API process (uvicorn + uvloop) on that state with `/bench/static`, a static
   payload served by the same process and stack: the same-run baseline.
3. For each repeat and rate, alternating which goes first, drives the baseline and
   `GET /v1/slots/home_recs` open-loop (fixed arrival rate, latency from the intended send
   time, warm-up excluded) over keep-alive connections, with uniformly drawn seeded
   sessions. Reports medians over repeats of p50/p99/p99.9, achieved rate, errors and the
   share of answers that degraded (timeout, overload, store_unavailable).
4. Overload: 3x the highest rate that held p99 <= 10 ms with at most 1% degraded, once.
5. With --find-max: each endpoint's highest rate held, searched upwards from
   --search-from in steps of a quarter (to --max-rate); a step that misses runs once
   more before the search stops there. #4 asks the slot endpoint to hold at least half
   the baseline's rate, which the rates of step 3 alone cannot say.
6. The API's resident memory with this catalog, and with a --rss-items catalog.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from loadtest.http import Client, HttpError, free_port
from loadtest.ingest import (
    Bench,
    CpuMeter,
    _cleanup,
    _create_topics,
    check_worker,
    discard_workdir,
    environment,
    redis_benchmark,
    stack_pids,
    start_worker,
    stop_worker,
    warn_bystanders,
)
from loadtest.openloop import PacingStats, Percentiles, collector_paused, median_of, open_loop
from loadtest.probe import SpeedProbe
from loadtest.promhist import buckets, quantile
from loadtest.search import Search, highest_held
from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import write_demo_catalog

SLO_P99_MS = 10.0
# A rate is held only if it is mostly decided: the API sheds to the defaults instead of
# slowing down, so a p99 within the SLO alone says nothing about how much was personalized.
SLO_DEGRADED = 0.01
DEGRADED = frozenset({b"timeout", b"overload", b"store_unavailable"})
# --find-max: rates a quarter apart, in multiples of SEARCH_GRAIN
SEARCH_FACTOR = 1.25
SEARCH_GRAIN = 250
TOPICS = ("clickstream", "dlq", "catalog", "decisions")


@dataclass
class Step:
    kind: str  # "static" (baseline) or "slots"
    rate: int
    latency: Percentiles
    pacing: PacingStats
    answered: int
    errors: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    probe_ms: float | None = None  # the machine's speed over the step (loadtest/probe.py)
    # The API's own view of the step, from its histograms (api_split): its handler time and
    # its session-state read, p50 and p99 in ms, warm-up included
    inside: dict[str, float | None] = field(default_factory=dict)

    @property
    def degraded(self) -> int:
        """Answers with a fallback reason that is degradation (not holdout or no_signal)."""
        return sum(n for r, n in self.fallbacks.items() if r.encode() in DEGRADED)

    @property
    def degraded_share(self) -> float:
        return self.degraded / self.answered if self.answered else 0.0

    @property
    def degraded_text(self) -> str:
        """The degraded share, and why: "6.64% (overload 1329, timeout 2)"."""
        why = sorted(((n, r) for r, n in self.fallbacks.items() if n and r.encode() in DEGRADED),
                     reverse=True)  # fmt: skip
        return f"{100 * self.degraded_share:.2f}%" + (
            " (" + ", ".join(f"{r} {n}" for n, r in why) + ")" if why else ""
        )

    @property
    def api_us_per_request(self) -> float:
        """The API's CPU over the run (warm-up included, at the same rate) per request
        offered: a steadier comparison between code versions than latency on a shared
        machine, where the neighbours move the tail from one minute to the next."""
        return self.cpu.get("api", 0.0) / 100 / self.rate * 1e6


async def measure(
    client: Client, kind: str, rate: int, duration: float, warmup: float,
    path: Callable[[int], str], pid: int, others: dict[str, int] | None = None,
) -> Step:  # fmt: skip
    latencies: list[float] = []
    errors = 0
    reasons: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    warm = int(rate * warmup)

    async def one(i: int, intended: float) -> None:
        nonlocal errors
        try:
            response = await client.request("GET", path(i))
        except HttpError:
            errors += i >= warm
            return
        if i < warm:
            return
        latencies.append(time.monotonic() - intended)
        if response.status != 200:
            errors += 1
        for r in filter(None, response.headers.get(b"x-kairos-fallback", b"").split(b",")):
            reasons[r.decode()] += 1

    async def send(i: int, intended: float) -> None:
        task = asyncio.create_task(one(i, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    probe = SpeedProbe()
    endpoint = "slots" if kind == "slots" else None
    try:
        with collector_paused():  # until the last answer is in
            before = await _scrape(client)
            cpu = CpuMeter({"api": pid, "generator": os.getpid(), **(others or {})})
            pacing = await open_loop(rate, warmup + duration, send)
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=10)
                errors += len(pending)  # never answered: counted, not hidden
                for t in pending:
                    t.cancel()
            used = cpu.percent()
            inside = api_split(before, await _scrape(client), endpoint)
    finally:
        probe_ms = probe.stop()
    return Step(kind, rate, Percentiles.of_ms(latencies), pacing, len(latencies), errors,
                dict(reasons), used, probe_ms, inside)  # fmt: skip


def misses(step: Step) -> str | None:
    """Why one step does not hold its rate (the SLO of the summary's "highest rate"), or
    None when it holds."""
    if step.errors:
        return f"{step.errors} errors"
    if step.latency.p99 > SLO_P99_MS:
        late = step.pacing.late_p99_ms
        # the generator's own lateness is in the latency (open loop): say when it was large
        tail = f" (the generator {late:.1f} ms late at p99)" if late > SLO_P99_MS / 2 else ""
        return f"p99 {step.latency.p99:.2f} ms{tail}"
    if step.degraded_share > SLO_DEGRADED:
        return f"{100 * step.degraded_share:.2f}% degraded"
    return None


async def find_max(
    measure_at: Callable[[str, int], Awaitable[Step]], kind: str, start: int, cap: int
) -> Search[Step]:
    """The highest rate `kind` holds within the SLO (misses), from `start` upwards, a
    quarter more each step (SEARCH_FACTOR, SEARCH_GRAIN), to `cap` (loadtest/search.py)."""
    return await highest_held(lambda rate: measure_at(kind, rate), misses, start, cap,
                              SEARCH_FACTOR, SEARCH_GRAIN)  # fmt: skip


def search_text(static: Search[Step], slots: Search[Step]) -> str:
    share = f"{slots.held / static.held:.2f}" if static.held else "-"
    return (f"highest rate held, searched (p99 <= {SLO_P99_MS:.0f} ms, no errors, at most "
            f"{100 * SLO_DEGRADED:.0f}% degraded): baseline {static.held_text} (stopped: "
            f"{static.stopped}), /v1/slots {slots.held_text} (stopped: {slots.stopped}); "
            f"slots / baseline {share} (#4: at least 0.5)")  # fmt: skip


async def _scrape(client: Client) -> str:
    response = await client.request("GET", "/metrics")
    if response.status != 200:
        raise HttpError(f"/metrics answered {response.status}")
    return response.body.decode()


def api_split(before: str, after: str, endpoint: str | None) -> dict[str, float | None]:
    """Where a step's time went inside the API, from its histograms between two scrapes
    (ms, interpolated within buckets): the handler time of `endpoint` and the
    session-state read (one Redis round trip, ~50 µs of the API's CPU; the rest of it is
    waiting: for Redis, then for the API's event loop to come back from other requests'
    work). {} for the static baseline."""
    if endpoint is None:
        return {}
    out: dict[str, float | None] = {}
    for name, metric, labels in (
        ("handler", "kairos_api_request_seconds", f'endpoint="{endpoint}",'),
        ("read", "kairos_api_state_read_seconds", ""),
    ):  # fmt: skip
        b, a = buckets(before, metric, labels), buckets(after, metric, labels)
        for q, tag in ((0.5, "p50"), (0.99, "p99")):
            value = quantile(b, a, q)
            out[f"{name}_{tag}_ms"] = None if value is None else round(value * 1000, 3)
    return out


# ----------------------------------------------------------------------------- setup


async def seed(bench: Bench, catalog: Path, workdir: Path, sessions: int, per: int) -> list[str]:
    """Sessions through the real pipeline (Kafka -> worker -> Redis); returns their ids."""
    traffic = Traffic(load_items(catalog), active_sessions=sessions, mean_session_events=10**9)
    worker = start_worker(bench, "aiokafka", catalog, workdir)
    producer = AIOKafkaProducer(**bench.kafka(), linger_ms=5)
    await producer.start()
    sent: set[str] = set()
    t0 = time.monotonic()
    redis = aioredis.Redis.from_url(bench.redis_url)
    try:
        for _ in range(sessions * per):
            sid, value, _seq = traffic.next_event()
            sent.add(sid)
            await producer.send(bench.topic("clickstream"), value, key=sid.encode())
        await producer.flush()
        sids = sorted(sent)
        probe = random.Random(1).sample(sids, min(2000, len(sids)))
        deadline = time.monotonic() + 900
        while True:
            pipe = redis.pipeline(transaction=False)
            for sid in probe:
                pipe.exists(f"{bench.prefix}:{{{sid}}}:s")
            if all(await pipe.execute()):
                break
            check_worker(worker, workdir, "aiokafka")
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not apply the seed within 15 minutes")
            await asyncio.sleep(1)
        # the last events of the probed sessions may still be in flight: wait for the lag
        await asyncio.sleep(3)
    finally:
        await producer.stop()
        stop_worker(worker)
        await redis.aclose()
    print(f"seeded {len(sids)} sessions ({sessions * per} events) through the worker in "
          f"{time.monotonic() - t0:.0f}s", flush=True)  # fmt: skip
    return sids


def api_env(bench: Bench, catalog: Path, workdir: Path) -> dict[str, str]:
    """An API's settings on the bench's stack, keys, topics and catalog."""
    return {
        "KAIROS_KAFKA_BOOTSTRAP": bench.bootstrap,
        "KAIROS_REDIS_URL": bench.redis_url,
        "KAIROS_KEY_PREFIX": bench.prefix,
        "KAIROS_CATALOG_PATH": str(catalog),
        "KAIROS_STACK_DIR": str(workdir),
        "KAIROS_CLICKSTREAM_TOPIC": bench.topic("clickstream"),
        "KAIROS_DECISIONS_TOPIC": bench.topic("decisions"),
    }


def start_api(bench: Bench, catalog: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **api_env(bench, catalog, workdir), "KAIROS_API_PORT": str(port),
           "KAIROS_BENCH_STATIC": "true"}  # fmt: skip
    with (workdir / f"api-{port}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "api"], env=env, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


async def wait_ready(client: Client, proc: subprocess.Popen[bytes], within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode} during start")
        try:
            if (await client.request("GET", "/readyz")).status == 200:
                await asyncio.sleep(2)  # one refresh: trending and defaults in place
                return
        except HttpError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the API did not become ready")


stop_api = stop_worker  # the same: TERM its process group, KILL after 20 s


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def rss_with_catalog(bench: Bench, workdir: Path, items: int, sids: list[str]) -> float:
    """Resident memory of an API process serving a catalog of `items` items."""
    catalog = write_demo_catalog(workdir / f"catalog-{items}.jsonl", items)
    port = free_port()
    proc = start_api(bench, catalog, workdir, port)
    client = Client("127.0.0.1", port)
    try:
        await wait_ready(client, proc, within_s=120)
        for sid in sids[:2000]:
            await client.request("GET", f"/v1/slots/home_recs?session_id={sid}")
        return rss_mib(proc.pid)
    finally:
        await client.aclose()
        stop_api(proc)


# ----------------------------------------------------------------------------- main


async def run(
    rates: list[int], duration: float, warmup: float, repeats: int, sessions: int,
    per_session: int, items: int, rss_items: int, out_dir: Path,
    find: tuple[int, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`find`: (from, to) for --find-max."""
    bench = Bench.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="kairos-decisions-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", items)
    redis = aioredis.Redis.from_url(bench.redis_url)
    await _create_topics(bench, [bench.topic(n) for n in TOPICS])
    proc: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    strangers = warn_bystanders()
    try:
        sids = await seed(bench, catalog, workdir, sessions, per_session)
        others = stack_pids(await redis.info("server"))
        port = free_port()
        proc = start_api(bench, catalog, workdir, port)
        client = Client("127.0.0.1", port)
        await wait_ready(client, proc)
        pick = random.Random(7)
        paths = {
            "static": lambda i: "/bench/static",
            "slots": lambda i: f"/v1/slots/home_recs?session_id={sids[pick.randrange(len(sids))]}",
        }
        steps: list[Step] = []
        for rep in range(repeats):
            for rate in rates:
                kinds = ["static", "slots"] if (rep + rate) % 2 == 0 else ["slots", "static"]
                for kind in kinds:
                    step = await measure(client, kind, rate, duration, warmup, paths[kind],
                                         proc.pid, others)  # fmt: skip
                    _print_step(rep, step)
                    steps.append(step)
        summary = summarize(steps, rates)
        if find is not None:
            api_client, api_pid = client, proc.pid

            async def measure_at(kind: str, rate: int) -> Step:
                step = await measure(api_client, kind, rate, duration, warmup, paths[kind],
                                     api_pid, others)  # fmt: skip
                _print_step(-2, step)
                return step

            static = await find_max(measure_at, "static", *find)
            slots = await find_max(measure_at, "slots", *find)
            print(search_text(static, slots))
            summary["search"] = {kind: {"held": f.held, "stopped": f.stopped}
                                 for kind, f in (("static", static), ("slots", slots))}  # fmt: skip
            steps += static.steps + slots.steps
        knee = summary["highest_rate_p99_within_slo"]["slots"]
        if knee:
            over = await measure(client, "slots", 3 * knee, duration, warmup, paths["slots"],
                                 proc.pid, others)  # fmt: skip
            _print_step(-1, over)
            summary["overload_3x"] = _row(over)
            steps.append(over)
        summary["api_rss_mib"] = {str(items): round(rss_mib(proc.pid), 1)}
        await client.aclose()
        client = None
        stop_api(proc)
        proc = None
        if rss_items:
            summary["api_rss_mib"][str(rss_items)] = round(
                await rss_with_catalog(bench, workdir, rss_items, sids), 1
            )
        print(f"API resident memory (MiB) by catalog size: {summary['api_rss_mib']}")
        summary["redis_benchmark_rps"] = redis_benchmark(bench.redis_url)
        setup = {"sessions": len(sids), "events_per_session": per_session, "items": items,
                 "duration_s": duration, "warmup_s": warmup, "repeats": repeats}  # fmt: skip
        details = {"steps": [{**asdict(s), "degraded_share": s.degraded_share} for s in steps]}
        await record_run(out_dir, "decisions", summary, details, redis, strangers, setup,
                         workdir)  # fmt: skip
        return summary
    finally:
        await tear_down(bench, redis, client, proc)


async def tear_down(
    bench: Bench, redis: aioredis.Redis, client: Client | None,
    proc: subprocess.Popen[bytes] | None,
) -> None:  # fmt: skip
    """After a bench that served an API, finished or not: the client, the API, the
    bench's topics and keys, the Redis client."""
    if client is not None:
        await client.aclose()
    if proc is not None:
        stop_api(proc)
    await _cleanup(bench, redis)
    await redis.aclose()


def _row(step: Step) -> dict[str, Any]:
    return {
        **asdict(step.latency),
        "achieved_rate": round(step.answered / max(step.pacing.duration_s, 1e-9)),
        "errors": step.errors,
        "degraded_share": step.degraded_share,
        "fallbacks": step.fallbacks,
        "generator_late_p99_ms": step.pacing.late_p99_ms,
        "cpu": step.cpu,
        "api_cpu_us_per_request": round(step.api_us_per_request),
        "probe_ms": step.probe_ms,
        "inside": step.inside,
    }


def _print_step(rep: int, s: Step) -> None:
    label = {-1: "overload", -2: "search"}.get(rep, f"repeat {rep + 1}")
    print(f"  {label:<9} {s.kind:<7} {s.rate:>6}/s  p50 {s.latency.p50:7.2f}  "
          f"p99 {s.latency.p99:7.2f}  p99.9 {s.latency.p999:7.2f} ms  "
          f"answered {s.answered}  errors {s.errors}  degraded {s.degraded_text}  "
          f"gen-late p99 {s.pacing.late_p99_ms:.1f} ms  "
          + "  ".join(f"cpu {k} {v:.0f}%" for k, v in s.cpu.items())
          + f"  api {s.api_us_per_request:.0f} µs/request  probe {_ms(s.probe_ms)} ms"
          + inside_text(s.inside), flush=True)  # fmt: skip


def inside_text(split: dict[str, float | None]) -> str:
    """api_split's figures as printed after a step; "" without them."""
    if not split:
        return ""
    return (f"  in the API: handler p50/p99 {_ms(split.get('handler_p50_ms'))}/"
            f"{_ms(split.get('handler_p99_ms'))} ms, state read {_ms(split.get('read_p50_ms'))}/"
            f"{_ms(split.get('read_p99_ms'))} ms")  # fmt: skip


def _median_inside(runs: list[Step]) -> dict[str, float | None]:
    """Each of the steps' api_split figures, the median over the repeats that had it."""
    keys = {k for s in runs for k in s.inside}
    out: dict[str, float | None] = {}
    for k in sorted(keys):
        values = [v for s in runs if (v := s.inside.get(k)) is not None]
        out[k] = round(statistics.median(values), 3) if values else None
    return out


def _median_probe(runs: list[Step]) -> float | None:
    probes = [s.probe_ms for s in runs if s.probe_ms is not None]
    return round(statistics.median(probes), 3) if probes else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(steps: list[Step], rates: list[int]) -> dict[str, Any]:
    print(
        "\nlatency: median over repeats, from the intended send time, ms; errors: sum; "
        "degraded: the worst repeat, and all repeats together"
    )
    print(f"{'rate/s':>7} {'endpoint':<8} {'p50':>7} {'p99':>7} {'p99.9':>7} "
          f"{'p99/base':>8} {'errors':>6} {'degraded':>8} {'(all)':>7} {'api µs/req':>10} "
          f"{'probe ms':>8}")  # fmt: skip
    out: dict[str, Any] = {"rates": {}, "highest_rate_p99_within_slo": {}}
    held: dict[str, int] = {"static": 0, "slots": 0}
    for rate in rates:
        row: dict[str, Any] = {}
        for kind in ("static", "slots"):
            runs = [s for s in steps if s.rate == rate and s.kind == kind]
            lat = median_of([s.latency for s in runs])
            errors = sum(s.errors for s in runs)
            degraded = max(s.degraded_share for s in runs)
            # the share of every answer of the rate, for a target like "< 0.1% fallbacks"
            degraded_all = sum(s.degraded for s in runs) / max(1, sum(s.answered for s in runs))
            row[kind] = {**asdict(lat), "errors": errors, "degraded_share_max": degraded,
                         "degraded_share_all": degraded_all,
                         "achieved_rate": round(min(s.answered / s.pacing.duration_s
                                                    for s in runs)),
                         "api_cpu_us_per_request": round(statistics.median(
                             s.api_us_per_request for s in runs)),
                         "probe_ms": _median_probe(runs),
                         "inside": _median_inside(runs)}  # fmt: skip
            if lat.p99 <= SLO_P99_MS and errors == 0 and degraded <= SLO_DEGRADED:
                held[kind] = max(held[kind], rate)
        ratio = row["slots"]["p99"] / row["static"]["p99"]
        row["p99_over_baseline"] = round(ratio, 2)
        # what a decision costs the API above serving the static payload, same run
        row["decision_cpu_us"] = (row["slots"]["api_cpu_us_per_request"]
                                  - row["static"]["api_cpu_us_per_request"])  # fmt: skip
        out["rates"][str(rate)] = row
        for kind in ("static", "slots"):
            r = row[kind]
            print(f"{rate:>7} {kind:<8} {r['p50']:7.2f} {r['p99']:7.2f} {r['p999']:7.2f} "
                  f"{ratio if kind == 'slots' else 1.0:8.2f} {r['errors']:>6} "
                  f"{100 * r['degraded_share_max']:7.2f}% {100 * r['degraded_share_all']:6.2f}% "
                  f"{r['api_cpu_us_per_request']:>10} {_ms(r['probe_ms']):>8}")  # fmt: skip
        print(
            f"{'':>7} a decision costs the API {row['decision_cpu_us']} µs of CPU more than "
            "the static payload (medians)"
        )
        if inside := row["slots"]["inside"]:
            print(f"{'':>7} of the slots' p99, inside the API (medians):"
                  + inside_text(inside).removeprefix("  in the API:"))  # fmt: skip
    out["highest_rate_p99_within_slo"] = held
    print(f"highest rate holding p99 <= {SLO_P99_MS:.0f} ms with no errors and at most "
          f"{100 * SLO_DEGRADED:.0f}% degraded: "
          f"baseline {held['static']}/s, /v1/slots {held['slots']}/s")  # fmt: skip
    return out


async def record_run(
    out_dir: Path, kind: str, summary: dict[str, Any], details: dict[str, Any],
    redis: aioredis.Redis, strangers: dict[int, str], setup: dict[str, Any], workdir: Path,
) -> Path:  # fmt: skip
    """The end of an API bench run (decisions, catchup): the environment and the setup go
    into the summary, `artifacts/<kind>-<time>.json` is written with the details beside
    it and named, and the scratch directory goes. The environment is what a reader needs
    to compare two result files, and who else was running."""
    server = await redis.info("server")
    summary["environment"] = {**environment(server), "other_kairos_processes": strangers}
    summary["setup"] = setup
    return write_results(out_dir, kind, {"summary": summary, **details}, workdir)


def write_results(out_dir: Path, kind: str, body: dict[str, Any], workdir: Path) -> Path:
    """`out_dir/<kind>-<time>.json`, printed; the bench's work directory goes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"results: {path}")
    discard_workdir(workdir)
    return path
