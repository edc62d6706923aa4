"""Simulated shoppers for the demo: a modest, steady clickstream to Kafka, until stopped.

    python -m loadtest simulate [--rate 20] [--sessions 200] [--duration 0]

The same realistic shoppers as the benchmarks (Zipf popularity, a drifting category
affinity, a view → click → cart → purchase funnel), so trending, co-visitation and the
report have life in them while a person clicks around the demo storefront. Reads
KAIROS_KAFKA_BOOTSTRAP, KAIROS_CLICKSTREAM_TOPIC and the catalog the worker uses
(KAIROS_CATALOG_PATH, else the demo catalog in KAIROS_STACK_DIR). Kafka down: it waits and
retries, it doesn't exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import resolve_catalog_path

log = logging.getLogger("kairos.simulator")


async def run(rate: float, sessions: int, duration: float) -> int:
    """Sends `rate` events a second for `duration` seconds (0 = until stopped)."""
    env = os.environ
    catalog = resolve_catalog_path(env.get("KAIROS_CATALOG_PATH", ""),
                                   env.get("KAIROS_STACK_DIR", ".stack"))  # fmt: skip
    traffic = Traffic(load_items(catalog), active_sessions=sessions, tracked_share=0.0)
    topic = env.get("KAIROS_CLICKSTREAM_TOPIC", "clickstream")
    bootstrap = env.get("KAIROS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    sent = 0
    start = time.monotonic()
    while duration <= 0 or time.monotonic() - start < duration:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
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
        except (KafkaError, OSError) as exc:
            log.warning("kafka unavailable (%s); retrying in 2 s", exc)
            await asyncio.sleep(2)
        finally:
            await producer.stop()
    return sent
