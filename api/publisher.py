"""Asynchronous publishing to Kafka: decision exposures and collected beacon events.

The request path only ever calls `offer`, which puts the message on a bounded queue and
returns at once; a background task drains it into an aiokafka producer. When Kafka is
slow or down the queue fills and further messages are dropped and counted, never
awaited. The producer (re)connects in the background, so the API starts without Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from api import _kernels

log = logging.getLogger("kairos.api.publisher")

Message = tuple[str, bytes, bytes]  # topic, key, value
MAX_BACKOFF_S = 5.0
MAX_DRAIN = 2000  # messages taken off the queue per produce round
_PARTITIONER = DefaultPartitioner()


def partition_of(key: bytes | None, partitions: list[int]) -> int:
    """Where aiokafka's (and the Java client's) default partitioner puts a key, so a
    session's events go to one partition whoever produced them; murmur2 compiled."""
    if key is None:
        return int(_PARTITIONER(key, partitions, partitions))
    return partitions[(_kernels.murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class Publisher:
    def __init__(
        self,
        bootstrap: str,
        capacity: int,
        on_drop: Callable[[str, str, int], None],
        linger_ms: int = 5,
    ) -> None:
        self.bootstrap = bootstrap
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=capacity)
        self.on_drop = on_drop  # (topic, why, count) -> None, for the metrics
        self.linger_ms = linger_ms
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def room(self) -> int:
        """How many more messages the queue takes now."""
        return self.queue.maxsize - self.queue.qsize()

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue a message; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait((topic, key, value))
        except asyncio.QueueFull:
            self.on_drop(topic, "queue_full", 1)
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kairos-publisher")

    async def stop(self, grace_s: float = 3.0) -> None:
        """Flush what is queued (while Kafka answers, up to grace_s), then close."""
        if self._task is None:
            return
        self._stopping.set()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # wakes the drain loop; a full queue drains anyway
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                linger_ms=0,  # we batch ourselves (see _drain)
                acks=1,
                request_timeout_ms=5000,
            )
            try:
                await producer.start()
                self.connected, delay = True, 0.1
                await self._drain(producer)
            except (KafkaError, OSError) as exc:
                log.warning("kafka unavailable for publishing (%s); retrying", exc)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await producer.stop()  # flushes what the producer holds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(2 * delay, MAX_BACKOFF_S)

    async def _drain(self, producer: AIOKafkaProducer) -> None:
        while True:
            first = await self.queue.get()
            messages: list[Message] = []
            stop = first is None
            if first is not None:
                messages.append(first)
            while not stop and len(messages) < MAX_DRAIN and not self.queue.empty():
                message = self.queue.get_nowait()
                if message is None:
                    stop = True
                else:
                    messages.append(message)
            if messages:
                await self._send(producer, messages)
            if stop:
                return
            if self.linger_ms:  # let the next batch gather: one produce request, not many
                await asyncio.sleep(self.linger_ms / 1000)

    async def _send(self, producer: AIOKafkaProducer, messages: list[Message]) -> None:
        """Build the record batches ourselves (one per partition, keyed like the default
        partitioner): aiokafka's send() costs tens of microseconds of Python per message."""
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], list[Any]] = {}
        for topic, key, value in messages:
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            parts = partitions[topic]
            tp = (topic, partition_of(key, parts))
            open_batches = batches.setdefault(tp, [producer.create_batch()])
            if open_batches[-1].append(key=key, value=value, timestamp=None) is None:
                open_batches.append(producer.create_batch())  # full: start another
                open_batches[-1].append(key=key, value=value, timestamp=None)
        for (topic, partition), built in batches.items():
            for batch in built:
                count = batch.record_count()
                try:
                    fut = await producer.send_batch(batch, topic, partition=partition)
                except KafkaError as exc:
                    self.on_drop(topic, "kafka_error", count)
                    log.warning("dropped %d messages for %s: %s", count, topic, exc)
                    continue
                fut.add_done_callback(self._check(topic, count))

    def _check(self, topic: str, count: int) -> Callable[[asyncio.Future[object]], None]:
        def done(fut: asyncio.Future[object]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                self.on_drop(topic, "kafka_error", count)

        return done
