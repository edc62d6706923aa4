"""Replay: are the recommendations any good? Hit rate@k and MRR@k beside popularity.

    python -m loadtest replay --test test.csv [--train train.csv] [--k 10] [--api URL]
    python -m loadtest replay --generate log.csv [--sessions 300]     # a sample log

A recorded session log (CSV: session_id, item_id, timestamp in ms, optional type) goes
through the real pipeline in event-time order. The training log is streamed first (it warms
session state, co-visitation and trending; it is not scored). In the test log, at each
event after a session's first, the API is asked for the `recommendations` slot *before*
the event is revealed; the rank of the item the visitor really opened next is scored
(hit rate@k, MRR@k). Then the event is sent to Kafka, and the next question waits until
the session's state includes it. A popularity baseline (the k most opened items so far,
over the same events) is scored in the same run, on the same clicks.

Items absent from the catalog are counted and skipped: scoring them needs item vectors
learned from co-visitation, which the stream engine does not build yet.
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
from stream_engine.catalog import load_items

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


def generate(path: Path, catalog: Path, sessions: int, seed: int = 5) -> Path:
    """A realistic sample log (the suite's shoppers), timestamps over the last hour."""
    traffic = Traffic(load_items(catalog), active_sessions=sessions, tracked_share=0.0,
                      seed=seed)  # fmt: skip
    start = int(time.time() * 1000) - 3_600_000
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["session_id", "item_id", "timestamp", "type"])
        for n in range(sessions * 8):
            sid, value, _ = traffic.next_event()
            event = orjson.loads(value)
            out.writerow([sid, event["item_id"], start + n * 100, event["type"]])
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


class Replayer:
    def __init__(self, api_url: str, bootstrap: str, topic: str, known: set[str], k: int) -> None:
        self.api = Client.for_url(api_url)
        self.bootstrap, self.topic, self.known, self.k = bootstrap, topic, known, k
        self.popularity: Counter[str] = Counter()
        self.kairos, self.baseline = Scores(k), Scores(k)
        self.unknown = 0
        self.run = f"rp{int(time.time()) % 100_000}"

    def _event(self, row: Row, n: int) -> bytes:
        return orjson.dumps({"event_id": f"{self.run}-{n}", "type": row.type,
                             "session_id": f"{self.run}-{row.session_id}",
                             "item_id": row.item_id, "ts": row.ts})  # fmt: skip

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
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0)
        await producer.start()
        started: dict[str, int] = defaultdict(int)
        try:
            for n, row in enumerate(train):
                if row.item_id not in self.known:
                    self.unknown += 1
                    continue
                key = f"{self.run}-{row.session_id}".encode()
                await producer.send(self.topic, self._event(row, n), key=key)
                self.popularity[row.item_id] += row.type in OPENED
            await producer.flush()
            await asyncio.sleep(2.0)  # let the worker take the training log in
            for n, row in enumerate(test, start=len(train)):
                if row.item_id not in self.known:
                    self.unknown += 1
                    continue
                if started[row.session_id] and row.type in OPENED:
                    self.kairos.add(await self._ask(row.session_id), row.item_id)
                    top = [i for i, _ in self.popularity.most_common(self.k + 20)]
                    self.baseline.add(top[: self.k], row.item_id)
                sent_ms = time.time() * 1000
                key = f"{self.run}-{row.session_id}".encode()
                await producer.send_and_wait(self.topic, self._event(row, n), key=key)
                started[row.session_id] += 1
                self.popularity[row.item_id] += row.type in OPENED
                await self._applied(row.session_id, sent_ms)
        except HttpError as exc:
            raise RuntimeError(f"the API stopped answering: {exc}") from None
        finally:
            await producer.stop()
            await self.api.aclose()
        return {"kairos": self.kairos.as_json(), "popularity": self.baseline.as_json(),
                "skipped_unknown_items": self.unknown, "train_events": len(train),
                "test_events": len(test)}  # fmt: skip
