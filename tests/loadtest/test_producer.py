"""The load generators' producers on the real broker: everything sent arrives, a session
lands on the partition aiokafka would put it on, and what never arrives is counted."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadtest.producer import PRODUCERS, RdkafkaEvents, make_producer
from tests.conftest import Stack, TopicFactory, rdkafka_threads


async def _read_all(bootstrap: str, topic: str, partitions: int, n: int) -> dict[bytes, set[int]]:
    """Key -> the partitions its messages were found on, once n messages are read."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        found: dict[bytes, set[int]] = {}
        seen = 0
        async with asyncio.timeout(30):
            while seen < n:
                for tp, msgs in (await consumer.getmany(timeout_ms=500)).items():
                    for m in msgs:
                        assert m.key is not None
                        found.setdefault(m.key, set()).add(tp.partition)
                        seen += 1
        return found
    finally:
        await consumer.stop()


@pytest.mark.parametrize("kind", PRODUCERS)
async def test_every_send_arrives_and_keys_partition_like_aiokafka(
    stack: Stack, topic_factory: TopicFactory, kind: str
) -> None:
    # The same 50 keys through aiokafka (the reference: the API's beacon collector and the
    # stream's own tools use it) and through the producer under test, on two topics.
    reference, topic = await topic_factory("ref", partitions=4), await topic_factory(partitions=4)
    keys = [f"sess-{i}".encode() for i in range(50)]
    for producer_kind, name in (("aiokafka", reference), (kind, topic)):
        producer = make_producer(producer_kind, stack.kafka_bootstrap)
        await producer.start()
        for i in range(200):
            await producer.send(name, b"event %d" % i, keys[i % len(keys)])
        await producer.stop()
        assert producer.failed == 0
    expected = await _read_all(stack.kafka_bootstrap, reference, 4, 200)
    got = await _read_all(stack.kafka_bootstrap, topic, 4, 200)
    assert all(len(parts) == 1 for parts in got.values())  # a session stays on one partition
    assert got == expected
    assert len({p for parts in got.values() for p in parts}) > 1  # and keys do spread


async def test_sends_that_never_arrive_are_counted() -> None:
    threads = rdkafka_threads()
    producer = RdkafkaEvents("127.0.0.1:1", flush_timeout_s=0.3)  # nothing listens there
    for i in range(5):
        await producer.send("clickstream", b"event %d" % i, b"k")
    started = time.monotonic()
    await producer.stop()
    assert producer.failed == 5
    assert time.monotonic() - started < 3  # the flush's bound, then a close that waits for nothing
    assert rdkafka_threads() == threads  # closed: no thread left reconnecting


def test_an_unknown_producer_is_named() -> None:
    with pytest.raises(ValueError, match="unknown producer 'kafka-python'"):
        make_producer("kafka-python", "127.0.0.1:9092")
