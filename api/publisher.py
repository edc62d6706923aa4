"""Asynchronous publishing to Kafka: decision exposures and collected beacon events.

The request path only ever calls `offer`, which hands the message to librdkafka's bounded
queue (one C call) and returns at once. librdkafka's own threads, outside the GIL, batch
the messages per partition and send them; so the Kafka protocol's work runs beside the
event loop, not on it (with aiokafka it was ~3% of the API's CPU at 2,000 decisions/s:
a drain task, record batches built in Python, the sender's coroutines). When Kafka is
slow or down the queue fills and further messages are dropped and counted, never awaited;
a message librdkafka could not deliver in time is counted too. librdkafka (re)connects by
itself, so the API starts without Kafka.

Keys are partitioned with murmur2, as the Java client and aiokafka do, so a session's
beacon events land on the partition its tracker's events go to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import confluent_kafka
import orjson

from stream_engine.kafka_security import PLAINTEXT, KafkaSecurity

log = logging.getLogger("kairos.api.publisher")

POLL_EVERY_S = 0.05  # delivery failures, errors and statistics are served this often
DELIVERY_TIMEOUT_MS = 30_000  # a message not delivered by then is dropped and counted
MAX_QUEUE_KBYTES = 64 * 1024  # besides the message count: a bound on the memory held


class Publisher:
    def __init__(
        self,
        bootstrap: str,
        capacity: int,
        on_drop: Callable[[str, str, int], None],
        linger_ms: int = 5,
        delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS,
        security: KafkaSecurity = PLAINTEXT,
    ) -> None:
        self.capacity = capacity
        self.on_drop = on_drop  # (topic, why, count) -> None, for the metrics
        self.connected = False  # some broker is up (librdkafka's statistics, every second)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "acks": 1,  # the leader has it (aiokafka's default)
            "enable.idempotence": False,
            "partitioner": "murmur2_random",  # the Java client's partitioner for keys
            "queue.buffering.max.messages": capacity,
            "queue.buffering.max.kbytes": MAX_QUEUE_KBYTES,
            "message.timeout.ms": delivery_timeout_ms,
            "delivery.report.only.error": True,  # a report (a callback) per failure only
            "on_delivery": self._delivered,
            "error_cb": self._error,
            "statistics.interval.ms": 1000,
            "stats_cb": self._statistics,
            "logger": log,
            **security.librdkafka(),
        })  # fmt: skip

    def room(self) -> int:
        """How many more messages the queue takes now, at least: librdkafka's own requests
        and events waiting (metadata while no broker answers, log lines until the next
        poll) count against it too, so it errs low."""
        return max(0, self.capacity - len(self._producer))

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue a message; False (and counted) when the queue is full."""
        try:
            self._producer.produce(topic, value, key)
        except BufferError:
            self.on_drop(topic, "queue_full", 1)
            return False
        except RuntimeError:  # closed: the app is stopping
            self.on_drop(topic, "stopped", 1)
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kairos-publisher")

    async def stop(self, grace_s: float = 3.0) -> None:
        """Send what is queued (while Kafka answers, up to grace_s), count the rest as
        dropped, and close the producer: its threads end (a producer left open keeps them,
        and a close with messages left waits for their delivery timeout)."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        left = await asyncio.to_thread(self._producer.flush, grace_s)
        if left:
            log.warning("stopping with %d messages for Kafka not sent; dropped", left)
            self._producer.purge()  # each fails with a delivery report: counted
        self._producer.poll(0)  # the reports of what failed meanwhile
        await asyncio.to_thread(self._producer.close)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), POLL_EVERY_S)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.on_drop(msg.topic(), "kafka_error", 1)

    def _error(self, err: Any) -> None:
        code = err.code()
        if code == confluent_kafka.KafkaError._ALL_BROKERS_DOWN:
            if self.connected:
                log.warning("kafka unavailable for publishing (%s); messages queue", err)
            self.connected = False
        elif code != confluent_kafka.KafkaError._TRANSPORT:  # each reconnect: librdkafka logs
            log.warning("kafka: %s", err)

    def _statistics(self, raw: str) -> None:
        brokers = orjson.loads(raw).get("brokers", {})
        self.connected = any(b.get("state") == "UP" for b in brokers.values())
