"""The topics Kairos uses, created with the configured partition count when missing."""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from stream_engine.settings import Settings


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.clickstream_topic,
        settings.dlq_topic,
        settings.catalog_topic,
        settings.decisions_topic,
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; returns the ones created. Existing topics are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_names(settings) if t not in existing]
        if missing:
            new = [NewTopic(t, settings.partitions, replication_factor=1) for t in missing]
            # Another worker may create one between our list and our create.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
        await _until_led(admin, topic_names(settings))
        return missing
    finally:
        await admin.close()


async def _until_led(admin: AIOKafkaAdminClient, topics: list[str], within_s: float = 15.0) -> None:
    """Wait until every partition of `topics` has a leader. Creation returns before the
    metadata has spread, and a consumer group that forms in between is assigned nothing
    until its next metadata refresh (five minutes by default): a worker idle with a backlog."""
    deadline = time.monotonic() + within_s
    while True:
        described = await admin.describe_topics(topics)
        if all(
            t["error_code"] == 0 and t["partitions"]
            and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
            for t in described
        ):  # fmt: skip
            return
        if time.monotonic() > deadline:
            raise KafkaError(f"topics {', '.join(topics)} have no leaders after {within_s:.0f} s")
        await asyncio.sleep(0.1)
