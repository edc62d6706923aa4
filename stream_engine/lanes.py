"""Lanes: the partitions a worker owns, applied concurrently, whichever client fetches them.

Partition p is applied by lane p % KAIROS_LANES, each lane one batch at a time with its own
Redis connection and session cache, so while one lane waits for Redis (about half of a
batch's time under load) another plans its batch. Lanes own disjoint partitions, hence
disjoint sessions: lanes are like several workers in one process without more group
members, and the fences and per-partition aggregate writes that make several workers safe
make lanes safe.

`Lanes` is the part both plain consumers share (the aiokafka loop in consumer.py and the
librdkafka one in rdkafka_consumer.py): batches go in tagged with the rebalance generation
they were fetched in, are applied through Ingest (dead letters made durable first), and
their offsets become committable only if no rebalance happened meanwhile. The bookkeeping
is locked because the librdkafka client revokes partitions from its polling thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, TopicPartition

from stream_engine.ingest import Ingest, dead_letter_body
from stream_engine.processor import Record

Batch = dict[TopicPartition, list[Record]]  # records of each partition, in offset order


class Lane:
    """Batches of the partitions p with p % lanes == index, applied one at a time.

    Records are counted in when the fetching side hands them over (`reserve`, possibly on
    another thread, before the batch reaches the loop) and out when the lane takes them:
    each counter has one writer, so the librdkafka thread sees a lane's depth without a
    lock and without missing batches still on their way to the loop."""

    def __init__(self, index: int, depth: int) -> None:
        self.index = index
        self.depth = depth  # records queued before fetching for this lane waits
        self.reserved = 0  # records handed over, ever (the fetching side writes it)
        self.taken = 0  # records taken to apply, ever (the lane writes it)
        self.batches: deque[tuple[int, Batch]] = deque()
        self._arrived = asyncio.Event()
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return self.reserved - self.taken

    @property
    def has_room(self) -> bool:
        return self.queued < self.depth

    @property
    def pending(self) -> bool:
        return self.busy or bool(self.batches)

    def reserve(self, batch: Batch) -> None:
        self.reserved += sum(len(records) for records in batch.values())

    def put(self, generation: int, batch: Batch) -> None:
        """Queue a batch already counted in by `reserve`."""
        self.batches.append((generation, batch))
        self._arrived.set()

    async def take(self) -> tuple[int, Batch]:
        """The oldest batch, with what queued behind it from the same generation up to the
        lane's depth (KAIROS_BATCH_MAX): one larger batch costs less than two, and no batch
        is larger than the setting says."""
        while not self.batches:
            self._arrived.clear()
            await self._arrived.wait()
        generation, batch = self.batches.popleft()
        size = sum(len(records) for records in batch.values())
        while self.batches and self.batches[0][0] == generation:
            more = sum(len(records) for records in self.batches[0][1].values())
            if size + more > self.depth:
                break
            for tp, records in self.batches.popleft()[1].items():
                batch.setdefault(tp, []).extend(records)
            size += more
        self.taken += size
        return generation, batch


class Lanes:
    """The lanes of one worker, the rebalance generation, and the applied offsets."""

    def __init__(self, ingest: Ingest, count: int, depth: int, dlq_topic: str) -> None:
        self.ingest = ingest
        self.dlq_topic = dlq_topic
        self.lanes = [Lane(i, depth) for i in range(count)]
        self.generation = 0
        self._lock = threading.Lock()
        self._applied: dict[TopicPartition, int] = {}  # next offset to commit, by partition

    def lane_of(self, tp: TopicPartition) -> Lane:
        partition: int = tp.partition
        return self.lanes[partition % len(self.lanes)]

    def start(self, producer: AIOKafkaProducer, on_room: Callable[[], None]) -> None:
        """Start one task per lane; on_room is called whenever a lane takes a batch."""
        for lane in self.lanes:
            lane.task = asyncio.create_task(self._run(lane, producer, on_room))

    def split(self, batch: Batch) -> dict[int, Batch]:
        """A fetched batch by lane index, counted in with each lane (`Lane.reserve`). Only
        the fetching side calls this, so a lane holds less than its depth plus one fetch."""
        parts: dict[int, Batch] = {}
        for tp, records in batch.items():
            parts.setdefault(tp.partition % len(self.lanes), {})[tp] = records
        for index, part in parts.items():
            self.lanes[index].reserve(part)
        return parts

    def put(self, generation: int, parts: dict[int, Batch]) -> None:
        """Queue the parts of a split batch on their lanes (on the event loop)."""
        for index, part in parts.items():
            self.lanes[index].put(generation, part)

    @property
    def pending(self) -> bool:
        return any(lane.pending for lane in self.lanes)

    def raise_failed(self) -> None:
        """A lane that died (an error Ingest does not absorb, e.g. the DLQ unreachable)
        stops the worker, as a failed batch did before lanes: the group hands its
        partitions on."""
        for lane in self.lanes:
            if lane.task is not None and lane.task.done():
                exc = lane.task.exception() if not lane.task.cancelled() else None
                raise RuntimeError(f"lane {lane.index} stopped") from exc

    async def drain(self) -> None:
        """Wait until everything handed to the lanes is applied (or a lane has died)."""
        await asyncio.sleep(0)
        while self.pending:
            self.raise_failed()
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        tasks = [lane.task for lane in self.lanes if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def take_applied(self) -> dict[TopicPartition, int]:
        """The offsets applied since the last call, to commit."""
        with self._lock:
            applied, self._applied = self._applied, {}
        return applied

    def revoke(self) -> dict[TopicPartition, int]:
        """A rebalance: what was applied (commit it before handing over), and a new
        generation, so that batches fetched before it are neither applied nor committed
        (whoever owns the partitions now replays them; fences make that a no-op)."""
        with self._lock:
            applied, self._applied = self._applied, {}
            self.generation += 1
        self.ingest.rebalanced()
        return applied

    async def _run(
        self, lane: Lane, producer: AIOKafkaProducer, on_room: Callable[[], None]
    ) -> None:
        while True:
            generation, batch = await lane.take()
            lane.busy = True
            on_room()
            try:
                if generation == self.generation:
                    await self._apply(lane.index, producer, batch, generation)
            finally:
                lane.busy = False

    async def _apply(
        self, lane: int, producer: AIOKafkaProducer, batch: Batch, generation: int
    ) -> None:
        records = [r for part in batch.values() for r in part]
        outcome = await self.ingest.apply(records, lane)
        if outcome.dead:
            sent = [
                await producer.send(self.dlq_topic, dead_letter_body(d), key=d.record.key)
                for d in outcome.dead
            ]
            await asyncio.gather(*sent)  # dead letters are durable before we commit past them
        self.ingest.observe(outcome, records)
        with self._lock:
            # Partitions moved meanwhile: the new owner replays, fences make it a no-op.
            if generation == self.generation:
                self._applied.update({tp: part[-1].offset + 1 for tp, part in batch.items()})
