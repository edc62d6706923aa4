"""The faust application: one agent per domain, micro-batched, at-least-once, fenced writes.

Known faust traps this avoids (see ../shared/DESIGN.md): agent concurrency stays 1 (#606);
no exception escapes the agent (#604/#315): bad events are dead-lettered, Redis outages are
retried in place, so offsets are only committed for work that is done; no faust Tables;
`within` stays in milliseconds (#162).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust

from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import CatalogFollower
from stream_engine.faust_transport import Handoff, KairosApp, KairosConsumer
from stream_engine.heap import freeze_startup_heap
from stream_engine.ingest import MAX_BACKOFF_S, Ingest, dead_letter_body, redis_client
from stream_engine.looplag import LoopLag
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings
from stream_engine.topics import CONSUMER_METADATA_MAX_AGE_MS


def create_app(settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> faust.App:
    app = KairosApp(
        settings.consumer_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=settings.kafka.faust(),
        processing_guarantee="at_least_once",
        store="memory://",
        topic_partitions=settings.partitions,
        producer_linger=0.0,
        consumer_auto_offset_reset="earliest",
        consumer_metadata_max_age_ms=CONSUMER_METADATA_MAX_AGE_MS,
        web_enabled=False,
        stream_wait_empty=False,
        # No leader-election topic (we have no on_leader tasks). It was subscribed, always
        # empty, and in every fetch: when the clickstream's partitions all still held
        # fetched records, aiokafka sent a fetch for it alone, which the broker held for
        # faust's fetch_max_wait_ms (1,500), and no fetch for the clickstream could start
        # until it came back. At 5,000 events/s the worker went ~1.5 s at a time without
        # events and fell behind with half a core idle (loadtest/JOURNAL.md, session 15).
        topic_disable_leader=True,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.group_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.group_session_timeout_s / 4),
    )
    app.isolation_level = settings.isolation_level
    clickstream = app.topic(
        settings.clickstream_topic, key_serializer="raw", value_serializer="raw"
    )
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
    ingest = Ingest.of_worker(settings, catalog, metrics, shared_cache=True)

    @app.agent(clickstream, concurrency=1)
    async def clickstream_agent(stream: Any) -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info("faust agent running on the %s event loop", loop)
        ingest.rebalanced()  # the agent is started again by each rebalance

        consumer = cast(KairosConsumer, app.consumer)
        # The clickstream skips faust's per-event streams (faust_transport.Handoff); a
        # partition is held back from fetching once this many of its messages wait.
        handoff = consumer.handoff(settings.clickstream_topic, app.conf.stream_buffer_maxsize,
                                   metrics.handoff_wait.observe_many)  # fmt: skip

        async def apply(lane: int, messages: list[Any]) -> None:
            records = [_record(m) for m in messages]
            outcome = await ingest.apply(records, lane)
            for d in outcome.dead:
                await dlq.send(key=d.record.key, value=dead_letter_body(d))
            ingest.observe(outcome, records)
            for message in messages:  # committable once applied (and dead letters sent)
                consumer.ack(message)

        await PartitionLanes(handoff, settings, apply, metrics).run()

    @app.timer(1.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        consumer = app.consumer
        ingest.report_lag(
            {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()
             if tp.topic == settings.clickstream_topic}
        )  # fmt: skip
        await ingest.flush_report()

    @app.task  # type: ignore[untyped-decorator]
    async def freeze_heap() -> None:
        # faust, mode and aiokafka are imported and the app's services built by now: out of
        # the full collections' way (stream_engine/heap.py). Frozen before they were, each
        # full collection walked them: two of ~12 ms in a 20 s run at 1,000 events/s.
        freeze_startup_heap()

    @app.task  # type: ignore[untyped-decorator]
    async def watch_loop() -> None:
        await LoopLag(observe=metrics.loop_lag.observe).run()  # until the worker stops

    @app.task  # type: ignore[untyped-decorator]
    async def watch_pressure() -> None:
        redis = redis_client(settings)
        try:
            await ingest.watch_pressure(redis)  # until the worker stops (cancelled)
        finally:
            await redis.aclose()

    @app.task  # type: ignore[untyped-decorator]
    async def follow_catalog() -> None:
        redis = redis_client(settings)
        try:
            await CatalogFollower(settings, catalog, redis, metrics).run()
        finally:  # the worker stopping cancels this task: close what it opened
            await redis.aclose()

    app.kairos_ingest = ingest
    return app


# faust, mode and aiokafka log every rebalance step and request at INFO/DEBUG; the worker
# shows their warnings and errors, and its own lines at KAIROS_LOG_LEVEL.
LIBRARY_LOGGERS = ("faust", "mode", "aiokafka")
log = logging.getLogger("kairos.worker")


def make_worker(app: faust.App, settings: Settings) -> faust.Worker:
    """The faust worker, on the logging `stream_engine.logs.configure` set up.

    By default a faust Worker replaces the root logger's handlers with its own (colored text
    on stdout: KAIROS_LOG_FORMAT=json was lost), sends stdout and stderr into the log, and,
    for its terminal spinner, sets the root logger to DEBUG with a handler that takes every
    record: every debug call of aiokafka (several per fetch and per request) then built a
    LogRecord that no handler printed: ~8% of the worker's CPU at 1,000 events/s."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    worker = faust.Worker(app, quiet=True, override_logging=False, redirect_stdouts=False)
    worker.spinner = None
    log.info("consuming %s as group %s (faust)", settings.clickstream_topic,
             settings.consumer_group)  # fmt: skip
    return worker


