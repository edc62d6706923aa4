"""faust's aiokafka transport, with its consumer on the worker's own event loop.

faust runs aiokafka in a thread of its own (`ThreadDelegateConsumer`) with a second event
loop, and every fetch crosses between the threads twice (`call_soon_threadsafe` one way,
the result the other way). With one agent and nothing blocking the loop, the thread buys
nothing and costs the worker CPU twice over: the crossings, and two threads' Python
contending for the GIL. At 1,000 events/s the consumer thread used 27% of a core and the
agent's thread 47% (loadtest/JOURNAL.md, session 16).

Here the same `AIOKafkaConsumerThread` (its rebalance listener, commits, seeks and fetch
bookkeeping unchanged) runs as an ordinary service on the worker's loop: the calls that
faust delegated to the thread are awaited in place, and rebalance callbacks call the
consumer directly. The drain loop also skips faust's per-message `wait_first` (two tasks,
two event waits and an `asyncio.wait` for every message) while the flow is not suspended,
and with every partition held back for a full buffer the consumer looks again as soon as
one drains rather than a second later; see `KairosConsumer`.

The clickstream itself skips faust's per-event delivery (`Handoff`): the drain loop hands
its messages to the agent in batches, in fetch order, instead of through the conductor,
the topic's channel queue and the stream (a decoded Event, a queue put and get, sensors
and an ack each). At 10,000 events/s that path was ~16% of the worker's samples, and at
1,000/s the worker used 5-14 points of a core more with it (loadtest/JOURNAL.md, session
20). faust still owns the group, the assignment, the fetching, the acks and the commits.

These are faust-streaming 0.15 internals; pyproject.toml pins faust-streaming below 0.16
so that a new minor release is checked before it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from typing import TYPE_CHECKING, Any, cast

import faust
from aiokafka.structs import OffsetAndMetadata
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service
from mode.utils.futures import maybe_async

if TYPE_CHECKING:
    from stream_engine.ingest import Ingest


class InLoopConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's aiokafka consumer "thread", started and stopped as a plain service on the
    worker's loop: its `thread_loop` is that loop and no thread is started."""

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, thread_loop=kwargs["loop"], **kwargs)

    async def start(self) -> None:
        self._thread_started.set()
        await Service._default_start(self)

    async def stop(self) -> None:
        # What ServiceThread's thread does once it is told to stop, in order: the
        # service's on_stop, then on_thread_stop (which stops the aiokafka consumer),
        # then its children, futures and exit stacks.
        if self._started.is_set() and not self._stopped.is_set():
            self._stopped.set()
            await self.on_stop()
            await self.on_thread_stop()
            await self._default_stop_children()
            await self._default_stop_futures()
            await self._default_stop_exit_stacks()
            await self.on_shutdown()
            self._shutdown.set()

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust reads committed records only in its exactly_once mode, which would also make
        # its producer transactional. aiokafka keeps the level until the consumer's start()
        # builds its fetcher (a test reads an aborted transaction through every engine).
        consumer._isolation_level = cast("KairosApp", self.app).isolation_level
        # faust commits with no metadata; the clickstream's commits carry the worker's note
        # of what it wrote to Redis (Ingest.commit_note: whoever applies a partition next
        # checks Redis against it).
        ingest = cast("KairosApp", self.app).kairos_ingest
        commit = consumer.commit

        async def noted(offsets: dict[Any, OffsetAndMetadata]) -> None:
            topic = ingest.settings.clickstream_topic
            await commit({tp: OffsetAndMetadata(om.offset, ingest.commit_note(tp.partition))
                          if tp.topic == topic else om for tp, om in offsets.items()})  # fmt: skip

        consumer.commit = noted
        return consumer

    def _stopped_set(self) -> None:
        self._stopped.set()

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def cast_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        await maybe_async(fun(*args, **kwargs))

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.consumer.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        await self.consumer.on_partitions_assigned(assigned, generation_id)


