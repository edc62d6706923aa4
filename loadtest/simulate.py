"""Simulated shoppers for the demo: a modest, steady clickstream to Kafka, until stopped.

    python -m loadtest simulate [--rate 20] [--sessions 200] [--duration 0]

The same realistic shoppers as the benchmarks (Zipf popularity, a drifting category
affinity, a view → click → cart → purchase funnel), so trending, co-visitation and the
report have life in them while a person clicks around the demo storefront. With
KAIROS_API_URL set, one event in four is also a page view: the shopper asks the API for
the home page's slots and sometimes clicks a recommended item, sending the decision id —
more often when the answer was personalized than when it was a default (a simulated
effect, so that the report's lift has something to show; it measures nothing real).
Reads KAIROS_KAFKA_BOOTSTRAP, KAIROS_CLICKSTREAM_TOPIC and the catalog the worker uses
(KAIROS_CATALOG_PATH, else the demo catalog in KAIROS_STACK_DIR). Kafka or the API down:
it waits and retries, it doesn't exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from loadtest.http import Client, HttpError
from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import resolve_catalog_path
from stream_engine.kafka_security import KafkaSecurity

log = logging.getLogger("kairos.simulator")
PAGE_VIEW_SHARE = 0.25
CLICK_PERSONALIZED = 0.12  # chance a shopper clicks a recommendation, by what they were shown
CLICK_DEFAULT = 0.07


async def page_view(
    api: Client, producer: AIOKafkaProducer, topic: str, sid: str, rng: random.Random
) -> None:
    """Ask for the home page; maybe click a recommended item, naming the decision."""
    body = orjson.dumps({"session_id": sid, "slots": ["home_hero", "home_recs"]})
    try:
        response = await api.request("POST", "/v1/decisions", body)
    except HttpError:
        return
    if response.status != 200:
        return
    recs = orjson.loads(response.body)["decisions"][1]
    personal = recs["strategy"] in ("personalized", "profile", "contextual")
    if not recs["items"] or rng.random() >= (CLICK_PERSONALIZED if personal else CLICK_DEFAULT):
        return
    item = rng.choice(recs["items"])["item_id"]
    event = {"event_id": f"{sid}-rec-{rng.getrandbits(32):x}", "type": "click",
             "session_id": sid, "item_id": item, "ts": int(time.time() * 1000),
             "decision_id": recs["decision_id"], "slot": "home_recs"}  # fmt: skip
    await producer.send(topic, orjson.dumps(event), key=sid.encode())


async def run(rate: float, sessions: int, duration: float) -> int:
    """Sends `rate` events a second for `duration` seconds (0 = until stopped)."""
    env = os.environ
    catalog = resolve_catalog_path(env.get("KAIROS_CATALOG_PATH", ""),
                                   env.get("KAIROS_STACK_DIR", ".stack"))  # fmt: skip
    traffic = Traffic(load_items(catalog), active_sessions=sessions, tracked_share=0.0)
    topic = env.get("KAIROS_CLICKSTREAM_TOPIC", "clickstream")
    bootstrap = env.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    security = KafkaSecurity.from_env(env)  # the deployment's KAIROS_KAFKA_*, as the worker's
    api_url = env.get("KAIROS_API_URL", "")
    api = Client.for_url(api_url) if api_url else None
    rng = random.Random()
    sent = 0
    start = time.monotonic()
    while duration <= 0 or time.monotonic() - start < duration:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0,
                                    **security.aiokafka())  # fmt: skip
        try:
            await producer.start()
            print(f"simulating {sessions} shoppers at {rate:g} events/s into {topic}",
                  flush=True)  # fmt: skip
            while duration <= 0 or time.monotonic() - start < duration:
                due = start + sent / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sid, value, _ = traffic.next_event()
                await producer.send(topic, value, key=sid.encode())
                sent += 1
                if api is not None and rng.random() < PAGE_VIEW_SHARE:
                    await page_view(api, producer, topic, sid, rng)
        except (KafkaError, OSError) as exc:
            log.warning("kafka unavailable (%s); retrying in 2 s", exc)
            await asyncio.sleep(2)
        finally:
            await producer.stop()
    if api is not None:
        await api.aclose()
    return sent