class PartitionLanes:
    """The faust agent's batches, applied in up to `settings.lanes` parts at once.

    A partition's batches are applied one after another, other partitions' meanwhile: each
    part runs on a free lane and its partitions are `busy` until it is done, so a lane that
    finishes takes its next part at once (events of one session stay ordered: a session
    lives in one partition). Before, a batch's parts were all applied before the next batch
    was taken, and at 10,000 events/s the worker fell behind with a third of its core idle
    while the last part of each batch was written: on a backlog with the machine to itself
    it applied ~7,200 events/s at 79% of a core, and now ~13,300/s at 97% (`loadtest
    drain`, loadtest/JOURNAL.md, session 21). While a lane is busy, another starts
    only on `faust_split_from` messages or more: at 1,000 events/s a part of a few events
    would cost a round trip and the per-batch work for little (`split_batch`). A part that
    fails is retried in place (`_apply`)."""

    def __init__(
        self,
        handoff: Handoff,
        settings: Settings,
        apply: Callable[[int, list[Any]], Awaitable[None]],
        metrics: WorkerMetrics,
        retry_first_s: float = 0.1,
        retry_max_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.handoff = handoff
        self.settings = settings
        self.apply = apply
        self.metrics = metrics
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self.free = list(range(settings.lanes))
        self.busy: set[int] = set()  # partitions being applied
        self.running: set[asyncio.Task[None]] = set()
        self.lane_done = asyncio.Event()

    async def run(self) -> None:
        """Until cancelled (the worker stopping, or a rebalance restarting the agent)."""
        settings, free = self.settings, self.free
        within = settings.batch_within_ms / 1000
        try:
            while True:
                while not free:
                    self.lane_done.clear()
                    await self.lane_done.wait()
                batch = await self.handoff.take(
                    settings.batch_max, within, self.busy, settings.faust_split_from
                )
                for part in split_batch(batch, len(free), settings.faust_split_from):
                    partitions = {m.partition for m in part}
                    self.busy.update(partitions)
                    task = asyncio.create_task(self._apply(free.pop(), part, partitions))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
        finally:
            for task in self.running:
                task.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)

    async def _apply(self, lane: int, part: list[Any], partitions: set[int]) -> None:
        """Apply a part, retrying it in place until it lands. Ingest absorbs Redis
        outages itself; what else fails (the DLQ unreachable, a bug) is retried here, with
        the part's partitions held busy, so nothing after it in them is applied first.
        Failing the agent instead would have faust restart it with a new hand-off: later
        events of the same sessions applied first, and the failed ones, replayed after a
        restart, skipped by the fences as already applied."""
        delay = self.retry_first_s
        while True:
            try:
                await self.apply(lane, part)
                break
            except Exception:
                self.metrics.apply_failures.inc()
                log.exception("applying %d events of partition(s) %s failed; retrying in "
                              "%.1f s, nothing after them in those partitions meanwhile",
                              len(part), sorted(partitions), delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        self.busy.difference_update(partitions)
        self.free.append(lane)
        self.lane_done.set()
        self.handoff.poke()


def split_batch(messages: list[Any], lanes: int, split_from: int) -> list[list[Any]]:
    """A faust batch as the parts to apply at once: by partition (partition % lanes) when
    it holds `split_from` messages or more, else whole.

    Under a backlog a 500-event batch was planned, then written while the worker waited
    ~30 ms for Redis with its next batch already buffered and nothing else to do, and the
    worker fell behind at 5,000 events/s with a third of its main thread idle. In parts,
    one part is planned while the part before it is written. Parts hold disjoint partitions,
    hence disjoint sessions and per-partition aggregate fences, and none of their partitions
    is taken again until its part is applied (PartitionLanes), so a session's events stay
    in order. A small batch stays whole: each part costs a round trip and the per-batch
    work (~0.3 ms of CPU), which at 1,000 events/s is most of what the worker does."""
    if lanes == 1 or len(messages) < split_from:
        return [messages]
    parts: dict[int, list[Any]] = {}
    for message in messages:
        parts.setdefault(message.partition % lanes, []).append(message)
    return list(parts.values())


def _record(message: Any) -> Record:
    ts = message.timestamp
    return Record(
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value if message.value is not None else b"",
        timestamp_ms=int(ts * 1000) if ts else int(time.time() * 1000),
    )
