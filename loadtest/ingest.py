"""Ingest benchmark: event produced → state visible in Redis, beside raw Kafka latency.

    python -m loadtest ingest [--rates 1000,5000,10000] [--duration 15] [--repeats 3]

For each rate and repeat, in the same run on the same broker:
  * raw:    aiokafka producer → aiokafka consumer on a scratch topic (the floor);
  * kairos: the same producer pattern with realistic sessions → a real stream worker
            (`python -m stream_engine worker`, one per engine, started here) → Redis; an
            event counts as visible when a keyspace notification for its session arrives
            and the session's event count covers it (one HGET, so this slightly overstates
            freshness). Latency is followed on a random 10% of the sessions.
Both are open loop with latency from the intended send time. Figures are medians over the
repeats. Needs KAIROS_KAFKA_BOOTSTRAP / KAIROS_REDIS_URL (or the local stack defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.exceptions import ConnectionError as RedisConnectionError

from loadtest.http import free_port
from loadtest.openloop import PacingStats, Percentiles, median_of, open_loop
from loadtest.producer import make_producer
from loadtest.promhist import buckets
from loadtest.search import Search, highest_held
from loadtest.traffic import TRACKED, Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import write_demo_catalog
from stream_engine.kafka_security import KafkaSecurity
from stream_engine.store import Shared, psubscribe

DRAIN_S = 10.0
RAW_WARMUP_S = 1.0
# Latency is followed on a random 10% of sessions: following all of them costs the
# generator more CPU than the worker it measures, on a 2-core machine.
TRACKED_SHARE = 0.1
# A worker keeps up when its backlog grows by less than this share of the arrival rate.
KEEPS_UP_SHARE = 0.01
# --find-max: live rates a tenth apart, in multiples of SEARCH_GRAIN events/s
SEARCH_FACTOR = 1.1
SEARCH_GRAIN = 500
# A step counts only if the generator sent at least this share of its rate.
SENT_SHARE = 0.98
# Lines of a worker's log quoted when it exits under a benchmark.
LOG_TAIL_LINES = 8


@dataclass
class RunResult:  # kind: "raw" or the engine name
    rate: int
    kind: str
    latency: Percentiles
    pacing: PacingStats
    unseen: int
    max_backlog_late: int  # most events outstanding during the last third of the run
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by process
    catch_up_s: float = 0.0  # after the run, until the worker's group had no lag left
    # How fast the backlog grew over the last two thirds of the run (events/s, least
    # squares over samples 4 times a second): about 0 when the worker keeps up, however
    # far behind it runs; a worker that falls behind shows (rate - its throughput) here.
    backlog_growth: float = 0.0
    p50_by_third: list[float] = field(default_factory=list)  # freshness p50 per third, ms
    # The worker's own means over the run, from its metrics (worker_means): produced ->
    # written, the part of it waiting in the faust hand-off, a batch's apply time and size.
    worker: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    bootstrap: str
    redis_url: str
    partitions: int = 4
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # The client every leg (raw and engines) sends with (loadtest/producer.py). aiokafka
    # is the baseline's client; the same one in both legs keeps the comparison fair.
    producer: str = "aiokafka"
    # TLS and SASL, as the worker it starts reads them (KAIROS_KAFKA_SECURITY_PROTOCOL...):
    # every client of the bench, the baseline's too, goes through the same listener.
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def from_env(cls, **fields: Any) -> Bench:
        """On the stack the environment names (the local stack's ports by default), with
        its Kafka security; `fields` set the others (run_id, producer)."""
        return cls(
            os.environ.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            os.environ.get("KAIROS_REDIS_URL", "redis://127.0.0.1:6379/0"),
            security=KafkaSecurity.from_env(os.environ),
            **fields,
        )

    def kafka(self) -> dict[str, Any]:
        """aiokafka's keyword arguments for the bench's broker."""
        return {"bootstrap_servers": self.bootstrap, **self.security.aiokafka()}

    @property
    def prefix(self) -> str:
        return f"bench-{self.run_id}"

    def topic(self, name: str) -> str:
        return f"{name}.bench-{self.run_id}"


# ----------------------------------------------------------------------------- raw kafka


async def run_raw(bench: Bench, rate: int, duration: float) -> RunResult:
    topic = bench.topic(f"raw{rate}")
    await _create_topics(bench, [topic])
    intended: dict[int, float] = {}
    latencies: list[float] = []
    consumer = AIOKafkaConsumer(**bench.kafka(), enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(bench.partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    producer = make_producer(bench.producer, bench.bootstrap, bench.security)
    await producer.start()
    pad = b"x" * 140  # about the size of a clickstream event

    async def consume() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for msgs in batch.values():
                for m in msgs:
                    latencies.append(now - intended[int(m.value.split(b" ", 1)[0])])

    async def send(i: int, t: float) -> None:
        intended[i] = t
        await producer.send(topic, b"%d %s" % (i, pad), b"k%d" % (i % 997))

    task = asyncio.create_task(consume())
    try:
        # Warm up like the engines are warmed up: a new topic's first sends pay for
        # metadata and leadership (seen: raw p99 49 ms from the first few hundred alone).
        warm = await open_loop(rate, RAW_WARMUP_S, send)
        await _drain(lambda: len(latencies) >= warm.sent)
        latencies.clear()
        pacing = await open_loop(rate, duration, send)
        await producer.flush()
        await _drain(lambda: len(latencies) >= pacing.sent)
    finally:
        task.cancel()
        await producer.stop()
        await consumer.stop()
    return RunResult(rate, "raw", Percentiles.of_ms(latencies), pacing,
                     pacing.sent - len(latencies), 0)  # fmt: skip


# ----------------------------------------------------------------------------- kairos


class Visibility:
    """Tracks which sent events are visible in Redis, from keyspace notifications.

    A notification for a tracked session's hash is parsed in the subscription's read
    callback, and a round of HGETs (one write, on a connection of its own) reads the event
    counts of the sessions it names; an event is visible once a count covers it, at the
    time that round's replies are read. Rounds overlap (a new one starts as soon as a
    notification comes in), and the replies of one connection come back in order, so a
    later round never reports a smaller count. With redis-py's PubSub polling and pipeline
    instead, the same events at 1,000 events/s were seen later by 0.22 ms at the median
    and 0.85-0.93 ms at the 90th percentile (both watchers in one run; loadtest/JOURNAL.md,
    session 17)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.pending: dict[str, deque[tuple[int, float]]] = defaultdict(deque)
        self.latencies: list[float] = []
        self.intended: list[float] = []  # the send time of each latency, same order
        self.outstanding = 0

    def sent(self, sid: str, seq: int, intended: float) -> None:
        self.pending[sid].append((seq, intended))
        self.outstanding += 1

    async def watch(self, db: int) -> None:
        sid_of = re.compile(rb"\{(.*)\}:s$")
        touched: set[str] = set()
        wake = asyncio.Event()

        def on_message(channel: bytes, _event: bytes) -> None:
            if m := sid_of.search(channel):
                touched.add(m.group(1).decode())
                wake.set()

        pattern = f"__keyspace@{db}__:{self.prefix}:{{{TRACKED}*"
        subscription = await psubscribe(self.redis, [pattern], on_message)
        counts = Shared(self.redis, stale_s=30.0)
        rounds: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            rounds.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                failed.append(exc)
                wake.set()

        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):  # to notice a lost subscription
                        await wake.wait()
                if failed:
                    raise failed[0]
                if subscription.lost:
                    raise RedisConnectionError("the keyspace notification connection closed")
                wake.clear()
                if not touched:
                    continue
                sids = list(touched)
                touched.clear()
                task = asyncio.create_task(self._resolve(counts, sids))
                rounds.add(task)
                task.add_done_callback(finished)
        finally:
            for task in rounds:
                task.cancel()
            subscription.close()
            await counts.aclose()

    async def _resolve(self, counts: Shared, sids: list[str]) -> None:
        replies = await counts.execute(
            [("HGET", f"{self.prefix}:{{{sid}}}:s", "n") for sid in sids], 30.0
        )
        now = time.monotonic()
        for sid, n in zip(sids, replies, strict=True):
            applied = int(n or 0)
            queue = self.pending.get(sid)
            while queue and queue[0][0] <= applied:
                t = queue.popleft()[1]
                self.latencies.append(now - t)
                self.intended.append(t)
                self.outstanding -= 1


