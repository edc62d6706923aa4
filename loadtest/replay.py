"""Replay: are the recommendations any good? Hit rate@k and MRR@k beside popularity.

    python -m loadtest replay --test test.csv [--train train.csv] [--k 10] [--api URL]
    python -m loadtest replay --generate log.csv [--sessions 300] [--anonymous]  # a sample

A recorded session log (CSV: session_id, item_id, timestamp in ms, optional type) goes
through the real pipeline in event-time order. The training log is streamed first (it warms
session state, co-visitation and trending; it is not scored). In the test log, at each
event after a session's first, the API is asked for the `recommendations` slot *before*
the event is revealed; the rank of the item the visitor really opened next is scored
(hit rate@k, MRR@k). Then the event is sent to Kafka, and the next question waits until
the session's state includes it. A popularity baseline (the k most opened items so far,
over the same events) is scored in the same run, on the same clicks.

The logs' items need not be in any catalog: items the catalog lacks are first registered
through the `catalog` topic as items without metadata (`{"item_id": …}`), and after the
training log the item embeddings are learned from its co-visitation (the learner's own
refresh, stream_engine/latent.py) and installed by the worker and the API before the test
log starts, so the latent block and co-visitation carry their recommendations.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from loadtest.http import Client, HttpError
from loadtest.traffic import Traffic
from stream_engine.catalog import LEARNED_DIMS, load_items
from stream_engine.catalog_updates import catalog_items_key, catalog_version_key
from stream_engine.kafka_security import PLAINTEXT, KafkaSecurity
from stream_engine.latent import refresh
from stream_engine.settings import Settings
from stream_engine.store import connect

OPENED = {"view", "click", "add_to_cart", "purchase"}


@dataclass(frozen=True, slots=True)
class Row:
    session_id: str
    item_id: str
    ts: int
    type: str = "view"


def read_log(path: Path) -> list[Row]:
    rows = []
    with path.open(newline="") as f:
        for n, rec in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append(Row(rec["session_id"], rec["item_id"], int(float(rec["timestamp"])),
                                rec.get("type") or "view"))  # fmt: skip
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    return sorted(rows, key=lambda r: r.ts)


def generate(
    path: Path, catalog: Path, sessions: int, seed: int = 5, anonymous: bool = False
) -> Path:
    """A realistic sample log (the suite's shoppers), timestamps over the last hour. With
    `anonymous`, item ids are renamed (x<number>) so that no catalog knows them."""
    items = load_items(catalog)
    rename = {it.item_id: f"x{n}" for n, it in enumerate(items)} if anonymous else {}
    # Session ids from the seed (sim-<seed>-<n>): a log written again with it is the same log.
    traffic = Traffic(items, active_sessions=sessions, tracked_share=0.0, seed=seed, run=str(seed))
    start = int(time.time() * 1000) - 3_600_000
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["session_id", "item_id", "timestamp", "type"])
        for n in range(sessions * 8):
            sid, value, _ = traffic.next_event()
            event = orjson.loads(value)
            item = rename.get(event["item_id"], event["item_id"])
            out.writerow([sid, item, start + n * 100, event["type"]])
    return path


@dataclass
class Scores:
    k: int
    questions: int = 0
    hits: int = 0
    reciprocal: float = 0.0

    def add(self, ranked: list[str], truth: str) -> None:
        self.questions += 1
        if truth in ranked[: self.k]:
            self.hits += 1
            self.reciprocal += 1.0 / (ranked.index(truth) + 1)

    def as_json(self) -> dict[str, Any]:
        n = self.questions or 1
        return {f"hit_rate@{self.k}": self.hits / n, f"mrr@{self.k}": self.reciprocal / n,
                "questions": self.questions}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Where the replay sends events and item registrations, and where the learner's
    co-visitation lives."""

    api_url: str
    bootstrap: str
    topic: str
    catalog_topic: str
    redis_url: str
    key_prefix: str
    security: KafkaSecurity = PLAINTEXT  # the deployment's KAIROS_KAFKA_*


class Replayer:
    def __init__(self, pipeline: Pipeline, known: set[str], k: int, learn: bool = True) -> None:
        self.pipeline = pipeline
        self.api = Client.for_url(pipeline.api_url)
        self.known, self.k, self.learns = known, k, learn
        self.popularity: Counter[str] = Counter()
        self.kairos, self.baseline = Scores(k), Scores(k)
        self.registered = 0
        self.latent_version = 0
        self.run = f"rp{int(time.time()) % 100_000}"

    def _event(self, row: Row, n: int) -> bytes:
        return orjson.dumps({"event_id": f"{self.run}-{n}", "type": row.type,
                             "session_id": f"{self.run}-{row.session_id}",
                             "item_id": row.item_id, "ts": row.ts})  # fmt: skip

    async def _ready(self) -> dict[str, Any]:
        response = await self.api.request("GET", "/readyz")
        body: dict[str, Any] = orjson.loads(response.body) if response.status == 200 else {}
        catalog: dict[str, Any] = body.get("catalog", {})
        return catalog

    async def _until(self, what: str, done: Any, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while not done(await self._ready()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not {what} within {within_s:.0f} s")
            await asyncio.sleep(0.2)

    async def register(self, producer: AIOKafkaProducer, rows: list[Row]) -> None:
        """Items the catalog lacks become items without metadata, before any event: sent to
        the catalog topic, waited for in the worker's Redis mirror, then in the API (its
        count of applied updates reaching the mirror's)."""
        new = sorted({r.item_id for r in rows} - self.known)
        if not new:
            return
        p = self.pipeline
        for item_id in new:
            await producer.send(p.catalog_topic, orjson.dumps({"item_id": item_id}),
                                key=item_id.encode())  # fmt: skip
        await producer.flush()
        self.registered = len(new)
        self.known |= set(new)
        redis = connect(p.redis_url, max_connections=2, timeout_s=10.0)
        try:
            deadline = time.monotonic() + 60.0
            while True:
                stored = await redis.hmget(catalog_items_key(p.key_prefix), new)
                if all(v is not None for v in stored):
                    break
                if time.monotonic() > deadline:
                    missing = sum(v is None for v in stored)
                    raise RuntimeError(
                        f"{missing} of {len(new)} new items never reached the catalog "
                        "mirror: is a worker following the topic?"
                    )
                await asyncio.sleep(0.2)
            applied = int(await redis.get(catalog_version_key(p.key_prefix)) or 0)
        finally:
            await redis.aclose()
        await self._until(f"apply catalog update {applied}",
                          lambda c: c.get("updates_applied", 0) >= applied)  # fmt: skip

    async def learn(self) -> None:
        """Learn embeddings from the training log's co-visitation now (rather than at the
        learner's next tick) and wait until the API, then the worker, use them."""
        p, s = self.pipeline, Settings()  # the learner's defaults: how many items, TTL
        redis = connect(p.redis_url, max_connections=2, timeout_s=30.0)
        try:
            model = await refresh(redis, p.key_prefix, LEARNED_DIMS, s.latent_max_items,
                                  ttl_ms=s.aggregate_ttl_s * 1000,
                                  covisit_half_life_ms=s.covisit_half_life_s * 1000)  # fmt: skip
        finally:
            await redis.aclose()
        if model is None:
            return
        self.latent_version = model.version
        await self._until(f"install latent model {model.version}",
                          lambda c: c.get("latent_version", 0) >= model.version)  # fmt: skip
        # workers look every KAIROS_LATENT_POLL_S (2 s) after a catalog poll (0.5 s)
        await asyncio.sleep(3.0)

    async def _ask(self, sid: str) -> list[str]:
        url = f"/v1/slots/recommendations?session_id={self.run}-{sid}&n={self.k}"
        response = await self.api.request("GET", url)
        body = orjson.loads(response.body) if response.status == 200 else {}
        return [i["item_id"] for i in body.get("items", [])]

    async def _applied(self, sid: str, sent_ms: float, within_s: float = 5.0) -> None:
        """Wait until the session's state was written after `sent_ms` (the decision's
        state_age_ms says when), so the next question sees this event."""
        deadline = time.monotonic() + within_s
        url = f"/v1/slots/recommendations?session_id={self.run}-{sid}&n=1"
        while time.monotonic() < deadline:
            response = await self.api.request("GET", url)
            if response.status == 200:
                age = orjson.loads(response.body)["state_age_ms"]
                if age is not None and time.time() * 1000 - age >= sent_ms:
                    return
            await asyncio.sleep(0.01)

    async def run_logs(self, train: list[Row], test: list[Row]) -> dict[str, Any]:
        producer = AIOKafkaProducer(bootstrap_servers=self.pipeline.bootstrap, linger_ms=0,
                                    **self.pipeline.security.aiokafka())  # fmt: skip
        await producer.start()
        topic = self.pipeline.topic
        started: dict[str, int] = defaultdict(int)
        try:
            await self.register(producer, train + test)
            for n, row in enumerate(train):
                key = f"{self.run}-{row.session_id}".encode()
                await producer.send(topic, self._event(row, n), key=key)
                self.popularity[row.item_id] += row.type in OPENED
            await producer.flush()
            await asyncio.sleep(2.0)  # let the worker take the training log in
            if train and self.learns:
                await self.learn()
            for n, row in enumerate(test, start=len(train)):
                if started[row.session_id] and row.type in OPENED:
                    self.kairos.add(await self._ask(row.session_id), row.item_id)
                    top = [i for i, _ in self.popularity.most_common(self.k + 20)]
                    self.baseline.add(top[: self.k], row.item_id)
                sent_ms = time.time() * 1000
                key = f"{self.run}-{row.session_id}".encode()
                await producer.send_and_wait(topic, self._event(row, n), key=key)
                started[row.session_id] += 1
                self.popularity[row.item_id] += row.type in OPENED
                await self._applied(row.session_id, sent_ms)
        except HttpError as exc:
            raise RuntimeError(f"the API stopped answering: {exc}") from None
        finally:
            await producer.stop()
            await self.api.aclose()
        return {"kairos": self.kairos.as_json(), "popularity": self.baseline.as_json(),
                "registered_items": self.registered, "latent_version": self.latent_version,
                "train_events": len(train), "test_events": len(test)}  # fmt: skip