class Handoff:
    """One topic's messages, from the consumer's drain loop straight to its agent.

    The agent takes them in batches (`take`), each partition's in fetch order, and acks
    each once applied (`KairosConsumer.ack`: faust's commit bookkeeping, as a stream's ack
    would). A take can pass over partitions the agent is still applying (`busy`), so that
    a partition's batches are applied one after the other while other partitions' go
    ahead. A partition whose messages fill the hand-off to `high` is held back from
    fetching until the agent has taken it down to half (`on_buffer_full` /
    `on_buffer_drop`, as faust does for a full stream buffer). A rebalance clears it with
    faust's stream buffers (`app.flow_control.clear()`): the consumer then seeks every
    partition it keeps back to its committed offset, so whatever was waiting here is
    fetched again."""

    def __init__(
        self,
        consumer: KairosConsumer,
        topic: str,
        high: int,
        observe_wait: Callable[[list[float]], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.high = high
        self.queues: dict[int, deque[Any]] = {}  # by partition, taken from in turn
        # when each queued message was handed over (self.clock), in the same order
        self.arrived: dict[int, deque[float]] = {}
        # Gets each take's waits (taken - handed over, seconds): the part of freshness
        # spent behind the batches before (kairos_handoff_wait_seconds).
        self.observe_wait = observe_wait
        self.clock = time.monotonic
        self.count = 0
        self.ready = asyncio.Event()
        self.held: set[Any] = set()
        self.stream_seen = consumer.app.monitor.stream_inbound_time

    def put(self, message: Any) -> None:
        queue = self.queues.get(message.partition)
        if queue is None:
            queue = self.queues[message.partition] = deque()
            self.arrived[message.partition] = deque()
        queue.append(message)
        self.arrived[message.partition].append(self.clock())
        self.count += 1
        self.ready.set()
        if self.count >= self.high:
            # faust's own TP: a message's tp is aiokafka's, and faust asserts on the type
            tp = TP(message.topic, message.partition)
            if tp not in self.held:
                self.held.add(tp)
                self.consumer.on_buffer_full(tp)

    def waiting(self, busy: Container[int] = ()) -> int:
        """How many messages wait in partitions not in `busy`."""
        if not busy:
            return self.count
        return sum(len(q) for p, q in self.queues.items() if p not in busy)

    def poke(self) -> None:
        """Look again: what `busy` holds has changed."""
        self.ready.set()

    async def take(
        self, max_: int, within: float, busy: Container[int] = (), least_while_busy: int = 1
    ) -> list[Any]:
        """At most max_ messages of partitions not in `busy`, each partition's in order.

        Waits until there is one (or, while `busy` is not empty, `least_while_busy`;
        re-checked on `poke`), then up to `within` seconds for more (0: none)."""
        while self.waiting(busy) < (least_while_busy if busy else 1):
            self.ready.clear()
            await self.ready.wait()
        if within > 0 and self.waiting(busy) < max_:
            deadline = time.monotonic() + within
            while self.waiting(busy) < max_ and (left := deadline - time.monotonic()) > 0:
                self.ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), left)
        batch: list[Any] = []
        waits: list[float] = []
        now = self.clock()
        queues, arrived = self.queues, self.arrived
        for partition in list(queues):
            if partition in busy:
                continue
            queue = queues.pop(partition)  # back in at the end: the next take starts after
            times = arrived.pop(partition)
            n = min(max_ - len(batch), len(queue))
            batch.extend(queue.popleft() for _ in range(n))
            waits.extend(now - times.popleft() for _ in range(n))
            if queue:
                queues[partition] = queue
                arrived[partition] = times
            # faust's "stream stalled" check reads this (a sensor set it, before)
            self.stream_seen[TP(self.topic, partition)] = now
            if len(batch) == max_:
                break
        self.count -= len(batch)
        if self.held and self.count <= self.high // 2:
            self._release_held()
        if self.observe_wait is not None:
            self.observe_wait(waits)
        return batch

    def clear(self) -> None:
        self.queues.clear()
        self.arrived.clear()
        self.count = 0
        self._release_held()

    def _release_held(self) -> None:
        """Let every partition held back for a full hand-off fetch again."""
        held, self.held = self.held, set()
        for tp in held:
            self.consumer.on_buffer_drop(tp)


class KairosConsumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffer_dropped = asyncio.Event()
        self.handoffs: dict[str, Handoff] = {}

    def handoff(
        self, topic: str, high: int, observe_wait: Callable[[list[float]], None] | None = None
    ) -> Handoff:
        """The topic's messages go to the returned Handoff, not through faust's streams."""
        if (old := self.handoffs.get(topic)) is not None:  # the agent restarted
            old.clear()
        handoff = self.handoffs[topic] = Handoff(self, topic, high, observe_wait)
        self.app.flow_control.manage_queue(handoff)  # type: ignore[arg-type]
        return handoff

    def _new_consumer_thread(self) -> InLoopConsumerThread:
        return InLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def on_buffer_drop(self, tp: Any) -> None:
        super().on_buffer_drop(tp)
        self._buffer_dropped.set()

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:  # noqa: ASYNC109
        """faust's, except when every partition is held back for a full stream buffer.

        faust then sleeps a whole second before it looks again, however soon the buffer
        drains: under a backlog the agent emptied its buffer in half of that and waited
        out the rest, and at 10,000 events/s the worker applied ~5,000/s with a fifth of
        its core idle (loadtest/JOURNAL.md, session 16). Here the wait ends as soon as a
        partition's buffer drops below its mark (or after `timeout`)."""
        if not self.flow_active:
            await self.wait(self.can_resume_flow.wait())
        try:
            self.not_waiting_next_records.set()
            active = self._get_active_partitions()
            if active:
                records = await self._getmany(active_partitions=active, timeout=timeout)
                return records, active
            self._buffer_dropped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._buffer_dropped.wait(), timeout)
            return {}, active
        finally:
            self.not_waiting_next_records.set()

    async def _drain_messages(self, fetcher: Any) -> None:  # noqa: C901
        """faust's drain loop (faust/transport/consumer.py, BSD licence), changed in one
        place: while the flow is not suspended, a message is handed to the conductor with a
        plain await.

        faust awaits each delivery through `wait_first(callback, suspend_flow.wait())`:
        two tasks, two event waits and an `asyncio.wait` for every message, ~10% of the
        worker's CPU at 1,000 events/s. It is there so that a delivery blocked on a full
        stream buffer gives way when a rebalance suspends the flow. But a revocation also
        clears the stream buffers, which cancels a waiting put, and stops the fetcher,
        which cancels this loop with whatever delivery it awaits; the rebalance waits for
        neither. So a plain await gives way just the same. Once the flow is suspended, a
        delivery still goes faust's way."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        suspended = self.suspend_flow.is_set
        handoffs = self.handoffs
        yield_every = 100
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                ait = cast(AsyncIterator[Any], getmany(timeout=1.0))
                await self.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in ait:
                    since_yield += 1
                    if since_yield > yield_every:
                        await asyncio.sleep(0)
                        since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # read already (faust logs these at its "dev" level)
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    handoff = handoffs.get(message.topic)
                    if handoff is not None:
                        if not suspended():  # else faust's way: dropped, fetched again
                            handoff.put(message)
                    elif suspended():
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    else:
                        await cast(Callable[[Any], Awaitable[None]], callback)(message)
                    set_read_offset(tp, offset)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise


class KairosTransport(faust_aiokafka.Transport):
    Consumer = KairosConsumer


class KairosApp(faust.App):
    """A faust App on the transport above; the broker URL stays kafka://."""

    isolation_level: str  # of the worker's consumer (Settings.isolation_level; create_app)
    kairos_ingest: Ingest  # what applies the clickstream (create_app)

    def _new_transport(self) -> Any:
        return KairosTransport(self.conf.broker_consumer, self)