async def run_kairos(
    bench: Bench, traffic: Traffic, redis: aioredis.Redis, rate: int, duration: float, db: int
) -> RunResult:
    vis = Visibility(redis, bench.prefix)
    watcher = asyncio.create_task(vis.watch(db))
    await asyncio.sleep(0.2)
    producer = make_producer(bench.producer, bench.bootstrap, bench.security)
    await producer.start()
    topic = bench.topic("clickstream")
    backlog: list[tuple[float, int]] = []

    async def send(i: int, t: float) -> None:
        sid, value, seq = traffic.next_event()
        if sid.startswith(TRACKED):
            vis.sent(sid, seq, t)
        await producer.send(topic, value, sid.encode())
        if i % max(1, rate // 4) == 0:
            backlog.append((t, vis.outstanding))

    try:
        pacing = await open_loop(rate, duration, send)
        await producer.flush()
        await _drain(lambda: vis.outstanding <= 0)
    finally:
        _report_dead_watcher(watcher)
        watcher.cancel()
        await producer.stop()
    start = backlog[0][0] if backlog else 0.0
    tail = [b for t, b in backlog if t >= start + duration * 2 / 3]
    steady = [(t, b / TRACKED_SHARE) for t, b in backlog if t >= start + duration / 3]
    thirds = p50_by_third(vis.intended, vis.latencies, start, duration)
    return RunResult(rate, "kairos", Percentiles.of_ms(vis.latencies), pacing,
                     vis.outstanding, max(tail, default=0), backlog_growth=slope(steady),
                     p50_by_third=thirds)  # fmt: skip


def _report_dead_watcher(watcher: asyncio.Task[None]) -> None:
    """A watcher that died (its Redis connection dropped, say) leaves every later event
    unseen: say so, so that a run is not read as a worker that stopped."""
    if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
        print(f"WARNING: the visibility watcher failed mid-run ({watcher.exception()!r}); "
              "events after that count as unseen, not as late", flush=True)  # fmt: skip


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    x, y = zip(*points, strict=True)
    return float(np.polyfit(x, y, 1)[0])


def p50_by_third(intended: list[float], latencies: list[float], start: float,
                 duration: float) -> list[float]:  # fmt: skip
    """Freshness p50 (ms) of the events sent in each third of the run: rising thirds are
    a worker falling behind, level ones a worker keeping up at a fixed distance."""
    thirds: list[list[float]] = [[], [], []]
    for t, lat in zip(intended, latencies, strict=True):
        thirds[min(2, max(0, int(3 * (t - start) / duration)))].append(lat)
    return [round(Percentiles.of_ms(v).p50, 2) if v else float("nan") for v in thirds]


# ----------------------------------------------------------------------------- setup


async def caught_up(bench: Bench, engine: str, limit_s: float = 180.0) -> float:
    """Seconds until the worker's consumer group has committed up to the end of the topic,
    seen from outside through the admin API (the backlog a run left behind)."""
    topic = bench.topic("clickstream")
    group = f"kairos-{bench.prefix}"
    tps = [TopicPartition(topic, p) for p in range(bench.partitions)]
    admin = AIOKafkaAdminClient(**bench.kafka())
    probe = AIOKafkaConsumer(**bench.kafka())
    await admin.start()
    await probe.start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s:
            ends = await probe.end_offsets(tps)
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            done = all(
                committed.get(tp) is not None and committed[tp].offset >= ends[tp] for tp in tps
            )
            if done:
                break
            await asyncio.sleep(0.25)
    finally:
        await probe.stop()
        await admin.close()
    # Commits trail the writes (up to commit_interval_ms, or faust's 1 s): not a backlog.
    waited = time.monotonic() - t0
    return round(waited, 1) if waited > 1.5 else 0.0


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz


def stack_pids(redis_info: dict[str, Any]) -> dict[str, int]:
    """The local Redis and Kafka broker processes, where this machine runs them: a 2-core
    box is shared by everything, and a run is only readable beside what the others used."""
    pids: dict[str, int] = {}
    redis_pid = int(redis_info.get("process_id") or 0)
    with contextlib.suppress(OSError):  # another machine's Redis, or it has gone
        if redis_pid and b"redis" in Path(f"/proc/{redis_pid}/cmdline").read_bytes():
            pids["redis"] = redis_pid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"\0kafka.Kafka\0" in cmdline:  # the first broker found: the stack runs one
            pids["broker"] = int(proc.name)
            break
    return pids


# Command lines of Kairos processes that a benchmark does not start itself.
_KAIROS_ARGV = (b"\0-m\0stream_engine\0", b"\0-m\0api\0", b"\0-m\0loadtest\0simulate\0")


def bystanders(own: set[int] | None = None) -> dict[int, str]:
    """Kairos processes already running on this machine (a stack's worker or API left up,
    the demo's shoppers), other than `own`: their CPU lands in every figure of a run on a
    2-core box, so a run names them. Session 10 measured for half an hour beside an idle
    stack API and faust worker (~18% of a core between them) before noticing."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (own or set()):
            continue
        try:
            argv = b"\0" + (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in argv for m in _KAIROS_ARGV):
            found[int(proc.name)] = argv.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def warn_bystanders() -> dict[int, str]:
    found = bystanders({os.getpid()})
    for pid, argv in found.items():
        print(f"WARNING: another Kairos process is running (pid {pid}: {argv[:80]}); its CPU "
              "is in this run's figures (stop it: make down)", flush=True)  # fmt: skip
    return found


class CpuMeter:
    """CPU of the named processes (% of one core each) and of the whole machine ("machine":
    % of all its cores busy, whoever used them) over the meter's life."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.machine0 = machine_busy_seconds()

    def percent(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            try:
                used = cpu_seconds(pid) - self.start[name]
            except OSError:  # the process has gone: its figure would be a guess
                continue
            out[name] = round(100 * used / elapsed, 1)
        busy, total = machine_busy_seconds()
        if total > self.machine0[1]:
            out["machine"] = round(100 * (busy - self.machine0[0]) / (total - self.machine0[1]), 1)
        return out


async def _drain(done: Callable[[], bool]) -> None:
    """Give what is in flight up to DRAIN_S to arrive; what doesn't is reported as unseen."""
    for _ in range(int(DRAIN_S / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)


async def _create_topics(bench: Bench, topics: list[str]) -> None:
    """Create topics and wait until every partition has a leader, so that the first
    measured sends don't include leader election."""
    admin = AIOKafkaAdminClient(**bench.kafka())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, bench.partitions, 1) for t in topics])
        for _ in range(100):
            described = await admin.describe_topics(topics)
            leaders = [p["leader"] for t in described for p in t["partitions"]]
            if len(leaders) == len(topics) * bench.partitions and min(leaders) >= 0:
                return
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _cleanup(bench: Bench, redis: aioredis.Redis) -> None:
    admin = AIOKafkaAdminClient(**bench.kafka())
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.endswith(f"bench-{bench.run_id}")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{bench.prefix}:*", count=2000):
        batch.append(key)
        if len(batch) >= 2000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


