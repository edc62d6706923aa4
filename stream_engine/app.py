"""The faust application: one agent per domain, micro-batched, at-least-once, fenced writes.

Known faust traps this avoids (see ../shared/DESIGN.md): agent concurrency stays 1 (#606);
no exception escapes the agent (#604/#315): bad events are dead-lettered, Redis outages are
retried in place, so offsets are only committed for work that is done; no faust Tables;
`within` stays in milliseconds (#162).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import CatalogFollower
from stream_engine.ingest import Ingest, dead_letter_body, redis_client
from stream_engine.metrics import WorkerMetrics
from stream_engine.processor import Record
from stream_engine.settings import Settings


def create_app(settings: Settings, catalog: Catalog, metrics: WorkerMetrics) -> faust.App:
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        processing_guarantee="at_least_once",
        store="memory://",
        topic_partitions=settings.partitions,
        producer_linger=0.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.group_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.group_session_timeout_s / 4),
    )
    clickstream = app.topic(
        settings.clickstream_topic, key_serializer="raw", value_serializer="raw"
    )
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
    ingest = Ingest(settings, catalog, metrics)
    within = settings.batch_within_ms / 1000

    @app.agent(clickstream, concurrency=1)
    async def clickstream_agent(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=within):
            records = [_record(e.message) for e in events]
            outcome = await ingest.apply(records)
            for d in outcome.dead:
                await dlq.send(key=d.record.key, value=dead_letter_body(d))
            ingest.observe(outcome, records)

    @app.timer(1.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        consumer = app.consumer
        ingest.report_lag(
            {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()
             if tp.topic == settings.clickstream_topic}
        )  # fmt: skip
        await ingest.flush_report()

    @app.task  # type: ignore[untyped-decorator]
    async def follow_catalog() -> None:
        redis = redis_client(settings)
        try:
            await CatalogFollower(settings, catalog, redis, metrics).run()
        finally:  # the worker stopping cancels this task: close what it opened
            await redis.aclose()

    app.kairos_ingest = ingest  # type: ignore[attr-defined]
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


def _record(message: Any) -> Record:
    ts = message.timestamp
    return Record(
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value if message.value is not None else b"",
        timestamp_ms=int(ts * 1000) if ts else int(time.time() * 1000),
    )
