"""The plain-aiokafka clickstream consumer (KAIROS_ENGINE=aiokafka).

Same contract as the faust agent — at-least-once, one consumer group, events of a session
in partition order, batches applied through Ingest with fenced writes — without faust's
per-message pipeline, which costs ~75 µs an event on this machine before any work is done
(see loadtest/README.md). Batching is natural: `getmany` returns whatever has arrived, at
once, so a quiet stream is handled event by event and a busy one in large batches; there is
no fixed `within` wait. Offsets are committed only after the batch's state writes (and its
dead letters) are acknowledged.

Lanes: partition p is applied by lane p % KAIROS_LANES, each lane one batch at a time with
its own Redis connection and session cache, so while one lane waits for Redis (about half
of a batch's time under load) another plans its batch. Lanes own disjoint partitions, hence
disjoint sessions: lanes are like several workers in one process without more group
members, and the fences and per-partition aggregate writes that make several workers safe
make lanes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
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
        self.ingest = Ingest(settings, catalog, metrics, lanes=settings.lanes)
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self._listener = _Revocations()
        self._last_lag = 0.0
        self._last_flush = 0.0
        self._uncommitted: dict[TopicPartition, int] = {}
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
        )

    async def run(self) -> None:
        s = self.settings
        consumer = self._consumer()
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=0)
        await producer.start()
        await consumer.start()
        self._listener.owner, self._listener.consumer = self, consumer
        consumer.subscribe([s.clickstream_topic], listener=self._listener)
        log.info("consuming %s as group %s in %d lanes", s.clickstream_topic, s.consumer_group,
                 s.lanes)  # fmt: skip
        lanes = [_Lane(i, s.batch_max) for i in range(s.lanes)]
        for lane in lanes:
            lane.task = asyncio.create_task(self._run_lane(lane, producer))
        try:
            while not self.stopping.is_set():
                await self._fetch(consumer, lanes)
                _raise_failed(lanes)
                await self.commit(consumer)
                self._report_lag(consumer)
                if time.monotonic() - self._last_flush >= LAG_EVERY_S:
                    self._last_flush = time.monotonic()
                    await self.ingest.flush_report()
            # Finish what was fetched, then commit it: a clean stop leaves nothing to replay.
            while any(lane.pending for lane in lanes):
                _raise_failed(lanes)
                await asyncio.sleep(0.01)
            await self.commit(consumer, force=True)
        finally:
            for lane in lanes:
                if lane.task is not None:
                    lane.task.cancel()
            await asyncio.gather(*(ln.task for ln in lanes if ln.task), return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            await self.ingest.aclose()

    async def _fetch(self, consumer: AIOKafkaConsumer, lanes: list[_Lane]) -> None:
        """Fetch for the partitions whose lane has room, and hand each partition's records
        to its lane. Asking for all partitions would not do: aiokafka returns one
        partition's buffer before the next, so one lane would fill while the other idled.
        When every lane is full, wait (briefly) for one to take a batch: fetching stops
        instead of memory growing."""
        assigned = consumer.assignment()
        ready = [tp for tp in assigned if lanes[tp.partition % len(lanes)].has_room]
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
        generation = self._listener.generation
        split: dict[int, dict[TopicPartition, list[Any]]] = {}
        for tp, msgs in batch.items():
            split.setdefault(tp.partition % len(lanes), {})[tp] = msgs
        for index, part in split.items():
            # Only this loop fills the queues, so a lane holds less than batch_max records
            # plus one fetch.
            lanes[index].put(generation, part)

    async def _run_lane(self, lane: _Lane, producer: AIOKafkaProducer) -> None:
        while True:
            generation, batch = await lane.take()
            lane.busy = True
            self._room.set()
            try:
                if generation == self._listener.generation:
                    await self._handle(lane.index, producer, batch, generation)
                # else: fetched before a rebalance; whoever owns the partitions now replays
                # them from the committed offsets (fences make a replay of applied ones a no-op)
            finally:
                lane.busy = False

    async def _handle(
        self,
        lane: int,
        producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[Any]],
        generation: int,
    ) -> None:
        records = [_record(m) for msgs in batch.values() for m in msgs]
        outcome = await self.ingest.apply(records, lane)
        if outcome.dead:
            sent = [
                await producer.send(self.settings.dlq_topic, dead_letter_body(d), key=d.record.key)
                for d in outcome.dead
            ]
            await asyncio.gather(*sent)  # dead letters are durable before we commit past them
        self.ingest.observe(outcome, records)
        if generation != self._listener.generation:
            # Partitions moved meanwhile; the new owner replays, fences make it a no-op.
            return
        self._uncommitted.update({tp: msgs[-1].offset + 1 for tp, msgs in batch.items()})

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


class _Lane:
    """Batches of the partitions p with p % lanes == index, applied one at a time."""

    def __init__(self, index: int, depth: int) -> None:
        self.index = index
        self.depth = depth  # records queued before fetching for this lane waits
        self.queued = 0
        self.batches: deque[tuple[int, dict[TopicPartition, list[Any]]]] = deque()
        self._arrived = asyncio.Event()
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    @property
    def has_room(self) -> bool:
        return self.queued < self.depth

    @property
    def pending(self) -> bool:
        return self.busy or bool(self.batches)

    def put(self, generation: int, batch: dict[TopicPartition, list[Any]]) -> None:
        self.batches.append((generation, batch))
        self.queued += sum(len(msgs) for msgs in batch.values())
        self._arrived.set()

    async def take(self) -> tuple[int, dict[TopicPartition, list[Any]]]:
        """The oldest batch, with what queued behind it from the same generation: one
        larger batch costs less than two, and nothing waits behind it."""
        while not self.batches:
            self._arrived.clear()
            await self._arrived.wait()
        generation, batch = self.batches.popleft()
        while self.batches and self.batches[0][0] == generation:
            for tp, msgs in self.batches.popleft()[1].items():
                batch.setdefault(tp, []).extend(msgs)
        self.queued -= sum(len(msgs) for msgs in batch.values())
        return generation, batch


def _raise_failed(lanes: list[_Lane]) -> None:
    """A lane that died (an error Ingest does not absorb, e.g. the DLQ unreachable) stops
    the worker, as a failed batch did before lanes: the group hands its partitions on."""
    for lane in lanes:
        if lane.task is not None and lane.task.done():
            exc = lane.task.exception() if not lane.task.cancelled() else None
            raise RuntimeError(f"lane {lane.index} stopped") from exc


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