def discard_workdir(workdir: Path) -> None:
    """A finished run's scratch directory (its catalog copy and process logs, a few MB): a
    run that fails never gets here and keeps it, for the logs. Every run used to leave one
    in /tmp."""
    shutil.rmtree(workdir, ignore_errors=True)


def start_worker(
    bench: Bench, engine: str, catalog: Path, workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:  # fmt: skip
    env = {
        **os.environ,
        "KAIROS_KAFKA_BOOTSTRAP": bench.bootstrap,
        "KAIROS_REDIS_URL": bench.redis_url,
        "KAIROS_KEY_PREFIX": bench.prefix,
        "KAIROS_CLICKSTREAM_TOPIC": bench.topic("clickstream"),
        "KAIROS_DLQ_TOPIC": bench.topic("dlq"),
        "KAIROS_CATALOG_TOPIC": bench.topic("catalog"),
        "KAIROS_DECISIONS_TOPIC": bench.topic("decisions"),
        "KAIROS_CONSUMER_GROUP": f"kairos-{bench.prefix}",
        "KAIROS_CATALOG_PATH": str(catalog),
        "KAIROS_PARTITIONS": str(bench.partitions),
        "KAIROS_METRICS_PORT": "0",
        "KAIROS_ENGINE": engine,
        **(extra_env or {}),
    }
    with (workdir / f"worker-{engine}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_engine", "worker"], env=env, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


class WorkerExited(RuntimeError):
    """A benchmark's worker process ended while the benchmark still needed it."""


def check_worker(proc: subprocess.Popen[bytes], workdir: Path, engine: str) -> None:
    """Raises WorkerExited, with the end of its log, if the worker has exited: a wait for
    state that a dead worker will never write otherwise lasts its whole timeout (a seed
    waited 15 minutes on a worker that had failed to import at once)."""
    if proc.poll() is None:
        return
    log = workdir / f"worker-{engine}.log"
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        tail = []
    said = "\n  ".join(tail) if tail else "(nothing)"
    raise WorkerExited(f"the {engine} worker exited with {proc.returncode}; the end of {log}:"
                       f"\n  {said}")  # fmt: skip


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def redis_benchmark(redis_url: str) -> dict[str, float]:
    """redis-benchmark SET/GET requests/s on the same server, as the store's baseline."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {}
    port = re.search(r":(\d+)", redis_url.split("//", 1)[1])
    cmd = [exe, "-h", "127.0.0.1", "-p", port.group(1) if port else "6379",
           "-t", "set,get", "-n", "50000", "-c", "20", "-q"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    return {
        m.group(1).lower(): float(m.group(2))
        for m in re.finditer(r"(SET|GET): ([\d.]+) requests per second", out)
    }


# ----------------------------------------------------------------------------- main


@dataclass
class Lane:
    """One engine under test: its own topics, key prefix and worker process."""

    engine: str
    bench: Bench
    traffic: Traffic  # its own shoppers: a session's sequence numbers must match its lane
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0


def misses(r: RunResult) -> str | None:
    """Why a live run does not show the worker sustaining its rate (None: it does): the
    generator short of the rate, events never seen, or a backlog that grew."""
    if r.pacing.rate < SENT_SHARE * r.rate:
        return f"the generator sent only {r.pacing.rate:.0f}/s"
    if r.unseen:
        return f"{r.unseen} events never seen in Redis"
    if r.backlog_growth > KEEPS_UP_SHARE * r.rate:
        return f"backlog grew {r.backlog_growth:+.0f} events/s"
    return None


async def measure_live(
    lane: Lane, rate: int, duration: float, redis: aioredis.Redis, db: int,
    others: dict[str, int],
) -> RunResult:  # fmt: skip
    """One live run of `lane`'s worker at `rate`: freshness, CPU, the worker's own means,
    then the wait until its group has caught up (the next run starts with no backlog)."""
    if lane.proc is None:
        raise RuntimeError(f"the {lane.engine} worker is not running")
    meter = CpuMeter({"generator": os.getpid(), "worker": lane.proc.pid, **others})
    before = await asyncio.to_thread(worker_sums, lane.metrics_port)
    r = await run_kairos(lane.bench, lane.traffic, redis, rate, duration, db)
    r.cpu = meter.percent()
    after = await asyncio.to_thread(worker_sums, lane.metrics_port)
    r.worker = worker_means(before, after)
    r.kind = lane.engine
    r.catch_up_s = await caught_up(lane.bench, lane.engine)
    return r


async def run(
    rates: list[int], duration: float, repeats: int, engines: list[str], out_dir: Path,
    producer: str = "aiokafka", find: tuple[int, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`find`: (from, to) for --find-max, each engine's highest live rate sustained."""
    raw = Bench.from_env(producer=producer)
    redis_url = raw.redis_url
    workdir = Path(tempfile.mkdtemp(prefix="kairos-ingest-"))
    catalog = write_demo_catalog(workdir / "catalog.jsonl", 10_000)
    items = load_items(catalog)
    lanes = [
        Lane(e, Bench.from_env(run_id=f"{raw.run_id}-{e}", producer=producer),
             Traffic(items, active_sessions=5000, seed=n + 1, tracked_share=TRACKED_SHARE))
        for n, e in enumerate(engines)
    ]  # fmt: skip
    redis = aioredis.Redis.from_url(redis_url)
    db = int(redis.connection_pool.connection_kwargs.get("db", 0))
    server = await redis.info("server")
    others = stack_pids(server)
    strangers = warn_bystanders()
    config = await redis.config_get("notify-keyspace-events")
    old_notify = str(config.get("notify-keyspace-events") or "")
    await redis.config_set("notify-keyspace-events", "Kh")
    results: list[RunResult] = []
    found: dict[str, Search[RunResult]] = {}
    try:
        store = redis_benchmark(redis_url)
        # One engine at a time, alone on the machine: a worker still draining a backlog
        # would otherwise steal CPU from the next engine's run.
        for lane in lanes:
            names = ("clickstream", "dlq", "catalog", "decisions")
            await _create_topics(lane.bench, [lane.bench.topic(n) for n in names])
            lane.metrics_port = free_port()
            lane.proc = start_worker(lane.bench, lane.engine, catalog, workdir,
                                     {"KAIROS_METRICS_PORT": str(lane.metrics_port)})  # fmt: skip
            print(f"warming up {lane.engine} (log: {workdir}/worker-{lane.engine}.log)", flush=True)
            await run_kairos(lane.bench, lane.traffic, redis, 200, 5.0, db)
            check_worker(lane.proc, workdir, lane.engine)
            for rep in range(repeats):
                for rate in rates:
                    results.append(await run_raw(raw, rate, duration))
                    _print_run(rep, results[-1])
                    results.append(await measure_live(lane, rate, duration, redis, db, others))
                    _print_run(rep, results[-1])
            if find is not None:

                async def step(rate: int, lane: Lane = lane) -> RunResult:
                    r = await measure_live(lane, rate, duration, redis, db, others)
                    _print_run(-1, r)
                    return r

                found[lane.engine] = await highest_held(step, misses, *find, SEARCH_FACTOR,
                                                        SEARCH_GRAIN)  # fmt: skip
            stop_worker(lane.proc)
            lane.proc = None
    finally:
        for lane in lanes:
            if lane.proc is not None:
                stop_worker(lane.proc)
        await redis.config_set("notify-keyspace-events", old_notify)
        for bench in (raw, *(lane.bench for lane in lanes)):
            await _cleanup(bench, redis)
        await redis.aclose()
    discard_workdir(workdir)
    report = summarize(results, rates, ["raw", *engines], store)
    if found:
        report["search"] = {}
        for engine, f in found.items():
            print(f"{engine}: highest live rate sustained with flat lag (growth under "
                  f"{100 * KEEPS_UP_SHARE:.0f}% of the rate), searched: {f.held_text} "
                  f"(stopped: {f.stopped})")  # fmt: skip
            report["search"][engine] = {"held": f.held, "stopped": f.stopped,
                                        "steps": [asdict(r) for r in f.steps]}  # fmt: skip
    report["environment"] = {**environment(server), "other_kairos_processes": strangers,
                             "producer": producer}  # fmt: skip
    print(f"results: {write_report(out_dir, report, results)}")
    return report


def _print_run(rep: int, r: RunResult) -> None:
    label = "search  " if rep < 0 else f"repeat {rep + 1}"
    print(f"  {label} {r.kind:<8} {r.rate:>6}/s  p50 {r.latency.p50:8.2f} ms"
          f"  p99 {r.latency.p99:8.2f} ms  p99.9 {r.latency.p999:8.2f} ms"
          f"  sent {r.pacing.rate:7.0f}/s  unseen {r.unseen}"
          f"  gen-late p99 {r.pacing.late_p99_ms:.1f} ms"
          + "".join(f"  cpu {k} {v:.0f}%" for k, v in r.cpu.items())
          + (f"  catch-up {r.catch_up_s:.1f}s" if r.catch_up_s else "")
          + (f"  backlog growth {r.backlog_growth:+.0f}/s  p50 by third "
             + " / ".join(f"{v:.1f}" for v in r.p50_by_third) if r.p50_by_third else "")
          + _worker_line(r.worker), flush=True)  # fmt: skip


def _worker_line(w: dict[str, float]) -> str:
    if "fresh_ms" not in w:
        return ""
    wait = f" (waiting {w['wait_ms']:.1f})" if "wait_ms" in w else ""
    loop = (f"; loop late >{LATE_TICK_S * 1000:.0f} ms {w['late_ticks']:.0f} times,"
            f" worst <= {w['loop_worst_ms']:.0f} ms" if "late_ticks" in w else "")  # fmt: skip
    return (f"  worker means: produced->written {w['fresh_ms']:.1f} ms{wait},"
            f" batches of {w['batch_events']:.0f} applied in {w['apply_ms']:.1f} ms"
            + loop)  # fmt: skip


# The worker's histograms the split reads: (metric, mean's name in RunResult.worker, scale)
WORKER_MEANS = (
    ("kairos_freshness_produced_seconds", "fresh_ms", 1000.0),
    ("kairos_handoff_wait_seconds", "wait_ms", 1000.0),
    ("kairos_batch_apply_seconds", "apply_ms", 1000.0),
    ("kairos_batch_size", "batch_events", 1.0),
)


def worker_sums(port: int) -> dict[str, tuple[float, float]]:
    """The worker's histogram sums and counts now ({} if its metrics don't answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return parse_sums(r.read().decode())
    except OSError:
        return {}


# The worker's loop-lag histogram: the run's ticks later than LATE_TICK_S, and the bucket
# its latest tick of all fell in.
LOOP_LAG = "kairos_worker_loop_lag_seconds"
LATE_TICK_S = 0.01


def parse_sums(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each WORKER_MEANS histogram and of the loop-lag histogram in a
    Prometheus exposition, and the loop lag's cumulative buckets as `LOOP_LAG@le` ->
    (count, 0)."""
    names = {metric for metric, _, _ in WORKER_MEANS} | {LOOP_LAG}
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            if name.endswith(suffix) and (metric := name[: -len(suffix)]) in names:
                found.setdefault(metric, [0.0, 0.0])[slot] = float(value)
    lag = {f"{LOOP_LAG}@{le}": (n, 0.0) for le, n in buckets(text, LOOP_LAG).items()}
    return {**{metric: (v[0], v[1]) for metric, v in found.items()}, **lag}


def loop_lag(before: dict[str, tuple[float, float]],
             after: dict[str, tuple[float, float]]) -> dict[str, float]:  # fmt: skip
    """The run's loop ticks later than LATE_TICK_S, and the upper bound of the latest of
    all (ms: the bucket that holds every tick, inf if only +Inf does); {} without ticks."""

    def count(key: str) -> float:
        return after.get(key, (0.0, 0.0))[0] - before.get(key, (0.0, 0.0))[0]

    ticks = after.get(LOOP_LAG, (0.0, 0.0))[1] - before.get(LOOP_LAG, (0.0, 0.0))[1]
    if ticks <= 0:
        return {}
    bounds = sorted(float(k.split("@")[1]) for k in after if k.startswith(LOOP_LAG + "@"))
    on_time = count(f"{LOOP_LAG}@{LATE_TICK_S}")
    worst = next((b for b in bounds if count(f"{LOOP_LAG}@{b}") >= ticks), float("inf"))
    return {"late_ticks": ticks - on_time, "loop_worst_ms": 1000 * worst}


def worker_means(before: dict[str, tuple[float, float]],
                 after: dict[str, tuple[float, float]]) -> dict[str, float]:  # fmt: skip
    """Means over the run: per event for freshness and the hand-off wait (ms), per batch
    for the apply time (ms) and size (events). A series with nothing new is left out
    (the hand-off wait exists in the faust engine only)."""
    means: dict[str, float] = {}
    for metric, out, scale in WORKER_MEANS:
        total, count = after.get(metric, (0.0, 0.0))
        total0, count0 = before.get(metric, (0.0, 0.0))
        if count > count0:
            means[out] = round(scale * (total - total0) / (count - count0), 3)
    return {**means, **loop_lag(before, after)}


def environment(redis_info: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        "unknown",
    )  # fmt: skip
    versions: dict[str, str | None] = {}
    for dist in ("aiokafka", "confluent-kafka", "faust-streaming", "redis", "hiredis", "numpy",
                 "uvloop"):  # fmt: skip
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis_server": redis_info.get("redis_version"),
        "packages": versions,
        "worker_settings": {k: v for k, v in os.environ.items() if k.startswith("KAIROS_")},
    }


