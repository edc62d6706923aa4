"""The topics Kairos uses, created with the configured partition count when missing."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

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
        return missing
    finally:
        await admin.close()
