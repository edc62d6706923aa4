"""The worker process end to end on the real broker and Redis: publish → state, DLQ,
kill -9 and restart without loss or doubling, two workers sharing the partitions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka import Producer

from api.pressure import report_commands
from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import catalog_changed_key, catalog_items_key
from stream_engine.demo_catalog import generate, write_demo_catalog
from stream_engine.processor import STORE_TIMEOUT_S
from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.topics import ensure_topics, topic_names
from stream_engine.vectors import from_bytes
from tests.conftest import (
    PrivateKafka,
    Stack,
    free_port,
    redis_server,
    wait_for,
    worker_topics,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ITEMS = [it.item_id for it in generate(500)]
WorkerFactory = Callable[[], "subprocess.Popen[bytes]"]


@pytest.fixture(params=["faust", "aiokafka", "librdkafka"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every worker test runs against every consumer; they share one contract."""
    return str(request.param)


@pytest.fixture
async def worker_env(
    stack: Stack, unique: str, key_prefix: str, tmp_path: Path, engine: str
) -> AsyncIterator[dict[str, str]]:
    catalog = write_demo_catalog(tmp_path / "catalog.jsonl", n_items=500)
    env = {
        **os.environ,
        "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "KAIROS_REDIS_URL": stack.redis_url,
        "KAIROS_KEY_PREFIX": key_prefix,
        **worker_topics(unique),
        "KAIROS_CATALOG_PATH": str(catalog),
        "KAIROS_PARTITIONS": "4",
        "KAIROS_ENGINE": engine,
    }
    settings = Settings.from_env(env)
    await ensure_topics(settings)
    yield env
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topic_names(settings))
    finally:
        await admin.close()


