"""The faust worker's consumer on the worker's own loop (real broker), and its wait for a
full stream buffer to drain."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP

from stream_engine.app import create_app
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.faust_transport import InLoopConsumerThread, KairosConsumer
from stream_engine.metrics import WorkerMetrics
from stream_engine.settings import Settings
from tests.conftest import Stack, TopicFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_the_faust_consumer_fetches_on_the_workers_loop_without_a_thread(
    stack: Stack, unique: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory("faust-loop", partitions=2)
    settings = Settings.from_env({
        "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "KAIROS_REDIS_URL": stack.redis_url,
        "KAIROS_CLICKSTREAM_TOPIC": topic,
        "KAIROS_CONSUMER_GROUP": f"kairos-test-{unique}",
    })  # fmt: skip
    app = create_app(settings, Catalog(generate(50)), WorkerMetrics())
    consumer = app.consumer
    assert isinstance(consumer, KairosConsumer)
    delegate = consumer._thread
    assert isinstance(delegate, InLoopConsumerThread)
    assert delegate.thread_loop is asyncio.get_running_loop()

    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await producer.start()
    try:
        for p in (0, 1):
            await producer.send_and_wait(topic, b"x", key=b"k", partition=p)
    finally:
        await producer.stop()

    threads = threading.active_count()
    await delegate.start()  # the aiokafka consumer, started in place
    try:
        assert threading.active_count() == threads
        # faust's delegated calls are awaited in place, on this loop
        marks = await delegate.highwaters(TP(topic, 0), TP(topic, 1))
        assert marks == {TP(topic, 0): 1, TP(topic, 1): 1}
    finally:
        await delegate.stop()
    assert delegate._consumer is not None
    assert delegate._consumer._closed


async def test_with_every_partition_held_back_the_consumer_looks_again_once_a_buffer_drains(
    unique: str,
) -> None:
    settings = Settings.from_env({"KAIROS_CONSUMER_GROUP": f"kairos-test-{unique}"})
    app = create_app(settings, Catalog(generate(50)), WorkerMetrics())
    consumer: Any = app.consumer
    consumer.resume_flow()
    tp = TP("clickstream", 0)
    held: set[TP] = set()
    consumer._get_active_partitions = lambda: set() if held else {tp}
    fetched: list[object] = []

    async def getmany(active_partitions: object, timeout: float) -> dict[TP, list[str]]:  # noqa: ASYNC109
        fetched.append(active_partitions)
        return {tp: ["record"]}

    consumer._getmany = getmany
    held.add(tp)
    waiting = asyncio.ensure_future(consumer._wait_next_records(30.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # nothing to fetch from: it waits (faust slept a second)
    assert fetched == []
    held.clear()
    consumer.on_buffer_drop(tp)
    records, active = await asyncio.wait_for(waiting, 0.5)  # faust: a 1 s sleep
    assert (records, active) == ({}, set())  # woken: the drain loop asks again at once
    assert await consumer._wait_next_records(30.0) == ({tp: ["record"]}, {tp})
    assert fetched == [{tp}]
