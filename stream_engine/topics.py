"""The topics Kairos uses, created with the configured partition count when missing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient

from stream_engine.kafka_security import PLAINTEXT, KafkaSecurity
from stream_engine.planning import incarnation_tag
from stream_engine.settings import Settings

log = logging.getLogger("kairos.topics")
NO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"  # the zero id: a broker older than topic ids (2.8)
# How often the worker's consumer refreshes the cluster's metadata (the clients' default
# is 5 minutes). A topic deleted and created again under a running worker leaves its group
# assigned nothing until a refresh sees the topic back: that long without consuming.
CONSUMER_METADATA_MAX_AGE_MS = 30_000


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.clickstream_topic,
        settings.dlq_topic,
        settings.catalog_topic,
        settings.decisions_topic,
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; returns the ones created. Existing topics are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                **settings.kafka.aiokafka())  # fmt: skip
    try:
        await admin.start()  # inside: a start that fails leaves no client behind
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


async def ensure_topics_waiting(
    settings: Settings, first_delay_s: float = 0.5, max_delay_s: float = 10.0
) -> list[str]:
    """ensure_topics, tried again while Kafka can't be reached or its topics have no
    leaders yet: a worker started before its broker (a restart of both, a deployment's
    order) waits for it, saying so, instead of exiting."""
    delay = first_delay_s
    while True:
        try:
            return await ensure_topics(settings)
        except KafkaError as exc:
            log.warning("Kafka at %s is not ready (%s); trying again in %.1f s",
                        settings.kafka_bootstrap, exc, delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


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


class TopicIdentity:
    """The id Kafka gave a topic: a new one each time a topic of that name is created, and
    another on another cluster. Read with librdkafka's admin client, since aiokafka's
    metadata requests predate topic ids. Calling it returns the id, or None when it can't
    be read (the broker unreachable, the topic missing, a broker before 2.8)."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 5.0,
                 security: KafkaSecurity = PLAINTEXT) -> None:  # fmt: skip
        self.topic = topic
        self.timeout_s = timeout_s
        # librdkafka's own log lines (a broker unreachable) go to this module's logger.
        config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": log,
                                  **security.librdkafka()}  # fmt: skip
        self._admin = AdminClient(config)

    async def __call__(self) -> str | None:
        try:
            futures = self._admin.describe_topics(
                TopicCollection([self.topic]), request_timeout=self.timeout_s
            )
            async with asyncio.timeout(self.timeout_s + 1):
                described = await asyncio.wrap_future(futures[self.topic])
        except Exception as exc:  # librdkafka's KafkaException, a timeout
            log.warning("could not read the id of topic %s: %s", self.topic, exc)
            return None
        topic_id = str(described.topic_id)
        return None if topic_id in ("", NO_TOPIC_ID) else topic_id


class GroupNotes:
    """The metadata a consumer group committed with its offsets of a topic's partitions
    (the worker's commit notes, ingest.Ingest.commit_note). Calling it with partitions
    returns {partition: metadata} for those the group has committed; a group that can't
    be asked raises KafkaError.

    Read with aiokafka's admin client: librdkafka's handed the metadata back with bytes of
    whatever followed it in memory now and then ('kairos:1:7:9\\x18\\x7f' in one CI run
    of tests/stream_engine/test_commit_notes.py; librdkafka issue 4649 is of the kind):
    confluent-kafka commits a note with its C string's NUL as a last byte, and reads one
    back as a C string, running past the end of a note committed without (aiokafka's)."""

    def __init__(self, bootstrap: str, group: str, topic: str, timeout_s: float = 5.0,
                 security: KafkaSecurity = PLAINTEXT) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.timeout_s = timeout_s
        self.security = security

    async def __call__(self, partitions: Iterable[int]) -> dict[int, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap,
                                    request_timeout_ms=int(self.timeout_s * 1000),
                                    **self.security.aiokafka())  # fmt: skip
        asked = [TopicPartition(self.topic, p) for p in partitions]
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                await admin.start()
                answer = await admin.list_consumer_group_offsets(self.group, partitions=asked)
        except KafkaError:
            raise
        except (OSError, TimeoutError) as exc:
            raise KafkaConnectionError(
                f"asking group {self.group} for its offsets: {exc!r}"
            ) from exc
        except Exception as exc:  # aiokafka's own slips on a per-partition error code
            raise KafkaError(f"asking group {self.group} for its offsets: {exc!r}") from exc
        finally:
            await admin.close()
        # librdkafka commits a note with its C string's NUL after it
        return {tp.partition: (om.metadata or "").rstrip("\x00")
                for tp, om in answer.items() if om.offset >= 0}  # fmt: skip


class Incarnation:
    """Which incarnation of a topic its records come from, as planning.incarnation_tag of
    its id (0 while unknown). The id is read again before the first records of a partition
    (since the start or the last rebalance: `forget`) and whenever a partition's offsets
    go back: a redelivery, or a topic created again and numbering from 0. An id that
    can't be read leaves the tag as it was."""

    def __init__(self, topic: str, topic_id: Callable[[], Awaitable[str | None]] | None) -> None:
        self.topic = topic
        self.tag = 0
        self._topic_id = topic_id
        self._seen: dict[int, int] = {}  # partition -> highest offset seen
        self._checking = asyncio.Lock()

    async def follow(self, offsets: Iterable[tuple[int, int]]) -> bool:
        """Takes (partition, offset) of the records about to be applied; whether the tag
        changed (the fences taken on the old one no longer hold)."""
        if self._topic_id is None:
            return False
        seen, back = self._seen, False
        for partition, offset in offsets:
            last = seen.get(partition)
            if last is None or offset > last:
                seen[partition] = offset
            back = back or last is None or offset <= last
        if not back:
            return False
        async with self._checking:
            topic_id = await self._topic_id()
            tag = self.tag if topic_id is None else incarnation_tag(topic_id)
            if tag == self.tag:
                return False
            if self.tag:
                log.warning("topic %s was created again (id %s): its offsets start over, and "
                            "fences are taken on its new incarnation",
                            self.topic, topic_id)  # fmt: skip
            self.tag = tag
            return True

    def forget(self) -> None:
        """A rebalance: partitions assigned again are read as new (the topic may have been
        created again while another worker held them). Safe from another thread."""
        self._seen = {}