@pytest.fixture
def start_worker(
    worker_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts worker processes; every one is stopped (TERM, then KILL) after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int = 0, engine: str | None = None) -> subprocess.Popen[bytes]:
        env = {**worker_env, "KAIROS_METRICS_PORT": str(metrics_port)}
        if engine is not None:
            env["KAIROS_ENGINE"] = engine
        with (tmp_path / f"worker{len(procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stream_engine", "worker"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
async def producer(stack: Stack) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await p.start()
    yield p
    await p.stop()


@dataclass(frozen=True)
class Rig:
    """What a clickstream test drives: workers to start, a producer, Redis, the env."""

    start: Callable[..., subprocess.Popen[bytes]]
    producer: AIOKafkaProducer
    redis: aioredis.Redis
    env: dict[str, str]
    keys: Keys

    @property
    def topic(self) -> str:
        return self.env["KAIROS_CLICKSTREAM_TOPIC"]

    @property
    def redis_port(self) -> int:
        return int(self.env["KAIROS_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])

    async def publish(self, sessions: list[str], n: int, stride: int,
                      start: int = 0) -> dict[str, list[str]]:  # fmt: skip
        """Publish view events start..start+n-1 spread over the sessions; the items each
        session got, in order."""
        sent: dict[str, list[str]] = {sid: [] for sid in sessions}
        for k in range(start, start + n):
            sid = sessions[(k * stride) % len(sessions)]
            await self.producer.send(self.topic, _event(k, sid), key=sid.encode())
            sent[sid].append(ITEMS[k % len(ITEMS)])
        await self.producer.flush()
        return sent

    async def counts(self, sessions: list[str]) -> list[int]:
        return await _counts(self.redis, self.keys, sessions)

    async def wait_applied(self, sessions: list[str], n: int, within_s: float = 90) -> None:
        async def all_applied() -> bool:
            return sum(await self.counts(sessions)) >= n

        await wait_for(all_applied, within_s, f"all {n} events applied")


@pytest.fixture
async def private_rig(
    start_worker: Callable[..., subprocess.Popen[bytes]],
    producer: AIOKafkaProducer,
    worker_env: dict[str, str],
    key_prefix: str,
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> AsyncIterator[tuple[Rig, subprocess.Popen[bytes]]]:
    """A rig whose workers use a redis-server of the test's own, and that server, so the
    test may freeze or kill it."""
    url, server = private_redis
    worker_env["KAIROS_REDIS_URL"] = url
    redis = aioredis.Redis.from_url(url)
    yield Rig(start_worker, producer, redis, worker_env, Keys(key_prefix)), server
    await redis.aclose()


@pytest.fixture
def rig(
    start_worker: Callable[..., subprocess.Popen[bytes]],
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    worker_env: dict[str, str],
    key_prefix: str,
) -> Rig:
    return Rig(start_worker, producer, redis_client, worker_env, Keys(key_prefix))


def _event(n: int, sid: str, etype: str = "view", **extra: object) -> bytes:
    body = {"event_id": f"e{n}", "type": etype, "session_id": sid,
            "ts": int(time.time() * 1000), "item_id": ITEMS[n % len(ITEMS)], **extra}  # fmt: skip
    return orjson.dumps(body)


async def _counts(redis: aioredis.Redis, keys: Keys, sessions: list[str]) -> list[int]:
    pipe = redis.pipeline(transaction=False)
    for sid in sessions:
        pipe.hget(keys.session(sid), "n")
    return [int(v or 0) for v in await pipe.execute()]


async def test_published_events_reach_redis_and_bad_ones_the_dlq(rig: Rig, stack: Stack) -> None:
    rig.start()
    for body in (
        _event(0, "s1"),
        b"{broken",
        _event(1, "s1", "teleport"),
        _event(2, "s1", "click"),
    ):
        await rig.producer.send_and_wait(rig.topic, body, key=b"s1")

    async def two_applied() -> bool:
        return (await rig.counts(["s1"])) == [2]

    await wait_for(two_applied, 60, "two valid events applied")
    # No topic of the worker's own: faust's leader-election topic (`<group>-__assignor-
    # __leader`), always empty, was in every fetch, and a fetch for it alone waited out
    # faust's 1.5 s fetch wait while the clickstream's records piled up (app.py).
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    assert not [t for t in topics if t.startswith(rig.env["KAIROS_CONSUMER_GROUP"])], topics
    consumer = AIOKafkaConsumer(
        rig.env["KAIROS_DLQ_TOPIC"], bootstrap_servers=stack.kafka_bootstrap,
        auto_offset_reset="earliest", group_id=None,
    )  # fmt: skip
    await consumer.start()
    try:
        reasons: list[str] = []
        async with asyncio.timeout(30):
            while len(reasons) < 2:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    reasons += [orjson.loads(m.value)["reason"] for m in msgs]
    finally:
        await consumer.stop()
    assert sorted(reasons) == ["bad_json", "unknown_type"]


async def test_kill_and_restart_loses_nothing_and_doubles_nothing(rig: Rig) -> None:
    sessions = [f"s{k}" for k in range(40)]
    sent = await rig.publish(sessions, 3000, 7)
    first = rig.start()

    async def some_applied() -> bool:
        return sum(await rig.counts(sessions)) > 0

    await wait_for(some_applied, 60, "the first worker to apply something")
    os.killpg(first.pid, signal.SIGKILL)  # mid-stream, no chance to commit
    first.wait()
    rig.start()
    await rig.wait_applied(sessions, 3000)
    await asyncio.sleep(1.0)  # anything doubled would show up now
    assert await rig.counts(sessions) == [len(sent[s]) for s in sessions]


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "running"])
async def test_a_recreated_topic_is_applied_from_its_first_offset(
    rig: Rig, stack: Stack, restart: bool
) -> None:
    """Kafka numbers a recreated topic's offsets from 0 again (so does another cluster,
    after a migration): the sessions' and the aggregates' fences of the old topic must not
    take the new one's events for ones already applied, whether the worker was restarted
    or ran on through it (it then finds the topic back at its next metadata refresh,
    topics.CONSUMER_METADATA_MAX_AGE_MS)."""
    sessions = ["r1", "r2"]
    first = rig.start()
    await rig.publish(sessions, 40, 1)
    await rig.wait_applied(sessions, 40)
    trending = await rig.redis.zcard(rig.keys.trending())
    if restart:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=30)
    await _recreate(rig, stack, rig.topic)
    if restart:
        rig.start()
    await rig.publish(sessions, 10, 1, start=40)  # items the old topic's events never had
    await rig.wait_applied(sessions, 50, within_s=120)
    await asyncio.sleep(1.0)
    assert await rig.counts(sessions) == [25, 25]
    assert await rig.redis.zcard(rig.keys.trending()) > trending
    assert first.poll() is None or restart


async def _recreate(rig: Rig, stack: Stack, topic: str) -> None:
    """Delete `topic` and create it again (as the worker would: ensure_topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])

        async def gone() -> bool:
            return topic not in await admin.list_topics()

        await wait_for(gone, 30, f"topic {topic} deleted")
    finally:
        await admin.close()
    await ensure_topics(Settings.from_env(rig.env))


async def test_a_backlog_many_times_the_lanes_depth_arrives_whole_and_in_order(
    rig: Rig,
) -> None:
    """Lanes 8 records deep: fetching for a full lane stops and starts again many times
    (the librdkafka consumer's thread waits for room and is woken by the lanes)."""
    rig.env.update(KAIROS_BATCH_MAX="8", KAIROS_LANES="2")
    sessions, sent, sizes = await _apply_backlog(rig, 12, 1200, 5)
    # KAIROS_BATCH_MAX=8 bounds every batch: none in a bucket above 10, and 1,200 events
    # took at least 150 batches
    assert sizes['"10.0"'] == sizes['"+Inf"'] >= 1200 / 8
    # An event applied after a later one of its session would be refused by the fence.
    assert await rig.counts(sessions) == [100] * 12
    await _assert_recent_in_published_order(rig, sent)


@pytest.mark.parametrize("engine", ["faust"])
async def test_a_faust_backlog_applied_in_parts_keeps_every_sessions_order(rig: Rig) -> None:
    """With KAIROS_FAUST_SPLIT_FROM=2 every faust batch of two events or more is applied in
    parts by partition, and batches of other partitions start while one runs
    (app.split_batch, app.PartitionLanes): every event of a backlog lands once and each
    session's items stay in the order they were published. (How big the batches get
    depends on the machine: in one CI run all 755 were under 50 events.)"""
    rig.env.update(KAIROS_LANES="4", KAIROS_FAUST_SPLIT_FROM="2")
    sessions, sent, sizes = await _apply_backlog(rig, 16, 2400, 7)
    assert sizes['"500.0"'] == sizes['"+Inf"']  # no part above KAIROS_BATCH_MAX
    assert sizes['"+Inf"'] > sizes['"1.0"']  # batches of two or more: split into parts
    await asyncio.sleep(0.5)  # anything doubled would show up now
    assert await rig.counts(sessions) == [150] * 16
    await _assert_recent_in_published_order(rig, sent)


async def test_a_worker_joining_mid_backlog_loses_nothing_doubles_nothing_reorders_nothing(
    private_rig: tuple[Rig, subprocess.Popen[bytes]],
) -> None:
    """A rebalance while the first worker is deep in a backlog, with a batch stuck on a
    frozen Redis: the revocation has to go through while the worker waits (the faust
    consumer shares the agent's event loop), and the batch in flight lands after its
    partitions have moved. Every event still lands once, in its session's order, and
    both workers apply some."""
    rig, server = private_rig
    sessions = [f"s{k}" for k in range(48)]
    ports = [free_port(), free_port()]
    sent = await rig.publish(sessions, 12_000, 7)
    rig.start(ports[0])

    async def under_way() -> bool:
        return sum(await rig.counts(sessions)) > 0

    await wait_for(under_way, 60, "the first worker to be under way")
    server.send_signal(signal.SIGSTOP)
    try:
        rig.start(ports[1])
        await asyncio.sleep(10)  # the second worker starts and the group rebalances
    finally:
        server.send_signal(signal.SIGCONT)
    await rig.wait_applied(sessions, 12_000)
    await asyncio.sleep(1.0)  # anything doubled would show up now
    assert await rig.counts(sessions) == [len(sent[s]) for s in sessions]
    await _assert_recent_in_published_order(rig, sent)
    applied = [_metric(port, "kairos_events_total{", 'outcome="ok"') for port in ports]
    assert all(n > 0 for n in applied), applied


async def _apply_backlog(
    rig: Rig, n_sessions: int, n_events: int, stride: int
) -> tuple[list[str], dict[str, list[str]], dict[str, float]]:
    """Publish a backlog, then start one worker and wait until all of it is applied: the
    sessions, what each was sent, and the worker's batch-size histogram buckets."""
    sessions = [f"s{k}" for k in range(n_sessions)]
    sent = await rig.publish(sessions, n_events, stride)
    port = free_port()
    rig.start(metrics_port=port)
    await rig.wait_applied(sessions, n_events)
    return sessions, sent, _samples(port, "kairos_batch_size_bucket{")


async def _assert_recent_in_published_order(rig: Rig, sent: dict[str, list[str]]) -> None:
    """Each session's recent items (newest first) are the newest of what it was sent, in
    the order it was sent."""
    for sid, items in sent.items():
        raw = await rig.redis.hget(rig.keys.session(sid), "r")
        recent = raw.decode().split() if isinstance(raw, bytes) else []
        newest_first = list(dict.fromkeys(reversed(items)))
        assert recent == newest_first[: len(recent)], sid
        assert recent


async def test_the_worker_logs_one_json_object_a_line_at_the_configured_level(
    rig: Rig, tmp_path: Path
) -> None:
    """KAIROS_LOG_FORMAT and KAIROS_LOG_LEVEL hold for every engine (a faust Worker used
    to put its own colored text handler at WARNING in place of ours)."""
    rig.env.update(KAIROS_LOG_FORMAT="json", KAIROS_LOG_LEVEL="INFO")
    proc = rig.start()
    await rig.producer.send_and_wait(rig.topic, _event(0, "s1"), key=b"s1")
    await rig.wait_applied(["s1"], 1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    lines = (tmp_path / "worker0.log").read_text().splitlines()
    records = [orjson.loads(line) for line in lines if line.strip()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    consuming = [r for r in records if r["msg"].startswith("consuming ")]
    assert consuming, records
    assert consuming[0]["level"] == "info"
    assert rig.topic in consuming[0]["msg"]
    if rig.env["KAIROS_ENGINE"] == "faust":  # uvloop, as every other Kairos process
        loops = [r["msg"] for r in records if r["msg"].startswith("faust agent running")]
        assert loops, records  # once per agent start (a rebalance restarts it)
        assert set(loops) == {"faust agent running on the uvloop event loop"}


async def test_the_worker_slows_down_when_the_api_reports_slow_reads(rig: Rig) -> None:
    """Every engine watches the API's slow-read counter (stream_engine/pressure.py): a
    report sets the limit the worker exports, and it goes on applying events under it."""
    port = free_port()
    rig.start(metrics_port=port)
    await rig.producer.send_and_wait(rig.topic, _event(0, "s1"), key=b"s1")
    await rig.wait_applied(["s1"], 1)

    async def reported() -> bool:
        for command in report_commands(rig.keys.pressure):  # what an API sends
            await rig.redis.execute_command(*command)  # type: ignore[no-untyped-call]
        return _metric(port, "kairos_worker_pressure_reports_total", "") >= 1

    await wait_for(reported, 20, "the worker to see the API's report", step=0.2)
    assert _metric(port, "kairos_worker_apply_limit_events_per_second", "") >= 2000
    await rig.producer.send_and_wait(rig.topic, _event(1, "s2"), key=b"s2")
    await rig.wait_applied(["s2"], 1)


async def test_two_workers_share_the_partitions(rig: Rig) -> None:
    await _pair_shares(rig, None)


@pytest.mark.parametrize("engine", ["librdkafka"])
async def test_a_librdkafka_and_an_aiokafka_worker_share_one_group(rig: Rig) -> None:
    """Both plain engines assign round-robin, so a deployment can move from one to the
    other a worker at a time."""
    await _pair_shares(rig, "aiokafka")


async def _pair_shares(rig: Rig, second_engine: str | None) -> None:
    ports = [free_port(), free_port()]
    rig.start(ports[0])
    rig.start(ports[1], second_engine)
    await asyncio.sleep(8)  # both join the group before the events arrive
    sessions = [f"s{k}" for k in range(64)]
    await rig.publish(sessions, 320, 1)
    await rig.wait_applied(sessions, 320)
    assert await rig.counts(sessions) == [5] * 64
    per_worker = [_metric(port, "kairos_events_total{", 'outcome="ok"') for port in ports]
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == 320
    ticks = [_metric(port, "kairos_worker_loop_lag_seconds_count", "") for port in ports]
    assert all(n >= 200 for n in ticks), ticks  # every engine times its loop (5 ms ticks)
    if rig.env["KAIROS_ENGINE"] == "faust" and second_engine is None:
        # every event waited in a faust worker's hand-off, and was timed there
        waited = [_metric(port, "kairos_handoff_wait_seconds_count", "") for port in ports]
        assert sum(waited) >= 320, waited
    # Each reports lag for the partitions it owns; together all four, and nothing left.
    await asyncio.sleep(2.5)
    lags = [_samples(port, "kairos_consumer_lag{") for port in ports]
    assert all(lags), lags
    assert sorted(p for lag in lags for p in lag) == ['"0"', '"1"', '"2"', '"3"']
    assert all(v == 0 for lag in lags for v in lag.values())


def _samples(port: int, prefix: str) -> dict[str, float]:
    """label value (of the first label) -> sample value, for the lines starting with prefix."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line.rsplit(" ", 1)
            out[labels.split("=", 1)[1].split(",")[0].rstrip("}")] = float(value)
    return out


def _metric(port: int, prefix: str, contains: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix) and contains in line
        )
    )


async def test_catalog_updates_take_effect_within_seconds(rig: Rig) -> None:
    producer, redis_client, keys = rig.producer, rig.redis, rig.keys
    catalog = Catalog.from_file(Path(rig.env["KAIROS_CATALOG_PATH"]))
    template = catalog.items[1]
    rig.start()
    updates = rig.env["KAIROS_CATALOG_TOPIC"]
    sold_out = {"item_id": ITEMS[0], "stock": 0}
    new_items = [{"item_id": f"new-{n}", "title": "Fresh", "category": template.category_path,
                  "price": 12.5, "stock": 3} for n in range(1, 9)]  # fmt: skip
    bodies: list[dict[str, Any]] = [sold_out, *new_items, {"stock": 1}]  # last: no item_id
    for body in bodies:  # keyed by item: the updates land on all 4 partitions
        key = str(body.get("item_id", "k")).encode()
        await producer.send_and_wait(updates, orjson.dumps(body), key=key)
    items_key = catalog_items_key(keys.prefix)

    async def mirrored() -> bool:
        return await redis_client.hlen(items_key) == len(bodies) - 1

    await wait_for(mirrored, 30, "every valid catalog update mirrored into Redis")
    stored = orjson.loads(cast(bytes, await redis_client.hget(items_key, ITEMS[0])))
    assert stored["stock"] == 0
    # each mirrored item indexed by the version its change made, for the API to read
    # only what changed since its last read
    changed = await redis_client.zrange(catalog_changed_key(keys.prefix), 0, -1)
    valid = [str(body["item_id"]).encode() for body in bodies if "item_id" in body]
    assert sorted(changed) == sorted(valid)
    assert stored["title"] == catalog.items[0].title  # untouched fields kept
    # The worker knows the new item: a click on it moves the session into its category.
    click = orjson.dumps({"event_id": "c1", "type": "click", "session_id": "s1",
                          "ts": int(time.time() * 1000), "item_id": "new-1"})  # fmt: skip
    await producer.send_and_wait(rig.topic, click, key=b"s1")

    async def has_vector() -> bool:
        return bool(await redis_client.hexists(keys.session("s1"), "v"))

    await wait_for(has_vector, 30, "the click on the new item applied")
    raw = cast(bytes, await redis_client.hget(keys.session("s1"), "v"))
    vector = from_bytes(raw, catalog.space.dims)
    assert vector is not None
    category = "cat:" + " > ".join(template.category[:2])
    assert vector[catalog.space.index[category]] > 0


CODECS = ("gzip", "snappy", "lz4", "zstd")


def _produce_compressed(bootstrap: str, topic: str, codec: str,
                        records: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
    """Records as a tracker's librdkafka client sends them: batched (linger 5 ms) and
    compressed with the codec, so each batch on the broker is one compressed record set."""
    producer = Producer({"bootstrap.servers": bootstrap, "compression.codec": codec,
                         "linger.ms": 5, "enable.idempotence": True})  # fmt: skip
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0, f"{codec}: records left unsent"


async def test_clickstream_and_catalog_batches_in_every_kafka_codec_are_applied(
    rig: Rig, stack: Stack
) -> None:
    """Trackers and merchandising tools compress what they produce (lz4 and zstd are the
    usual choices): every Kafka codec reaches Redis through every engine. aiokafka without
    its codec libraries raised UnsupportedCodecError on the first snappy, lz4 or zstd
    batch, and that worker applied nothing more."""
    sessions = [f"{codec}-s{k}" for codec in CODECS for k in range(3)]
    updates = rig.env["KAIROS_CATALOG_TOPIC"]
    for n, codec in enumerate(CODECS):
        clicks = [(sid.encode(), _event(100 * n + k, sid))
                  for k, sid in enumerate(sessions[3 * n:3 * n + 3] * 4)]  # fmt: skip
        stock = [(ITEMS[n].encode(), orjson.dumps({"item_id": ITEMS[n], "stock": 40 + n}))]
        await asyncio.to_thread(_produce_compressed, stack.kafka_bootstrap, rig.topic,
                                codec, clicks)  # fmt: skip
        await asyncio.to_thread(_produce_compressed, stack.kafka_bootstrap, updates,
                                codec, stock)  # fmt: skip
    rig.start()
    await rig.wait_applied(sessions, 12 * len(CODECS), within_s=60)
    assert await rig.counts(sessions) == [4] * len(sessions)
    items_key = catalog_items_key(rig.keys.prefix)

    async def stock_mirrored() -> bool:
        raws = await rig.redis.hmget(items_key, ITEMS[: len(CODECS)])
        return [raw and orjson.loads(raw)["stock"] for raw in raws] == [40, 41, 42, 43]

    await wait_for(stock_mirrored, 30, "each codec's stock change mirrored")


def _transactions(bootstrap: str, topic: str, aborted: list[tuple[bytes, bytes]],
                  committed: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
    """One transaction aborted, then one committed, all on partition 0: the committed
    records come after the aborted ones, so a consumer that read them passed the others."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                         "transactional.id": f"kairos-test-{topic}"})  # fmt: skip
    producer.init_transactions(30)
    for records, end in ((aborted, producer.abort_transaction),
                         (committed, producer.commit_transaction)):  # fmt: skip
        producer.begin_transaction()
        for key, value in records:
            producer.produce(topic, key=key, value=value, partition=0)
        producer.flush(30)
        end(30)


@pytest.mark.parametrize("isolation", ["read_committed", "read_uncommitted"])
async def test_a_transactional_producers_aborted_records_are_applied_as_the_setting_says(
    rig: Rig, stack: Stack, isolation: str
) -> None:
    """KAIROS_ISOLATION_LEVEL, the same for every engine: read_committed (the default)
    applies nothing a producer's transaction aborted, on the clickstream or the catalog;
    read_uncommitted applies it. librdkafka had read committed records, aiokafka and faust
    every record."""
    rig.env["KAIROS_ISOLATION_LEVEL"] = isolation
    updates = rig.env["KAIROS_CATALOG_TOPIC"]

    def clicks(sid: str, first: int) -> list[tuple[bytes, bytes]]:
        return [(sid.encode(), _event(first + k, sid)) for k in range(3)]

    def stock(item: str, value: int) -> list[tuple[bytes, bytes]]:
        return [(item.encode(), orjson.dumps({"item_id": item, "stock": value}))]

    await asyncio.to_thread(_transactions, stack.kafka_bootstrap, rig.topic,
                            clicks("t-aborted", 0), clicks("t-committed", 10))  # fmt: skip
    await asyncio.to_thread(_transactions, stack.kafka_bootstrap, updates,
                            stock(ITEMS[0], 0), stock(ITEMS[1], 9))  # fmt: skip
    rig.start()
    await rig.wait_applied(["t-committed"], 3, within_s=60)
    items_key = catalog_items_key(rig.keys.prefix)

    async def committed_stock_mirrored() -> bool:
        raw = await rig.redis.hget(items_key, ITEMS[1])
        return raw is not None and orjson.loads(raw)["stock"] == 9

    await wait_for(committed_stock_mirrored, 30, "the committed stock change mirrored")
    aborted_read = isolation == "read_uncommitted"
    assert await rig.counts(["t-aborted", "t-committed"]) == [3 if aborted_read else 0, 3]
    assert (await rig.redis.hexists(items_key, ITEMS[0])) == aborted_read


@pytest.mark.parametrize("engine", ["aiokafka"])  # the follower is the same for every engine
async def test_a_running_worker_follows_a_catalog_topic_created_again(
    rig: Rig, stack: Stack
) -> None:
    """A catalog topic deleted and created again under a running worker: its follower
    (no group) was assigned nothing until its consumer's next metadata refresh, 5 minutes
    by default, and stock changes stopped reaching the API meanwhile; it refreshes every
    30 s (topics.CONSUMER_METADATA_MAX_AGE_MS), and reads the new topic from its start."""
    updates = rig.env["KAIROS_CATALOG_TOPIC"]
    items_key = catalog_items_key(rig.keys.prefix)

    async def stock(item: str, value: int) -> None:
        body = orjson.dumps({"item_id": item, "stock": value})
        await rig.producer.send_and_wait(updates, body, key=item.encode())

        async def mirrored() -> bool:
            raw = await rig.redis.hget(items_key, item)
            return raw is not None and orjson.loads(raw)["stock"] == value

        await wait_for(mirrored, 100, f"stock {value} of {item} mirrored")

    rig.start()
    for n in range(3):  # offsets the new topic's first updates must not be taken for
        await stock(ITEMS[n], 7)
    await _recreate(rig, stack, updates)
    await stock(ITEMS[0], 0)
    await stock(ITEMS[1], 0)


@pytest.mark.timeout(300)
async def test_a_broker_crash_and_restart_under_a_running_worker_loses_and_doubles_nothing(
    rig: Rig, private_kafka: PrivateKafka
) -> None:
    """The broker killed mid-stream (no clean shutdown: fetches, commits and the group's
    heartbeats fail until it is back) and started again on its data: the worker keeps
    running, applies what follows, and the fences keep every count exact across the
    uncommitted offsets it is handed again."""
    rig.env["KAIROS_KAFKA_BOOTSTRAP"] = private_kafka.bootstrap
    await ensure_topics(Settings.from_env(rig.env))
    sessions = [f"b{k}" for k in range(20)]
    producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap, linger_ms=0)
    await producer.start()
    try:
        ours = Rig(rig.start, producer, rig.redis, rig.env, rig.keys)
        worker = ours.start()
        await ours.publish(sessions, 200, 1)
        await ours.wait_applied(sessions, 200)
    finally:
        await producer.stop()
    private_kafka.crash()
    await asyncio.sleep(5.0)
    assert worker.poll() is None, "the worker stopped with the broker"
    private_kafka.stack("up", "kafka")
    producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap, linger_ms=0)
    await producer.start()
    try:
        ours = Rig(rig.start, producer, rig.redis, rig.env, rig.keys)
        await ours.publish(sessions, 200, 1, start=200)
        await ours.wait_applied(sessions, 400, within_s=120)
    finally:
        await producer.stop()
    await asyncio.sleep(1.0)  # anything doubled would show up now
    assert await rig.counts(sessions) == [20] * 20
    assert worker.poll() is None


@pytest.mark.timeout(300)
async def test_a_worker_started_before_its_broker_waits_for_it(
    rig: Rig, private_kafka: PrivateKafka, tmp_path: Path
) -> None:
    """A worker started while Kafka is down (both restarted, a deployment's order) exited
    at once with a traceback; it now says it waits, and starts once the broker is up."""
    rig.env["KAIROS_KAFKA_BOOTSTRAP"] = private_kafka.bootstrap
    private_kafka.crash()
    worker = rig.start()
    log = tmp_path / "worker0.log"

    def waiting() -> bool:
        return "is not ready" in log.read_text(errors="replace")

    await wait_for(waiting, 30, "the worker to say it waits for Kafka")
    assert worker.poll() is None, log.read_text(errors="replace")[-2000:]
    private_kafka.stack("up", "kafka")
    sessions = [f"w{k}" for k in range(10)]
    producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap, linger_ms=0)
    await producer.start()
    try:
        ours = Rig(rig.start, producer, rig.redis, rig.env, rig.keys)
        await ours.publish(sessions, 100, 1)
        await ours.wait_applied(sessions, 100, within_s=120)
    finally:
        await producer.stop()
    assert await rig.counts(sessions) == [10] * 10


async def test_a_redis_restarted_empty_under_a_running_worker_gets_what_follows_once(
    private_rig: tuple[Rig, subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Redis killed and started again without its data (no persistence): the worker's
    cache of the sessions it wrote, its loaded scripts and its aggregates' upkeep all
    describe a Redis that is gone. It waits out the outage, then applies what follows to
    fresh state, each event once, none to the dead letters."""
    rig, server = private_rig
    port = rig.redis_port
    metrics = free_port()
    sessions = [f"s{k}" for k in range(20)]
    worker = rig.start(metrics)
    redis = rig.redis
    again: subprocess.Popen[bytes] | None = None
    try:
        await rig.publish(sessions, 200, 1)
        await rig.wait_applied(sessions, 200)
        server.kill()
        server.wait()
        await rig.publish(sessions, 100, 1, start=200)  # during the outage
        await asyncio.sleep(2.0)
        again = redis_server(port, tmp_path)
        await redis.connection_pool.disconnect()  # the test's own, closed by the old server
        await rig.publish(sessions, 100, 1, start=300)
        # the 200 before the restart are gone with Redis's data; the 200 after, once each
        await rig.wait_applied(sessions, 200, within_s=60)
        await asyncio.sleep(1.0)
        assert await rig.counts(sessions) == [10] * 20
        assert await redis.zcard(rig.keys.trending()) > 0  # the aggregates start again too
        # each partition it had written, found without a trace: said, for an alert
        assert 1 <= _metric(metrics, "kairos_store_emptied_total", "") <= 4
        assert _metric(metrics, "kairos_dlq_events_total", "") == 0
        assert worker.poll() is None
    finally:
        if again is not None:
            again.terminate()
            again.wait(timeout=10)


@pytest.mark.parametrize("worker", ["running", "restarted", "moved", "reset"])
async def test_a_redis_restarted_from_an_older_snapshot_gets_the_lost_events_again(
    private_rig: tuple[Rig, subprocess.Popen[bytes]],
    tmp_path: Path,
    worker: str,
) -> None:
    """Redis killed and started again from a snapshot older than the worker's last writes:
    what a failover that lost the old primary's unreplicated writes leaves, or a restart
    with `appendfsync everysec`. The group has moved past those events in Kafka (and
    committed them): a worker that ran on through it finds each partition's fence behind
    what it wrote; one started again meanwhile ("restarted"), or a second worker that
    takes half the partitions over ("moved"), behind what the group's commits say was
    written. Each reads the missing offsets again and applies them: every event once,
    none lost. Before, the 100 events after the snapshot were gone for good (the
    restarted and the second worker's until session 41). An operator who reset the
    group's offsets meanwhile ("reset", to where they were: a reset carries no note) has
    said where to go on from: nothing is read again."""
    rig, server = private_rig
    port = rig.redis_port
    metrics = free_port()
    sessions = [f"s{k}" for k in range(20)]
    proc = rig.start(metrics)
    redis = rig.redis
    again: subprocess.Popen[bytes] | None = None
    try:
        await rig.publish(sessions, 200, 1)
        await rig.wait_applied(sessions, 200)
        await redis.save()  # the snapshot: 200 events
        await rig.publish(sessions, 100, 1, start=200)
        await rig.wait_applied(sessions, 300)
        await asyncio.sleep(1.5)  # offsets committed past them
        if worker in ("restarted", "reset"):
            os.killpg(proc.pid, signal.SIGTERM)  # a clean stop: it commits what it applied
            proc.wait(timeout=30)
        server.kill()
        server.wait()
        again = redis_server(port, tmp_path)  # loads the snapshot
        await redis.connection_pool.disconnect()
        assert await rig.counts(sessions) == [10] * 20  # Redis lost 100 events' effects
        if worker == "reset":
            await _commit_again_without_notes(Settings.from_env(rig.env))
        ports = [metrics]
        if worker in ("restarted", "reset"):
            ports = [free_port()]
            proc = rig.start(ports[0])
        elif worker == "moved":
            ports.append(free_port())
            rig.start(ports[1])
            await asyncio.sleep(8)  # it joins the group before the events arrive
        await rig.publish(sessions, 100, 1, start=300)
        lost = 100 if worker == "reset" else 0
        await rig.wait_applied(sessions, 400 - lost, within_s=60)
        await asyncio.sleep(1.0)
        assert await rig.counts(sessions) == [20 - lost // 20] * 20
        reapplied = [_metric(port, "kairos_events_reapplied_total", "") for port in ports]
        assert sum(reapplied) == 100 - lost
        assert all(reapplied) or lost, reapplied  # the second worker too, for its partitions
        regressions = sum(_metric(port, "kairos_store_regressions_total", "") for port in ports)
        assert (regressions >= 1) == (not lost)
        assert sum(_metric(port, "kairos_dlq_events_total", "") for port in ports) == 0
        assert proc.poll() is None
    finally:
        if again is not None:
            again.terminate()
            again.wait(timeout=10)


async def _commit_again_without_notes(settings: Settings) -> None:
    """The group's offsets committed again where they are, with no metadata: what an
    operator's `kafka-consumer-groups --reset-offsets` leaves."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                group_id=settings.consumer_group,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(settings.clickstream_topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        offsets = {tp: c for tp in tps if (c := await consumer.committed(tp)) is not None}
        assert offsets
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def test_a_frozen_redis_delays_but_loses_and_doubles_nothing(
    private_rig: tuple[Rig, subprocess.Popen[bytes]],
) -> None:
    """Redis stops answering for longer than the worker's store deadline: writes already
    sent may still run when it wakes, the worker retries them, and the fences keep every
    session's count exact."""
    rig, server = private_rig
    sessions = [f"s{k}" for k in range(20)]
    rig.start()
    await rig.publish(sessions, 200, 1)

    async def some_applied() -> bool:
        return sum(await rig.counts(sessions)) > 0

    await wait_for(some_applied, 60, "the worker to start applying")
    server.send_signal(signal.SIGSTOP)
    await rig.publish(sessions, 400, 1, start=200)
    await asyncio.sleep(STORE_TIMEOUT_S + 1.5)
    server.send_signal(signal.SIGCONT)
    await rig.wait_applied(sessions, 600, within_s=60)
    await asyncio.sleep(1.0)
    assert await rig.counts(sessions) == [30] * 20
