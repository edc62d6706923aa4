"""The real broker and the real redis-server answer as the rest of Kairos expects."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.conftest import Stack, TopicFactory

pytestmark = pytest.mark.integration


async def test_kafka_produce_consume_keeps_per_key_order(
    stack: Stack, topic_factory: TopicFactory, unique: str
) -> None:
    topic = await topic_factory("roundtrip", partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await producer.start()
    try:
        for i in range(60):
            await producer.send(topic, key=f"s{i % 5}".encode(), value=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka_bootstrap,
        group_id=f"g-{unique}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    try:
        async with asyncio.timeout(30):
            while sum(map(len, seen.values())) < 60:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, msgs in batch.items():
                    for m in msgs:
                        assert m.key is not None
                        assert m.value is not None
                        seen[m.key].append(int(m.value))
                        partitions[m.key].add(tp.partition)
    finally:
        await consumer.stop()
    assert sorted(seen) == [f"s{k}".encode() for k in range(5)]
    for key, values in seen.items():
        assert values == sorted(values), f"{key!r} out of order"
        assert len(partitions[key]) == 1
    assert len({p for ps in partitions.values() for p in ps}) > 1


async def test_redis_write_read_with_ttl(redis_client: aioredis.Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:{{s1}}:vec"
    payload = bytes(range(256))
    async with redis_client.pipeline(transaction=True) as pipe:
        pipe.set(key, payload, px=60_000)
        pipe.get(key)
        pipe.pttl(key)
        ok, value, ttl = await pipe.execute()
    assert ok is True
    assert value == payload
    assert 0 < ttl <= 60_000
