"""The report: honest lift statistics and sample-ratio checks (pure), then attribution on
the real Redis and, end to end, a paused slot seen through Kafka and the attribution
consumer."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import NewTopic

from api.config import load_config
from api.holdout import assign
from api.report import Window, build_report, proportion_lift, read_counters, sample_ratio
from api.settings import Settings as ApiSettings
from stream_engine.attribution import Attributor
from stream_engine.catalog import Catalog
from stream_engine.events import Event, EventType, encode_event
from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.store import Batches
from stream_engine.topics import TopicIdentity
from tests.api.conftest import ADMIN_TOKEN, client_for, with_
from tests.conftest import REPO, PrivateKafka, Stack, spawn_group, stop_group, wait_for

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def test_a_clear_difference_is_a_positive_lift_whose_interval_excludes_zero() -> None:
    lift = proportion_lift(600, 10_000, 10, 500)
    assert lift["status"] == "ok"
    assert lift["absolute_lift"] == pytest.approx(0.04)
    low, high = lift["ci95"]
    assert 0 < low < 0.04 < high
    assert lift["significant"]
    assert lift["relative_lift"] == pytest.approx(2.0)


def test_no_difference_has_an_interval_that_includes_zero() -> None:
    lift = proportion_lift(500, 10_000, 25, 500)
    low, high = lift["ci95"]
    assert low < 0 < high
    assert not lift["significant"]


def test_too_few_samples_say_so_instead_of_a_number() -> None:
    lift = proportion_lift(30, 1_000, 1, 50)
    assert lift["status"] == "not enough data yet"
    assert "absolute_lift" not in lift


def test_sample_ratio_mismatch() -> None:
    assert sample_ratio(500, 10_000, 0.05)["status"] == "ok"
    broken = sample_ratio(1_000, 10_000, 0.05)
    assert broken["status"] == "mismatch"
    assert broken["p_value"] < 1e-6


# ----------------------------------------------------------------------------- real Redis


def _exposure(sid: str, n: int, group: str, ts: int, items: list[str]) -> bytes:
    return orjson.dumps({
        "decision_id": f"d-{sid}-{n}", "ts": ts, "session_id": sid, "user_id": None,
        "slot": "home_recs", "strategy": "holdout" if group == "holdout" else "personalized",
        "fallback_reason": "holdout" if group == "holdout" else None, "group": group,
        "config_version": "t", "items": items, "banner": None, "rules": [],
    })  # fmt: skip


async def _simulate(
    attributor: Attributor, catalog: Catalog, share: float, ctr: dict[str, float],
    sessions: int = 4_000, seed: int = 11, broken_holdout: float | None = None,
) -> None:  # fmt: skip
    """Each session sees one decision of 4 items and clicks one of them with the group's
    probability; the clicks carry the decision id (half of them) or not (by session+item)."""
    rng = random.Random(seed)
    now = int(time.time() * 1000) - 60_000
    exposures: list[tuple[int, bytes]] = []
    clicks: list[tuple[int, bytes]] = []
    items = [it.item_id for it in catalog.items[:200]]
    for i in range(sessions):
        sid = f"sim-{seed}-{i}"
        if broken_holdout is None:
            group = assign(sid, share).value
        else:
            group = "holdout" if rng.random() < broken_holdout else "treatment"
        shown = rng.sample(items, 4)
        exposures.append((i, _exposure(sid, 0, group, now + i, shown)))
        if rng.random() < ctr[group]:
            extra: dict[str, Any] = {"decision_id": f"d-{sid}-0"} if i % 2 else {}
            event = Event(f"c-{sid}", EventType.CLICK, sid, now + i + 500, item_id=shown[1],
                          **extra)  # fmt: skip
            clicks.append((len(clicks), encode_event(event)))
    for start in range(0, len(exposures), 500):
        await attributor.apply("decisions", 0, exposures[start : start + 500])
    for start in range(0, len(clicks), 500):
        await attributor.apply("clickstream", 0, clicks[start : start + 500])


@pytest.fixture
def api_settings(settings: ApiSettings) -> ApiSettings:
    return settings


@pytest.fixture
def attributor(redis_client: aioredis.Redis, key_prefix: str, catalog: Catalog) -> Attributor:
    settings = Settings(key_prefix=key_prefix, decisions_topic="decisions")
    return Attributor(settings, catalog, redis_client)


def _config(tmp_path: Path, share: float) -> Path:
    text = (REPO / "api" / "demo_config.yaml").read_text()
    path = tmp_path / "kairos.yaml"
    path.write_text(text.replace("holdout_share: 0.05", f"holdout_share: {share}"))
    return path


async def _report(redis: aioredis.Redis, prefix: str, config: Path) -> dict[str, Any]:
    window = Window(30, int(time.time() * 1000))
    batches = Batches(redis)
    try:
        totals, series, counts = await read_counters(batches.execute, prefix, window)
    finally:
        await batches.aclose()
    return build_report(load_config(config), totals, series, counts, window)


@pytest.mark.integration
async def test_treatment_that_converts_better_shows_a_positive_lift(
    attributor: Attributor, catalog: Catalog, redis_client: aioredis.Redis,
    key_prefix: str, tmp_path: Path, api_settings: ApiSettings,
) -> None:  # fmt: skip
    await _simulate(attributor, catalog, 0.2, {"treatment": 0.10, "holdout": 0.05})
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.2))
    recs = report["slots"]["home_recs"]
    lift = recs["click_through"]
    assert lift["status"] == "ok"
    assert lift["treatment"]["n"] + lift["holdout"]["n"] == 4_000
    assert lift["ci95"][0] > 0
    assert lift["treatment"]["rate"] == pytest.approx(0.10, abs=0.015)
    assert report["sample_ratio"]["status"] == "ok"
    assert recs["fallback_reasons"] == {"holdout": lift["holdout"]["n"]}
    # the same figures as gauges an SRE can alert on, and the page that charts them
    config = str(_config(tmp_path, 0.2))
    async with client_for(with_(api_settings, config_path=config)) as client:
        await client.app.state.runtime.refresh_report(30)  # type: ignore[attr-defined]
        metrics = (await client.get("/metrics")).text
        page = await client.get("/admin/report/page")
    gauge = 'kairos_report_click_through_lift{bound="low",slot="home_recs"}'
    low = next(line for line in metrics.splitlines() if line.startswith(gauge))
    assert float(low.rsplit(" ", 1)[1]) > 0
    assert 'kairos_report_fallback_share{reason="holdout",slot="home_recs"}' in metrics
    assert page.status_code == 200
    assert "is personalization on" in page.text


@pytest.mark.integration
async def test_no_difference_gives_an_interval_around_zero_and_replays_change_nothing(
    attributor: Attributor, catalog: Catalog, redis_client: aioredis.Redis,
    key_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    await _simulate(attributor, catalog, 0.2, {"treatment": 0.08, "holdout": 0.08})
    first = await _report(redis_client, key_prefix, _config(tmp_path, 0.2))
    await _simulate(attributor, catalog, 0.2, {"treatment": 0.08, "holdout": 0.08})  # redelivery
    again = await _report(redis_client, key_prefix, _config(tmp_path, 0.2))
    lift = first["slots"]["home_recs"]["click_through"]
    assert lift["ci95"][0] < 0 < lift["ci95"][1]
    assert again["slots"]["home_recs"] == first["slots"]["home_recs"]


@pytest.mark.integration
async def test_a_broken_assignment_triggers_the_sample_ratio_warning(
    attributor: Attributor, catalog: Catalog, redis_client: aioredis.Redis,
    key_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    await _simulate(attributor, catalog, 0.05, {"treatment": 0.05, "holdout": 0.05},
                    broken_holdout=0.12)  # fmt: skip
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert report["sample_ratio"]["status"] == "mismatch"
    assert any(w.startswith("sample ratio mismatch") for w in report["warnings"])


# ----------------------------------------------------------------------------- end to end


def _start_attribution(
    settings: ApiSettings, unique: str, catalog_file: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`python -m stream_engine attribution` on the API's Kafka, Redis and topics."""
    env = {
        **os.environ, "PYTHONPATH": str(REPO),
        "KAIROS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "KAIROS_REDIS_URL": settings.redis_url,
        "KAIROS_KEY_PREFIX": settings.key_prefix, "KAIROS_CATALOG_PATH": str(catalog_file),
        "KAIROS_CLICKSTREAM_TOPIC": settings.clickstream_topic,
        "KAIROS_DECISIONS_TOPIC": settings.decisions_topic,
        "KAIROS_DLQ_TOPIC": f"dlq.{unique}", "KAIROS_CATALOG_TOPIC": f"catalog.{unique}",
        "KAIROS_CONSUMER_GROUP": f"group-{unique}", "KAIROS_PARTITIONS": "1",
    }  # fmt: skip
    return spawn_group([sys.executable, "-m", "stream_engine", "attribution"], env, log)


