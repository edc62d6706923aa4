"""The librdkafka clickstream consumer (KAIROS_ENGINE=librdkafka, confluent-kafka).

The same contract as the aiokafka loop in consumer.py — at-least-once, one consumer group,
events of a session in partition order, offsets committed only after the batch's state
writes and dead letters are acknowledged, partitions applied concurrently in lanes — with
the Kafka protocol in C. At 5,000 events/s a bare aiokafka consumer costs about a third of a
core on the 2-core box and librdkafka about a tenth, at the same delivery latency
(loadtest/JOURNAL.md), and on that box the worker competes for CPU with Redis, the broker
and the load generator.

librdkafka's consumer is not thread-safe and its `poll` blocks, so one thread owns it:
it polls, commits applied offsets and runs the rebalance callbacks. Batches reach the
event loop with `call_soon_threadsafe`. While any lane is full the thread stops taking
messages (librdkafka's prefetch queue is bounded, so memory is too) until a lane takes a
batch. Pausing only the full lane's partitions instead would spare the others a wait, but
librdkafka drops a paused partition's prefetched messages and fetches them again on
resume: at 10,000 events/s, pausing and resuming many times a second, the worker applied
~3,000 events/s with most of a core idle. librdkafka interleaves partitions in its queue
(one fetch response holds them all), so lanes fill evenly and rarely wait on each other.

One latency trap: `consume(n, timeout)` waits until it has n messages or the timeout has
passed, so at a steady rate every event waited about half the timeout (p50 51 ms with
100 ms). The thread blocks in `poll` for the first message and takes what else has
arrived with `consume(n, 0)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition as Partition
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from stream_engine.catalog import Catalog
from stream_engine.ingest import Ingest
from stream_engine.lanes import Batch, Lanes
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.topics import CONSUMER_METADATA_MAX_AGE_MS

log = logging.getLogger("kairos.rdkafka")
LAG_EVERY_S = 1.0
POLL_S = 0.1  # the longest a poll blocks: how soon the thread sees a stop or a commit due
PREFETCH_KB = 16384  # librdkafka's prefetch queue per partition (default 64 MiB)


class RdKafkaConsumer:
    def __init__(self, settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.ingest = Ingest.of_worker(settings, catalog, metrics)
        self.lanes = Lanes(self.ingest, settings.lanes, settings.batch_max, settings.dlq_topic)
        self.stopping = asyncio.Event()
        self._halt = threading.Event()  # tells the polling thread to return
        self._room = threading.Event()  # a lane took a batch from its queue
        self._failure: BaseException | None = None

    def _config(self) -> dict[str, Any]:
        s = self.settings
        session_ms = int(s.group_session_timeout_s * 1000)
        return {
            "bootstrap.servers": s.kafka_bootstrap,
            "group.id": s.consumer_group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(500, session_ms // 4),
            # aiokafka's assignor: workers of both engines can share one group
            "partition.assignment.strategy": "roundrobin",
            "fetch.min.bytes": s.fetch_min_bytes,
            "fetch.wait.max.ms": s.fetch_max_wait_ms,
            "isolation.level": s.isolation_level,
            "socket.nagle.disable": True,
            "queued.max.messages.kbytes": PREFETCH_KB,
            "topic.metadata.refresh.interval.ms": CONSUMER_METADATA_MAX_AGE_MS,
            "logger": log,
            "error_cb": _log_error,
            "on_commit": _log_commit_failure,
            **s.kafka.librdkafka(),
        }

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=0,
                                    **s.kafka.aiokafka())  # fmt: skip
        await producer.start()
        consumer = Consumer(self._config())
        consumer.subscribe([s.clickstream_topic], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_lost)  # fmt: skip
        log.info("consuming %s as group %s in %d lanes (librdkafka)", s.clickstream_topic,
                 s.consumer_group, s.lanes)  # fmt: skip
        self.lanes.start(producer, self._room.set)
        poller = threading.Thread(target=self._poll, args=(consumer, loop), name="kairos-poll")
        poller.start()
        try:
            await self._supervise()
            # Stop fetching, finish what was fetched, then commit it: a clean stop leaves
            # nothing to replay.
            self._halt.set()
            await asyncio.to_thread(poller.join)
            await self.lanes.drain()
            await asyncio.to_thread(commit_offsets, consumer, self.lanes.take_applied(),
                                    self.ingest.commit_note, False)  # fmt: skip
        finally:
            self._halt.set()
            await asyncio.to_thread(poller.join)
            await self.lanes.aclose()
            await asyncio.to_thread(consumer.close)  # leaves the group at once
            await producer.stop()
            await self.ingest.aclose()

    async def _supervise(self) -> None:
        last_flush = time.monotonic()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self.stopping.wait()
            if self._failure is not None:
                raise RuntimeError("the polling thread stopped") from self._failure
            self.lanes.raise_failed()
            if time.monotonic() - last_flush >= LAG_EVERY_S:
                last_flush = time.monotonic()
                await self.ingest.flush_report()

    # --------------------------------------------------------------- the polling thread

    def _poll(self, consumer: Consumer, loop: asyncio.AbstractEventLoop) -> None:
        last_commit = last_lag = time.monotonic()
        commit_s = self.settings.commit_interval_ms / 1000
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                if now - last_commit >= commit_s:
                    last_commit = now
                    commit_offsets(
                        consumer, self.lanes.take_applied(), self.ingest.commit_note, True
                    )
                if now - last_lag >= LAG_EVERY_S:
                    last_lag = now
                    loop.call_soon_threadsafe(self.ingest.report_lag, _highwaters(consumer))
                if not all(lane.has_room for lane in self.lanes.lanes):
                    self._room.wait(POLL_S)
                    self._room.clear()
                    continue
                first = consumer.poll(POLL_S)
                if first is None:
                    continue
                messages = [first, *consumer.consume(self.settings.batch_max - 1, 0)]
                batch = _batch(messages)
                if batch:
                    parts = self.lanes.split(batch)  # counted now: the loop queues them later
                    loop.call_soon_threadsafe(self.lanes.put, self.lanes.generation, parts)
        except BaseException as exc:
            self._failure = exc
            loop.call_soon_threadsafe(self.stopping.set)
            raise

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Hand over cleanly: what we applied is committed before another worker takes over.
        commit_offsets(consumer, self.lanes.revoke(), self.ingest.commit_note, False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group went on without us: our generation can no longer commit.
        dropped = self.lanes.revoke()
        log.warning("partitions lost; %d applied offsets left to the new owner", len(dropped))


def _batch(messages: list[Message]) -> Batch:
    batch: Batch = {}
    now_ms = int(time.time() * 1000)
    for m in messages:
        err = m.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            continue
        kind, ts = m.timestamp()
        offset = m.offset()
        if offset is None:  # only error events lack one
            continue
        tp = Partition(m.topic(), m.partition())
        batch.setdefault(tp, []).append(Record(
            partition=tp.partition,
            offset=offset,
            key=m.key(),
            value=m.value() or b"",
            timestamp_ms=ts if kind != TIMESTAMP_NOT_AVAILABLE and ts > 0 else now_ms,
        ))  # fmt: skip
    return batch


def commit_offsets(
    consumer: Consumer, offsets: dict[Partition, int], note: Callable[[int], str],
    asynchronous: bool,
) -> None:  # fmt: skip
    """Commit offsets, each with its partition's note (Ingest.commit_note)."""
    if not offsets:
        return
    listed = [TopicPartition(tp.topic, tp.partition, offset, metadata=note(tp.partition))
              for tp, offset in offsets.items()]  # fmt: skip
    try:
        if asynchronous:
            consumer.commit(offsets=listed, asynchronous=True)
        else:
            consumer.commit(offsets=listed, asynchronous=False)
    except KafkaException as exc:
        log.warning("commit failed (%s); whoever owns the partitions next will replay", exc)


def _highwaters(consumer: Consumer) -> dict[int, int | None]:
    """High watermarks from the last fetch responses (no broker round trip)."""
    highs: dict[int, int | None] = {}
    for tp in consumer.assignment():
        try:
            high = consumer.get_watermark_offsets(tp, cached=True)[1]
        except KafkaException:
            high = -1
        highs[tp.partition] = high if high >= 0 else None
    return highs


def _log_error(err: KafkaError) -> None:
    log.warning("kafka: %s", err)


def _log_commit_failure(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if err is not None:
        log.warning("commit failed (%s); whoever owns the partitions next will replay", err)
