"""Applying clickstream batches, whichever consumer delivers them: state, DLQ, metrics.

Every consumer (the faust agent in app.py, the plain loops in consumer.py and
rdkafka_consumer.py) hands its batches to Ingest, so fencing, retries, dead-lettering and
metrics are one code path.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import ResponseError

from stream_engine.catalog import Catalog
from stream_engine.metrics import WorkerMetrics
from stream_engine.planning import Tuning
from stream_engine.pressure import WATCH_EVERY_S, WATCH_TIMEOUT_S, Governor, PressureWatch
from stream_engine.processor import (
    STORE_TIMEOUT_S,
    AggregateUpkeep,
    BatchProcessor,
    DeadLetter,
    Outcome,
    OwnerCache,
    Record,
    StoreRegressed,
    Ttls,
)
from stream_engine.settings import Settings
from stream_engine.state import FRESHNESS_FIELDS, FRESHNESS_MS, REPORT_TTL_MS, Keys, minute_key
from stream_engine.store import STORE_ERRORS, connect, store_unavailable
from stream_engine.topics import GroupNotes, Incarnation, TopicIdentity

log = logging.getLogger("kairos.worker")
MAX_BACKOFF_S = 2.0
# Commit notes (Ingest.commit_note): "kairos:1:<incarnation tag>:<written through>".
NOTE_PREFIX = "kairos:1:"
NOTE_ATTEMPTS = 4  # reads of a group's commit notes before going on unchecked (~1.4 s)


def tuning_of(settings: Settings) -> Tuning:
    return Tuning(
        session_half_life_ms=settings.session_half_life_s * 1000,
        user_half_life_ms=settings.user_half_life_s * 1000,
        covisit_half_life_ms=settings.covisit_half_life_s * 1000,
        trending_half_life_ms=settings.trending_half_life_s * 1000,
    )


def ttls_of(settings: Settings) -> Ttls:
    return Ttls(
        session_ms=settings.session_ttl_s * 1000,
        user_ms=settings.user_ttl_s * 1000,
        aggregate_ms=settings.aggregate_ttl_s * 1000,
        erasure_ms=settings.erasure_ttl_s * 1000,
    )


def redis_client(settings: Settings) -> aioredis.Redis:
    # The processor bounds each pipeline with its own deadline (STORE_TIMEOUT_S).
    return connect(settings.redis_url, max_connections=settings.redis_pool_size, timeout_s=None)


def dead_letter_body(d: DeadLetter) -> bytes:
    return orjson.dumps(
        {
            "reason": d.reason,
            "detail": d.detail,
            "partition": d.record.partition,
            "offset": d.record.offset,
            "raw": d.record.value.decode("utf-8", "replace"),
        }
    )


class Ingest:
    """State of the clickstream agent: the processor and what it reports."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        metrics: WorkerMetrics,
        lanes: int = 1,
        shared_cache: bool = False,
        topic_id: Callable[[], Awaitable[str | None]] | None = None,
        notes: Callable[[Iterable[int]], Awaitable[dict[int, str]]] | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        # One processor per lane (see lanes.py): each owns a Redis connection for its
        # batches and its share of the session cache. The faust agent's lanes share one
        # cache, since a partition is not always applied by the same lane there (app.py).
        self.lanes = lanes
        self._cache = OwnerCache(settings.session_cache_size) if shared_cache else None
        self._processors: dict[int, BatchProcessor] = {}
        self._upkeep = AggregateUpkeep(settings.aggregate_ttl_s * 1000)
        self._redis: aioredis.Redis | None = None
        # partition -> next offset to apply (for the consumer-lag gauge)
        self.positions: dict[int, int] = {}
        # minute -> freshness bucket -> events, flushed to the report's counters
        self._freshness: dict[int, Counter[str]] = {}
        self.governor = Governor(settings.yield_min_rate, enabled=settings.yield_to_api)
        # The fences are taken per incarnation of the clickstream topic (its id, from
        # topics.TopicIdentity; planning.is_new).
        self.incarnation = Incarnation(settings.clickstream_topic, topic_id)
        # partition -> the highest aggregates' fence the lanes wrote, or the group's last
        # commit says was written (StoreRegressed)
        self.written_through: dict[int, int] = {}
        # What the group committed with each partition's offset (topics.GroupNotes), read
        # before the partition's first batch since the start or the last rebalance.
        self._notes = notes
        self._noted: set[int] = set()
        # partition -> the offset a refill under way must reach (_refill), noted meanwhile
        self._refilling: dict[int, int] = {}
        self._emptied = 0  # the processors' emptied partitions counted in the metrics

    @classmethod
    def of_worker(
        cls,
        settings: Settings,
        catalog: Catalog,
        metrics: WorkerMetrics,
        shared_cache: bool = False,
    ) -> Ingest:
        """A worker's: in its lanes, fencing per incarnation of its clickstream topic."""
        topic_id = TopicIdentity(settings.kafka_bootstrap, settings.clickstream_topic,
                                 security=settings.kafka)  # fmt: skip
        notes = GroupNotes(settings.kafka_bootstrap, settings.consumer_group,
                           settings.clickstream_topic, security=settings.kafka)  # fmt: skip
        return cls(settings, catalog, metrics, lanes=settings.lanes, shared_cache=shared_cache,
                   topic_id=topic_id, notes=notes)  # fmt: skip

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    def processor(self, lane: int = 0) -> BatchProcessor:
        proc = self._processors.get(lane)
        if proc is None:
            proc = self._processors[lane] = BatchProcessor(
                self.redis,
                Keys(self.settings.key_prefix),
                self.catalog,
                tuning_of(self.settings),
                ttls_of(self.settings),
                cache_size=max(1, self.settings.session_cache_size // self.lanes),
                upkeep=self._upkeep,
                cache=self._cache,
                written_through=self.written_through,  # one record for the lanes
            )
            proc.adopt_incarnation(self.incarnation.tag)
        return proc

    async def aclose(self) -> None:
        for proc in self._processors.values():
            await proc.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def apply(self, records: Sequence[Record], lane: int = 0) -> Outcome:
        """Apply a batch; retry Redis outages in place (never skip), isolate poison events.
        Batches of one lane are applied one at a time; lanes own disjoint partitions.

        While the governor holds the worker to a rate (stream_engine/pressure.py), a batch
        goes in slices of what that rate allows at once, each admitted in turn: a 500-event
        batch let through whole after its wait holds Redis, and the API's reads behind it,
        for its whole write (~11 ms), however slow the average rate. Slices are in offset
        order, and each is fenced like any batch."""
        if await self.incarnation.follow((r.partition, r.offset) for r in records):
            for proc in self._processors.values():
                proc.adopt_incarnation(self.incarnation.tag)
        if self._notes is not None:
            await self.check_notes({r.partition for r in records})
        size = self.governor.slice()
        if size is None or len(records) <= size:
            await self.governor.admit(len(records))
            return await self._timed(records, lane)
        total = Outcome()
        for i in range(0, len(records), size):
            part = records[i : i + size]
            await self.governor.admit(len(part))
            _add(total, await self._timed(part, lane))
        return total

    def rebalanced(self) -> None:
        """The group rebalanced: partitions assigned again are read as new (their topic's
        id, and what the group committed with them). Safe from another thread."""
        self.incarnation.forget()
        self._noted = set()

    def commit_note(self, partition: int) -> str:
        """The metadata a commit of `partition` carries: the highest aggregates' fence
        written to Redis (and the topic's incarnation it was taken on), for whoever
        applies the partition next to check Redis against (check_notes). Safe from
        another thread (librdkafka's commits are made from its polling thread)."""
        through = max(self.written_through.get(partition, -1),
                      self._refilling.get(partition, -1))  # fmt: skip
        return "" if through < 0 else f"{NOTE_PREFIX}{self.incarnation.tag}:{through}"

    async def check_notes(self, partitions: set[int]) -> None:
        """Before a partition's first batch since the start or the last rebalance: what
        did the group's last commit say was written to Redis? A worker restarted, or the
        partition's new owner, would otherwise take Redis's fences as they are, and miss a
        Redis that lost writes meanwhile (a failover, a restart from older data): events
        the group committed past, their effects gone. Noted this way, the first read of
        the partition's fence finds it behind and the lost offsets are applied again
        (StoreRegressed, _refill). A commit without a note (another tool's, or an
        operator's offset reset, which skips a backlog on purpose) leaves Redis as it
        is. A group that can't be asked is logged and not checked: the stream goes on."""
        todo = partitions - self._noted
        if not todo:
            return
        assert self._notes is not None
        notes: dict[int, str] = {}
        delay = 0.2
        for attempt in range(NOTE_ATTEMPTS):
            try:
                notes = await self._notes(sorted(todo))
                break
            except KafkaError as exc:
                if attempt + 1 == NOTE_ATTEMPTS:
                    log.warning("partitions %s: could not read what the group committed "
                                "(%s); Redis is not checked against it", sorted(todo),
                                exc)  # fmt: skip
                    break
                await asyncio.sleep(delay)
                delay *= 2
        self._noted.update(todo)
        for p, note in notes.items():
            noted = read_note(note)
            if noted is None:
                if note.startswith(NOTE_PREFIX):
                    log.warning("partition %d: the group's commit note %r does not read; "
                                "Redis is not checked against it", p, note)  # fmt: skip
                continue  # none of ours
            if noted[0] != self.incarnation.tag:
                continue  # taken on another incarnation of the topic
            through = noted[1]
            if through > self.written_through.get(p, -1):
                log.info("partition %d: the group committed it with Redis written through "
                         "offset %d", p, through)  # fmt: skip
                self.written_through[p] = through

    async def _timed(self, records: Sequence[Record], lane: int) -> Outcome:
        # kairos_batch_apply_seconds: what a batch spends in the worker once it is let
        # through (planning, Redis round trips, retries); freshness minus this is Kafka's
        # delivery and the wait behind the batch before (docs/metrics.md).
        start = time.perf_counter()
        try:
            return await self._apply(records, lane)
        finally:
            self.metrics.apply_seconds.observe(time.perf_counter() - start)

    async def _apply(self, records: Sequence[Record], lane: int) -> Outcome:
        delay = 0.05
        while True:
            try:
                return await self.processor(lane).process(records)
            except StoreRegressed as gone:
                try:
                    await self._refill(gone, lane)
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning("partition %d: reading lost offsets again failed (%r); "
                                "retrying in %.2fs", gone.partition, exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            except Exception as exc:
                if store_unavailable(exc):
                    self.metrics.store_errors.inc()
                    log.warning("redis unavailable (%r); retrying batch in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                if len(records) == 1:
                    log.exception("event at %s/%s failed", records[0].partition, records[0].offset)
                    return _poisoned(records[0])
                log.exception("batch failed; retrying its events one at a time")
                return await self._one_by_one(records, lane)

    async def _refill(self, gone: StoreRegressed, lane: int) -> None:
        """Redis lost the effects of offsets gone.stored+1 .. gone.through of a partition
        that this worker had applied (and may have committed): read them from Kafka again
        and apply them, in order and in batches as they come, before the batch that found
        out. Their dead letters were sent the first time and are not sent again; what
        Redis kept, the fences skip. Kafka failing meanwhile raises: the caller retries,
        and finds the partition as far behind as the batches already applied left it."""
        p, first, last = gone.partition, gone.stored + 1, gone.through
        log.warning("partition %d: Redis lost the effects of offsets %d..%d (a failover, or "
                    "a restart from older data): applying them again from Kafka",
                    p, first, last)  # fmt: skip
        self.metrics.store_regressions.inc()
        # The refill's own writes set it again; until they reach `last`, commits (of
        # batches applied before) still note `last`: a worker that stops meanwhile leaves
        # the gap to be found by the next (check_notes).
        self.written_through.pop(p, None)
        outer = self._refilling.get(p)  # a refill that found Redis behind again
        self._refilling[p] = max(last, outer if outer is not None else -1)
        found = 0
        try:
            async for records in read_range(self.settings, p, first, last):
                await self._apply(records, lane)
                found += len(records)
                self.metrics.reapplied.inc(len(records))
        except BaseException:
            # what is still missing must be found missing again
            self.written_through[p] = max(last, self.written_through.get(p, -1))
            raise
        finally:
            if outer is None:
                del self._refilling[p]
            else:
                self._refilling[p] = outer
        if found < last - first + 1:
            log.warning("partition %d: %d of offsets %d..%d were still in Kafka (retention, "
                        "compaction, transaction markers: the rest cannot be applied "
                        "again)", p, found, first, last)  # fmt: skip

    async def _one_by_one(self, records: Sequence[Record], lane: int) -> Outcome:
        total = Outcome()
        for r in records:
            _add(total, await self._apply([r], lane))
        return total

    def observe(self, outcome: Outcome, records: Sequence[Record]) -> None:
        m = self.metrics
        for r in records:
            if r.offset >= self.positions.get(r.partition, 0):
                self.positions[r.partition] = r.offset + 1
        m.batch_size.observe(len(records))
        written = outcome.written_at_ms or int(time.time() * 1000)
        by_type = Counter(p.event.type.value for p in outcome.valid)
        for etype, n in by_type.items():
            m.events.labels(etype, "ok").inc(n)
        minute = self._freshness.setdefault(written // 60_000, Counter())
        ages_ms = [max(0, written - p.produced_ms) for p in outcome.valid]
        m.freshness_produced.observe_many([a / 1000 for a in ages_ms])
        m.freshness_event.observe_many([max(0, written - p.event.ts) / 1000 for p in outcome.valid])
        minute.update(FRESHNESS_FIELDS[bisect.bisect_left(FRESHNESS_MS, a)] for a in ages_ms)
        for d in outcome.dead:
            m.dlq.labels(d.reason).inc()
        if outcome.duplicates:
            m.events.labels("any", "duplicate").inc(outcome.duplicates)
        if outcome.blocked:
            m.events.labels("any", "blocked").inc(outcome.blocked)
        if outcome.conflicts:
            m.conflicts.inc(outcome.conflicts)
        if outcome.repaired:
            m.repaired.inc(outcome.repaired)
        emptied = sum(proc.emptied for proc in self._processors.values())
        if emptied > self._emptied:  # counted here whether the batch's write went through
            m.store_emptied.inc(emptied - self._emptied)
            self._emptied = emptied

    async def flush_report(self) -> None:
        """Freshness counts into the report's per-minute counters (stream_engine/attribution
        .py), about once a second. Not fenced: a crash loses at most the unflushed second."""
        if not self._freshness:
            return
        pending, self._freshness = self._freshness, {}
        prefix = self.settings.key_prefix
        pipe = self.redis.pipeline(transaction=False)
        for minute, counts in pending.items():
            key = minute_key(prefix, minute * 60_000)
            for name, n in counts.items():
                pipe.hincrby(key, name, n)
            pipe.pexpire(key, REPORT_TTL_MS)
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await pipe.execute()
        except (TimeoutError, *STORE_ERRORS) as exc:
            log.warning("freshness counts not flushed (%s); keeping them", exc)
            newest = max(pending)
            for minute, counts in pending.items():
                if newest - minute < 10:
                    self._freshness.setdefault(minute, Counter()).update(counts)

    async def watch_pressure(
        self, redis: aioredis.Redis, stopping: asyncio.Event | None = None
    ) -> None:
        """Reads the API's slow-read counter every WATCH_EVERY_S and moves the governor
        (stream_engine/pressure.py) until `stopping` is set (or the task is cancelled), on
        the caller's client: the batches' is closed when the consumer stops. A failed read
        counts as no report: the batches meet the outage themselves."""
        if not self.settings.yield_to_api:
            return
        key = Keys(self.settings.key_prefix).pressure
        watch = PressureWatch()
        gov, m = self.governor, self.metrics
        waited = 0.0
        while stopping is None or not stopping.is_set():
            try:
                async with asyncio.timeout(WATCH_TIMEOUT_S):
                    raw = await redis.get(key)
            except (TimeoutError, ResponseError, *STORE_ERRORS) as exc:
                # ResponseError: a key of another type, written by something else
                log.debug("pressure counter not read: %s", exc)
            else:
                reported = watch.seen(raw)
                if reported:
                    m.pressure_reports.inc()
                gov.tick(reported, time.monotonic())
            m.apply_limit.set(gov.limit or 0.0)
            m.yielded.inc(gov.waited_s - waited)
            waited = gov.waited_s
            await asyncio.sleep(WATCH_EVERY_S)

    def report_lag(self, highwaters: dict[int, int | None]) -> None:
        """Lag per partition: the high watermark minus the next offset to apply."""
        for partition, high in highwaters.items():
            done = self.positions.get(partition)
            if high is not None and done is not None:
                self.metrics.lag.labels(str(partition)).set(max(0, high - done))


def _add(total: Outcome, o: Outcome) -> None:
    total.valid += o.valid
    total.dead += o.dead
    total.applied += o.applied
    total.duplicates += o.duplicates
    total.blocked += o.blocked
    total.unknown_items += o.unknown_items
    total.conflicts += o.conflicts
    total.repaired += o.repaired
    total.written_at_ms = o.written_at_ms or total.written_at_ms


def _poisoned(r: Record) -> Outcome:
    return Outcome(dead=[DeadLetter(r, "processing_error", "see worker log")])


REFILL_BATCH = 500  # events a batch when applying again what Redis lost
REFILL_FETCH_TIMEOUT_S = 30.0


def read_note(note: str) -> tuple[int, int] | None:
    """(incarnation tag, written through) of a commit note (Ingest.commit_note); None for
    any other metadata."""
    if not note.startswith(NOTE_PREFIX):
        return None
    tag, sep, through = note[len(NOTE_PREFIX) :].partition(":")
    if not (sep and tag.isascii() and tag.isdigit() and through.isascii() and through.isdigit()):
        return None
    return int(tag), int(through)


async def read_range(
    settings: Settings, partition: int, first: int, last: int
) -> AsyncIterator[list[Record]]:
    """The clickstream's records of `partition` at offsets first..last, in batches of up
    to REFILL_BATCH, as the worker's consumer reads them (its security and isolation
    level), with a consumer of no group; what is no longer in the topic is left out.
    A broker that stops answering raises (KafkaError, or TimeoutError after
    REFILL_FETCH_TIMEOUT_S on one fetch)."""
    tp = TopicPartition(settings.clickstream_topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
        isolation_level=settings.isolation_level, max_poll_records=REFILL_BATCH,
        **settings.kafka.aiokafka(),
    )  # fmt: skip
    try:  # stopped also when it could not start (an unclosed consumer each retry)
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, first)
        while await consumer.position(tp) <= last:
            if await consumer.position(tp) >= (await consumer.end_offsets([tp]))[tp]:
                return  # the rest is not there (and will not be)
            async with asyncio.timeout(REFILL_FETCH_TIMEOUT_S):
                fetched = await consumer.getmany(tp, timeout_ms=1000)
            records = [Record(partition, m.offset, m.key, m.value, m.timestamp)
                       for m in fetched.get(tp, [])
                       if m.offset <= last and m.value is not None]  # fmt: skip
            if records:
                yield records
    finally:
        await consumer.stop()