@pytest.fixture
def attribution_process(
    settings: ApiSettings, unique: str, catalog_file: Path, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    proc = _start_attribution(settings, unique, catalog_file, tmp_path / "attribution.log")
    yield proc
    stop_group(proc)


async def _decisions_counted(
    client: httpx.AsyncClient, slot: str, n: int, proc: subprocess.Popen[bytes], within_s: float
) -> dict[str, Any]:
    """The report once attribution has counted `n` decisions of `slot` (or the deadline)."""
    deadline = time.monotonic() + within_s
    while True:
        report: dict[str, Any] = (await client.get("/admin/report?minutes=5", headers=AUTH)).json()
        if report["slots"][slot]["decisions"] >= n or time.monotonic() > deadline:
            return report
        assert proc.poll() is None
        await asyncio.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("topics")
async def test_a_paused_slot_shows_as_all_default_with_reason_paused(
    settings: ApiSettings, attribution_process: subprocess.Popen[bytes]
) -> None:
    async with client_for(settings) as client:
        await client.post("/admin/pause", json={"slot": "home_recs"}, headers=AUTH)
        for i in range(30):
            await client.get(f"/v1/slots/home_recs?session_id=p{i}")
            await client.get(f"/v1/slots/home_hero?session_id=p{i}")
        report = await _decisions_counted(client, "home_recs", 30, attribution_process, 45)
    recs = report["slots"]["home_recs"]
    assert recs["decisions"] == 30
    assert recs["default_share"] == 1.0
    assert set(recs["fallback_reasons"]) <= {"paused", "holdout"}
    assert recs["fallback_reasons"]["paused"] >= 25
    assert report["slots"]["home_hero"]["decisions"] == 30
    assert any("home_recs decisions were the default" in w and "paused" in w
               for w in report["warnings"])  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_attribution_carries_on_through_a_broker_crash_and_counts_each_decision_once(
    settings: ApiSettings, private_kafka: PrivateKafka, unique: str, catalog_file: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The decisions topic's broker killed under a running attribution consumer and started
    again on its data: the consumer keeps running, counts what follows, and the report
    counts each decision once across the offsets it is handed again."""
    ours = with_(settings, kafka_bootstrap=private_kafka.bootstrap)
    proc = _start_attribution(ours, unique, catalog_file, tmp_path / "attribution.log")
    try:
        async with client_for(ours) as client:
            for i in range(20):
                await client.get(f"/v1/slots/home_hero?session_id=k{i}")
            report = await _decisions_counted(client, "home_hero", 20, proc, 60)
            assert report["slots"]["home_hero"]["decisions"] == 20
        private_kafka.crash()
        await asyncio.sleep(5.0)
        assert proc.poll() is None, "attribution stopped with the broker"
        private_kafka.stack("up", "kafka")
        async with client_for(ours) as client:
            for i in range(20, 40):
                await client.get(f"/v1/slots/home_hero?session_id=k{i}")
            report = await _decisions_counted(client, "home_hero", 40, proc, 120)
            await asyncio.sleep(1.0)  # anything doubled would show up now
            report = await _decisions_counted(client, "home_hero", 41, proc, 0)
        assert report["slots"]["home_hero"]["decisions"] == 40
        assert proc.poll() is None
    finally:
        stop_group(proc)


@pytest.mark.integration
async def test_an_overlapping_redelivery_counts_each_exposure_once(
    attributor: Attributor, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    now = int(time.time() * 1000) - 60_000
    records = [(i, _exposure(f"o{i}", 0, "treatment", now, ["sku-000001"])) for i in range(30)]
    assert await attributor.apply("decisions", 0, records[:20])
    # after a crash before the consumer's commit: redelivered from offset 10, with more
    assert await attributor.apply("decisions", 0, records[10:])
    assert not await attributor.apply("decisions", 0, records[5:25])
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert report["slots"]["home_recs"]["decisions"] == 30


@pytest.mark.integration
async def test_malformed_exposures_are_skipped_and_the_rest_counted(
    attributor: Attributor, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """The decisions topic takes any producer's messages: one of a wrong shape is skipped
    (or what of it is usable counted), never stops the report."""
    now = int(time.time() * 1000) - 60_000
    good = orjson.loads(_exposure("g", 0, "treatment", now, ["sku-000001"]))
    bad: list[Any] = [
        {**good, "items": 5}, {**good, "rules": 7}, {**good, "rules": {"r": 1}},
        {**good, "banner": ["b"]}, {**good, "items": [1, None, {"a": 1}]},
        {**good, "ts": "soon"}, {**good, "ts": 1e300}, {**good, "session_id": {"a": 1}},
        {**good, "session_id": ""}, {**good, "fallback_reason": 3}, [good], "text", None,
    ]  # fmt: skip
    records = [(i, orjson.dumps({**b, "decision_id": f"bad-{i}"}) if isinstance(b, dict)
                else orjson.dumps(b)) for i, b in enumerate(bad)]  # fmt: skip
    records += [(len(records), b"{not json"), (len(records) + 1, orjson.dumps(good))]
    assert await attributor.apply("decisions", 0, records)
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert 1 <= report["slots"]["home_recs"]["decisions"] <= 6


@pytest.mark.integration
async def test_report_keys_written_by_something_else_do_not_stop_attribution(
    attributor: Attributor, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """The fence, a minute's counters, an hour's visitors or a session's exposures of
    another type, or holding what is not a number or an exposure: the batch is counted
    (the key or field starts again) instead of failing on every redelivery."""
    now = int(time.time() * 1000) - 60_000
    p = key_prefix
    await redis_client.hset(f"{p}:{{report}}:fence", "decisions:0", "not-a-number")
    await redis_client.set(f"{p}:{{report}}:m:{now // 60_000}", "x")
    await redis_client.set(f"{p}:{{report}}:v:treatment:{now // 3_600_000}", "x")
    records = [(i, _exposure(f"w{i}", 0, "treatment", now, ["sku-000001"])) for i in range(3)]
    assert await attributor.apply("decisions", 0, records)
    await redis_client.set(f"{p}:{{report}}:fence", "x")  # the fence key of another type
    await redis_client.set(Keys(p).exposures("w3"), "x")
    more = [(3, _exposure("w3", 0, "treatment", now, ["sku-000001"]))]
    assert await attributor.apply("decisions", 0, more)
    clicked = "k|home_recs|personalized|treatment"
    await redis_client.hset(f"{p}:{{report}}:m:{now // 60_000}", clicked, "x")
    await redis_client.set(Keys(p).exposures("w1"), "x")
    await redis_client.hset(Keys(p).exposures("w2"), "i:sku-000001", "garbage")
    clicks = [(i, encode_event(Event(f"c{i}", EventType.CLICK, f"w{i}", now + 500,
                                     item_id="sku-000001"))) for i in range(4)]  # fmt: skip
    assert await attributor.apply("clickstream", 0, clicks)
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert report["slots"]["home_recs"]["decisions"] == 4
    batches = Batches(redis_client)
    try:
        totals, _, _ = await read_counters(batches.execute, p, Window(30, int(time.time() * 1000)))
    finally:
        await batches.aclose()
    assert totals[clicked] == 2  # w0's and w3's; w1's, w2's lost


@pytest.mark.integration
async def test_the_report_reads_past_keys_written_by_something_else(
    attributor: Attributor, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """A minute's counters or an hour's visitors of another type, or a counter that is not
    a number, count as none: the report shows the rest instead of failing."""
    now = int(time.time() * 1000) - 60_000
    p = key_prefix
    records = [(i, _exposure(f"r{i}", 0, "treatment", now, ["sku-000001"])) for i in range(3)]
    assert await attributor.apply("decisions", 0, records)
    await redis_client.rpush(f"{p}:{{report}}:m:{now // 60_000 - 1}", "x")
    await redis_client.hset(f"{p}:{{report}}:m:{now // 60_000}", "x|home_recs|x|treatment", "many")
    await redis_client.set(f"{p}:{{report}}:vp:{now // 3_600_000}", "x")
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert report["slots"]["home_recs"]["decisions"] == 3
    assert report["signal"] == {"visitors": 3, "personalized_visitor_share": 0.0}


@pytest.mark.integration
async def test_exposures_of_a_recreated_decisions_topic_are_counted(
    stack: Stack, redis_client: aioredis.Redis, key_prefix: str, catalog: Catalog,
    tmp_path: Path, topic_factory: Any, kafka_admin: Any,
) -> None:  # fmt: skip
    """A decisions topic deleted and created again numbers its offsets from 0: the
    report's fences of the old one must not skip its exposures; redeliveries within one
    still count once. The topic's id is read from the real broker."""
    topic = await topic_factory("decisions")
    settings = Settings(key_prefix=key_prefix, decisions_topic=topic)
    now = int(time.time() * 1000) - 60_000
    records = [(i, _exposure(f"a{i}", 0, "treatment", now, ["sku-000001"])) for i in range(5)]
    before_tags = Attributor(settings, catalog, redis_client)
    assert await before_tags.apply(topic, 0, records[:3])
    identity = {topic: TopicIdentity(stack.kafka_bootstrap, topic)}
    attributor = Attributor(settings, catalog, redis_client, identity)
    assert await attributor.apply(topic, 0, records)  # a fence of before tags holds
    assert not await attributor.apply(topic, 0, records[2:])  # a redelivery
    await kafka_admin.delete_topics([topic])

    async def gone() -> bool:
        return topic not in await kafka_admin.list_topics()

    await wait_for(gone, 30, "the topic deleted")
    await kafka_admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    again = [(i, _exposure(f"b{i}", 0, "treatment", now, ["sku-000001"])) for i in range(3)]
    assert await attributor.apply(topic, 0, again)
    report = await _report(redis_client, key_prefix, _config(tmp_path, 0.05))
    assert report["slots"]["home_recs"]["decisions"] == 8


@pytest.mark.parametrize("minutes", ["0", "-3", "11521", "an hour"])
def test_the_report_command_refuses_a_window_it_cannot_read(minutes: str) -> None:
    """`python -m api report --minutes 0` ended in an IndexError traceback; it now takes
    what /admin/report?minutes= takes."""
    done = subprocess.run([sys.executable, "-m", "api", "report", "--minutes", minutes],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "argument --minutes:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_the_report_command_reads_the_window_it_was_given(stack: Stack, key_prefix: str) -> None:
    env = {**os.environ, "KAIROS_REDIS_URL": stack.redis_url, "KAIROS_KEY_PREFIX": key_prefix}
    argv = [sys.executable, "-m", "api", "report", "--minutes", "5", "--json"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["window"]["minutes"] == 5
