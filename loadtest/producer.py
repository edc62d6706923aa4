"""The clickstream producer of the load generators: aiokafka or librdkafka, linger 0.

A generator shares the machine with what it measures, so what it costs is taken from the
system under test. At 1,000 events/s aiokafka's producer used ~18% of a core (~180 µs of
Python per message: with linger 0 every message is a request of its own); librdkafka's
(confluent-kafka, already the `librdkafka` engine's client) ~7%, its sends made by a
thread in C (loadtest/JOURNAL.md, session 20). Either is open-loop: a send never waits for
the broker's answer, and failed deliveries are counted, not hidden.

Both partition a key with murmur2, as the Java client and aiokafka do, so a session's
events land on the partition every other producer of the clickstream (the API's beacon
collector, a tracker) puts them on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import confluent_kafka
from aiokafka import AIOKafkaProducer

from stream_engine.kafka_security import PLAINTEXT, KafkaSecurity

PRODUCERS = ("aiokafka", "librdkafka")


class EventProducer(Protocol):
    failed: int  # sends the broker never acknowledged

    async def start(self) -> None: ...

    async def send(self, topic: str, value: bytes, key: bytes) -> None: ...

    async def flush(self) -> None: ...  # until every send so far is acknowledged (or failed)

    async def stop(self) -> None: ...


def make_producer(kind: str, bootstrap: str, security: KafkaSecurity = PLAINTEXT) -> EventProducer:
    """`security`: TLS and SASL for a deployment's broker (the suite's `--bootstrap`)."""
    if kind == "aiokafka":
        return AiokafkaEvents(bootstrap, security)
    if kind == "librdkafka":
        return RdkafkaEvents(bootstrap, security)
    raise ValueError(f"unknown producer {kind!r}; expected one of {', '.join(PRODUCERS)}")


class AiokafkaEvents:
    def __init__(self, bootstrap: str, security: KafkaSecurity = PLAINTEXT) -> None:
        self.failed = 0
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0,
                                          **security.aiokafka())  # fmt: skip

    async def start(self) -> None:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # no "Unclosed AIOKafkaProducer" after the error
            raise

    async def send(self, topic: str, value: bytes, key: bytes) -> None:
        delivery = await self._producer.send(topic, value, key=key)
        delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            self.failed += 1

    async def flush(self) -> None:
        await self._producer.flush()

    async def stop(self) -> None:
        await self._producer.stop()  # sends what is still queued first


class RdkafkaEvents:
    """confluent-kafka's producer driven from the event loop: `produce` queues a message
    for librdkafka's threads and `poll(0)` runs the delivery reports that are due."""

    def __init__(
        self, bootstrap: str, security: KafkaSecurity = PLAINTEXT, flush_timeout_s: float = 10.0
    ) -> None:
        self.failed = 0
        self.flush_timeout_s = flush_timeout_s
        # Messages produced whose delivery report has not come back. len(producer) is not
        # that count: it also holds librdkafka's own requests waiting to go out (with no
        # broker, a metadata request made a test count 6 failures of 5 sends).
        self._unreported = 0
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap,
            "linger.ms": 0,
            "acks": 1,  # aiokafka's default: the leader has it
            "enable.idempotence": False,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            **security.librdkafka(),
        })  # fmt: skip

    async def start(self) -> None:
        # Connects and learns the cluster now, not on the first measured send.
        await asyncio.to_thread(self._producer.list_topics, timeout=10)

    async def send(self, topic: str, value: bytes, key: bytes) -> None:
        try:
            self._producer.produce(topic, value, key, on_delivery=self._delivered)
        except BufferError:  # librdkafka's queue is full: the broker is far behind or gone
            self.failed += 1
        else:
            self._unreported += 1
        self._producer.poll(0)

    def _delivered(self, err: Any, _msg: Any) -> None:
        self._unreported -= 1
        if err is not None:
            self.failed += 1

    async def flush(self) -> None:
        deadline = time.monotonic() + self.flush_timeout_s
        while self._unreported and time.monotonic() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        """Flush (up to flush_timeout_s), count what never arrived, close: librdkafka's
        threads end (an open producer keeps them, and keeps reconnecting)."""
        await self.flush()
        if self._unreported:
            self._producer.purge()  # each fails its delivery report now: counted there
            self._producer.poll(0)
        self.failed += self._unreported  # anything still unreported: never delivered
        self._unreported = 0
        await asyncio.to_thread(self._producer.close)