def write_report(out_dir: Path, report: dict[str, Any], results: list[RunResult]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    body = {"summary": report, "runs": [asdict(r) for r in results]}
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    return path


def summarize(
    results: list[RunResult], rates: list[int], kinds: list[str], store: dict[str, float]
) -> dict[str, Any]:
    print("\nmedian over repeats; latency from the intended send time, ms")
    print(f"{'rate/s':>7} {'path':<9} {'p50':>8} {'p99':>8} {'p99.9':>8} {'p99/raw':>8} "
          f"{'unseen':>7} {'late backlog':>12} {'growth/s':>9}  keeps up")  # fmt: skip
    summary: dict[str, Any] = {"redis_benchmark_rps": store, "rates": {}}
    for rate in rates:
        row: dict[str, Any] = {}
        raw_p99 = float("nan")
        for kind in kinds:
            runs = [r for r in results if r.rate == rate and r.kind == kind]
            if not runs:
                continue
            lat = median_of([r.latency for r in runs])
            raw_p99 = lat.p99 if kind == "raw" else raw_p99
            ratio = lat.p99 / raw_p99 if raw_p99 == raw_p99 and raw_p99 > 0 else float("nan")
            unseen = max(r.unseen for r in runs)
            backlog = max(r.max_backlog_late for r in runs)
            growth = statistics.median(r.backlog_growth for r in runs)
            # keeping up: the backlog grows by under 1% of the arrival rate
            keeps_up = kind == "raw" or growth <= KEEPS_UP_SHARE * rate
            print(f"{rate:>7} {kind:<9} {lat.p50:8.2f} {lat.p99:8.2f} {lat.p999:8.2f} "
                  f"{ratio:8.2f} {unseen:>7} {backlog:>12} {growth:>+9.0f}  "
                  f"{'yes' if keeps_up else 'NO'}")  # fmt: skip
            row[kind] = {**asdict(lat), "p99_over_raw": ratio, "unseen": unseen,
                         "late_backlog": backlog, "backlog_growth": growth,
                         "keeps_up": keeps_up}  # fmt: skip
        summary["rates"][str(rate)] = row
    if store:
        print("redis-benchmark on the same server: "
              + ", ".join(f"{k.upper()} {v:,.0f}/s" for k, v in store.items()))  # fmt: skip
    return summary
