"""The plain-aiokafka clickstream consumer (KAIROS_ENGINE=aiokafka).

Same contract as the faust agent — at-least-once, one consumer group, events of a session
in partition order, batches applied through Ingest with fenced writes — without faust's
per-message pipeline, which costs ~75 µs an event on this machine before any work is done
(see loadtest/README.md). Batching is natural: `getmany` returns whatever has arrived, at
once, so a quiet stream is handled event by event and a busy one in large batches; there is
no fixed `within` wait. Offsets are committed only after the batch's state writes (and its
dead letters) are acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import CatalogFollower
from stream_engine.ingest import Ingest, dead_letter_body, redis_client
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings

log = logging.getLogger("kairos.consumer")
LAG_EVERY_S = 1.0


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.generation = 0
        self.owner: ClickstreamConsumer | None = None
        self.consumer: AIOKafkaConsumer | None = None

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Hand over cleanly: what we applied is committed before another worker takes over.
        if self.owner is not None and self.consumer is not None:
            await self.owner.commit(self.consumer, force=True)
        self.generation += 1

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", sorted(tp.partition for tp in assigned))


class ClickstreamConsumer:
    def __init__(self, settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.ingest = Ingest(settings, catalog, metrics)
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self._listener = _Revocations()
        self._last_lag = 0.0
        self._last_flush = 0.0
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_commit = 0.0

    def _consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        session_ms = int(s.group_session_timeout_s * 1000)
        return AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.batch_max,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(500, session_ms // 4),
            fetch_min_bytes=s.fetch_min_bytes,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
        )

    async def run(self) -> None:
        s = self.settings
        consumer = self._consumer()
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=0)
        await producer.start()
        await consumer.start()
        self._listener.owner, self._listener.consumer = self, consumer
        consumer.subscribe([s.clickstream_topic], listener=self._listener)
        log.info("consuming %s as group %s", s.clickstream_topic, s.consumer_group)
        try:
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=100, max_records=s.batch_max)
                if batch:
                    await self._handle(consumer, producer, batch)
                else:
                    await self.commit(consumer)
                self._report_lag(consumer)
                if time.monotonic() - self._last_flush >= LAG_EVERY_S:
                    self._last_flush = time.monotonic()
                    await self.ingest.flush_report()
            await self.commit(consumer, force=True)
        finally:
            await consumer.stop()
            await producer.stop()
            await self.ingest.aclose()

    async def _handle(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[Any]],
    ) -> None:
        generation = self._listener.generation
        records = [_record(m) for msgs in batch.values() for m in msgs]
        outcome = await self.ingest.apply(records)
        if outcome.dead:
            sent = [
                await producer.send(self.settings.dlq_topic, dead_letter_body(d), key=d.record.key)
                for d in outcome.dead
            ]
            await asyncio.gather(*sent)  # dead letters are durable before we commit past them
        self.ingest.observe(outcome, records)
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batch.items()}
        if generation != self._listener.generation:
            # Partitions moved meanwhile; the new owner replays, fences make it a no-op.
            self._uncommitted.clear()
            return
        self._uncommitted.update(offsets)
        await self.commit(consumer)

    async def commit(self, consumer: AIOKafkaConsumer, force: bool = False) -> None:
        """Commit what is applied, at most every commit_interval_ms: a commit is a broker
        round trip, and per batch it would cost more than the batch at low rates."""
        now = time.monotonic()
        interval = self.settings.commit_interval_ms / 1000
        if not self._uncommitted or (not force and now - self._last_commit < interval):
            return
        offsets, self._uncommitted = self._uncommitted, {}
        self._last_commit = now
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning("commit after rebalance failed (%s); the new owner will replay", exc)

    def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = now
        self.ingest.report_lag(
            {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
        )


def _record(m: Any) -> Record:
    return Record(
        partition=m.partition,
        offset=m.offset,
        key=m.key,
        value=m.value if m.value is not None else b"",
        timestamp_ms=m.timestamp if m.timestamp else int(time.time() * 1000),
    )


def run_forever(settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> None:
    """Run until SIGTERM or SIGINT, then finish the batch in hand and leave the group."""

    async def main() -> None:
        consumer = ClickstreamConsumer(settings, catalog, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stopping.set)
        redis = redis_client(settings)
        follower = CatalogFollower(settings, catalog, redis, metrics)
        follow = asyncio.create_task(follower.run(consumer.stopping))
        try:
            await consumer.run()
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            await redis.aclose()

    uvloop.run(main())
