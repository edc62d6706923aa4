"""The publisher (api/publisher.py) on the real broker: keyed messages land where the Java
client's (and aiokafka's) default partitioner puts them, so a session's beacon events go
to its tracker's partition; without Kafka an offer neither blocks nor loses count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from api.publisher import Publisher
from tests.conftest import Stack, free_port, rdkafka_threads, wait_for

pytestmark = pytest.mark.integration

Drops = list[tuple[str, str, int]]


@pytest.fixture
async def topic(kafka_admin: AIOKafkaAdminClient, unique: str) -> AsyncIterator[str]:
    name = f"publisher.{unique}"
    await kafka_admin.create_topics([NewTopic(name, num_partitions=6, replication_factor=1)])
    yield name
    await kafka_admin.delete_topics([name])


async def test_keyed_messages_go_to_the_default_partitioners_partition(
    stack: Stack, topic: str
) -> None:
    drops: Drops = []
    publisher = Publisher(stack.kafka_bootstrap, 1000, lambda *d: drops.append(d), linger_ms=5)
    publisher.start()
    keys = [f"session-{i}".encode() for i in range(60)] + [b"", "sé".encode()]
    try:
        for i, key in enumerate(keys):
            assert publisher.offer(topic, key, b'{"n": %d}' % i)
        await wait_for(lambda: publisher.connected, 10, "the publisher's statistics")
    finally:
        await publisher.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    got: dict[bytes, int] = {}
    try:
        async with asyncio.timeout(20):
            while len(got) < len(keys):
                for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                    got.update((m.key, tp.partition) for m in msgs)
    finally:
        await consumer.stop()
    partitions = list(range(6))
    expected = {k: DefaultPartitioner()(k, partitions, partitions) for k in keys}
    assert got == expected
    assert len(set(got.values())) == 6  # the keys spread: the check above means something
    assert drops == []


async def test_without_kafka_offers_return_at_once_and_every_loss_is_counted() -> None:
    drops: Drops = []
    dead = f"127.0.0.1:{free_port()}"
    threads = rdkafka_threads()
    publisher = Publisher(dead, 3, lambda *d: drops.append(d), linger_ms=0,
                          delivery_timeout_ms=500)  # fmt: skip
    publisher.start()
    try:
        started = time.perf_counter()
        offered = [publisher.offer("nowhere", b"k", b"v") for _ in range(5)]
        assert time.perf_counter() - started < 0.25  # never waits on Kafka (500 ms timeout)
        assert offered == [True, True, True, False, False]  # a queue of 3
        assert publisher.room() == 0
        assert drops == [("nowhere", "queue_full", 1)] * 2
        # the three queued are given up after their delivery timeout, and counted
        await wait_for(lambda: len(drops) == 5, 10, "delivery failures reported")
        assert drops[2:] == [("nowhere", "kafka_error", 1)] * 3
        assert not publisher.connected
        assert publisher.offer("nowhere", b"k", b"v")  # room again
    finally:
        started = time.perf_counter()
        await publisher.stop(grace_s=1.0)
    assert time.perf_counter() - started < 3.0
    assert rdkafka_threads() == threads  # librdkafka's threads ended with the producer
    assert not publisher.offer("nowhere", b"k", b"v")
    assert drops[-1] == ("nowhere", "stopped", 1)


async def test_stopping_with_messages_kafka_never_took_drops_them_in_bounded_time() -> None:
    drops: Drops = []
    threads = rdkafka_threads()
    publisher = Publisher(f"127.0.0.1:{free_port()}", 100, lambda *d: drops.append(d))
    publisher.start()  # the default delivery timeout: 30 s, longer than the grace
    for i in range(5):
        assert publisher.offer("nowhere", b"k%d" % i, b"v")
    started = time.perf_counter()
    await publisher.stop(grace_s=0.5)
    assert time.perf_counter() - started < 3.0
    assert drops == [("nowhere", "kafka_error", 1)] * 5
    assert rdkafka_threads() == threads
