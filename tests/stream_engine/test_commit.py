"""Committing what is applied after the group moved on: the worker's and attribution's
consumers log it and go on (the fences make the replay harmless), never stop."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka import AIOKafkaConsumer

from stream_engine.consumer import commit_applied
from tests.conftest import Stack, TopicFactory, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_a_commit_for_a_partition_that_moved_away_is_logged_and_the_consumer_goes_on(
    stack: Stack, topic_factory: TopicFactory, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await topic_factory("commit", partitions=2)
    options = dict(bootstrap_servers=stack.kafka_bootstrap, group_id=f"commit-{unique}",
                   enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
    first = AIOKafkaConsumer(topic, **options)
    second = AIOKafkaConsumer(topic, **options)
    await first.start()
    try:
        await wait_for(lambda: len(first.assignment()) == 2, 30, "the first consumer's partitions")
        await second.start()
        # both poll so that the rebalance completes: one partition each
        while not (first.assignment() and second.assignment()
                   and len(first.assignment()) == 1):  # fmt: skip
            await asyncio.gather(first.getmany(timeout_ms=200), second.getmany(timeout_ms=200))
        (kept,) = first.assignment()
        (moved,) = second.assignment()
        with caplog.at_level(logging.WARNING, logger="stream_engine.consumer"):
            await commit_applied(first, {moved: 5})  # applied before the partition moved
        assert "the new owner will replay" in caplog.text
        assert await first.committed(moved) is None  # the new owner's to commit
        await commit_applied(first, {kept: 3})  # and the consumer goes on committing its own
        assert await first.committed(kept) == 3
    finally:
        await second.stop()
        await first.stop()
