"""The plain-aiokafka clickstream consumer (KAIROS_ENGINE=aiokafka).

Same contract as the faust agent — at-least-once, one consumer group, events of a session
in partition order, batches applied through Ingest with fenced writes — without faust's
per-message pipeline, which costs ~75 µs an event on this machine before any work is done
(see loadtest/JOURNAL.md). Batching is natural: `getmany` returns whatever has arrived, at
once, so a quiet stream is handled event by event and a busy one in large batches; there is
no fixed `within` wait. Offsets are committed only after the batch's state writes (and its
dead letters) are acknowledged. Partitions are applied concurrently in lanes (lanes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import CatalogFollower
from stream_engine.ingest import Ingest, redis_client
from stream_engine.lanes import Lanes
from stream_engine.looplag import LoopLag
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.topics import CONSUMER_METADATA_MAX_AGE_MS

log = logging.getLogger("kairos.consumer")
LAG_EVERY_S = 1.0


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lanes: Lanes, consumer: AIOKafkaConsumer) -> None:
        self.lanes = lanes
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Hand over cleanly: what we applied is committed before another worker takes over.
        await commit_applied(self.consumer, self.lanes.revoke(), self.lanes.ingest.commit_note)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", sorted(tp.partition for tp in assigned))


class ClickstreamConsumer:
    def __init__(self, settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.ingest = Ingest.of_worker(settings, catalog, metrics)
        self.lanes = Lanes(self.ingest, settings.lanes, settings.batch_max, settings.dlq_topic)
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self._last_lag = 0.0
        self._last_flush = 0.0
        self._last_commit = 0.0
        self._room = asyncio.Event()  # a lane took a batch from its queue

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
            isolation_level=s.isolation_level,
            metadata_max_age_ms=CONSUMER_METADATA_MAX_AGE_MS,
            **s.kafka.aiokafka(),
        )

    async def run(self) -> None:
        s = self.settings
        consumer = self._consumer()
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=0,
                                    **s.kafka.aiokafka())  # fmt: skip
        await producer.start()
        await consumer.start()
        consumer.subscribe([s.clickstream_topic], listener=_Revocations(self.lanes, consumer))
        log.info("consuming %s as group %s in %d lanes", s.clickstream_topic, s.consumer_group,
                 s.lanes)  # fmt: skip
        self.lanes.start(producer, self._room.set)
        try:
            while not self.stopping.is_set():
                await self._fetch(consumer)
                self.lanes.raise_failed()
                await self.commit(consumer)
                self._report_lag(consumer)
                if time.monotonic() - self._last_flush >= LAG_EVERY_S:
                    self._last_flush = time.monotonic()
                    await self.ingest.flush_report()
            # Finish what was fetched, then commit it: a clean stop leaves nothing to replay.
            await self.lanes.drain()
            await self.commit(consumer, force=True)
        finally:
            await self.lanes.aclose()
            await consumer.stop()
            await producer.stop()
            await self.ingest.aclose()

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        """Fetch for the partitions whose lane has room, and hand each partition's records
        to its lane. Asking for all partitions would not do: aiokafka returns one
        partition's buffer before the next, so one lane would fill while the other idled.
        When every lane is full, wait (briefly) for one to take a batch: fetching stops
        instead of memory growing."""
        assigned = consumer.assignment()
        ready = [tp for tp in assigned if self.lanes.lane_of(tp).has_room]
        if assigned and not ready:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._room.wait()
            self._room.clear()
            return
        # With a lane busy, wait only briefly for the others' partitions: the busy lane's
        # partitions are not asked for, and data arriving for them must not sit for 100 ms.
        partial = len(ready) < len(assigned)
        batch = await consumer.getmany(
            *(ready if partial else ()),
            timeout_ms=1 if partial else 100,
            max_records=self.settings.batch_max,
        )
        records = {tp: [_record(m) for m in msgs] for tp, msgs in batch.items()}
        self.lanes.put(self.lanes.generation, self.lanes.split(records))

    async def commit(self, consumer: AIOKafkaConsumer, force: bool = False) -> None:
        """Commit what is applied, at most every commit_interval_ms: a commit is a broker
        round trip, and per batch it would cost more than the batch at low rates."""
        now = time.monotonic()
        if not force and now - self._last_commit < self.settings.commit_interval_ms / 1000:
            return
        self._last_commit = now
        await commit_applied(consumer, self.lanes.take_applied(), self.ingest.commit_note)

    def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = now
        self.ingest.report_lag(
            {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
        )


async def commit_applied(
    consumer: AIOKafkaConsumer,
    offsets: dict[TopicPartition, int],
    note: Callable[[int], str] | None = None,
) -> None:
    """Commit offsets whose effects are already fenced in Redis, each with its partition's
    `note` if given (Ingest.commit_note). A commit refused because the group moved on (a
    rebalance, or a broker back from a crash that no longer knows this member) loses
    nothing: whoever owns the partition now replays from the last commit and the fences
    skip what was applied. Not a reason to stop the process."""
    if not offsets:
        return
    noted = {tp: OffsetAndMetadata(o, note(tp.partition) if note else "")
             for tp, o in offsets.items()}  # fmt: skip
    try:
        await consumer.commit(noted)
    except (CommitFailedError, IllegalStateError, KafkaError) as exc:
        log.warning("commit after rebalance failed (%s); the new owner will replay", exc)


def _record(m: Any) -> Record:
    return Record(
        partition=m.partition,
        offset=m.offset,
        key=m.key,
        value=m.value if m.value is not None else b"",
        timestamp_ms=m.timestamp if m.timestamp else int(time.time() * 1000),
    )


class Engine(Protocol):
    stopping: asyncio.Event
    ingest: Ingest

    async def run(self) -> None: ...


def run_forever(
    settings: Settings,
    catalog: Catalog,
    metrics: WorkerMetrics,
    engine: Callable[[Settings, Catalog, WorkerMetrics], Engine] = ClickstreamConsumer,
) -> None:
    """Run a plain consumer (this aiokafka one, or rdkafka_consumer's) and the catalog
    follower until SIGTERM or SIGINT, then finish the batches in hand and leave the group."""

    async def main() -> None:
        consumer = engine(settings, catalog, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stopping.set)
        redis = redis_client(settings)
        follower = CatalogFollower(settings, catalog, redis, metrics)
        follow = asyncio.create_task(follower.run(consumer.stopping))
        watch = asyncio.create_task(consumer.ingest.watch_pressure(redis, consumer.stopping))
        lag = asyncio.create_task(LoopLag(observe=metrics.loop_lag.observe).run())
        try:
            await consumer.run()
        finally:
            for task in (follow, watch, lag):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await redis.aclose()

    uvloop.run(main())
