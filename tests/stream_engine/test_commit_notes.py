"""The worker's commit notes: what it wrote to Redis, committed with each offset, and read
back by whoever applies the partition next (ingest.Ingest.check_notes). The worker's own
tests run it end to end (test_worker.py: a Redis restarted from an older snapshot under a
worker restarted, or a partition moved); here the parts: the notes through the real
broker, and which notes count."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from confluent_kafka import Consumer

from stream_engine.catalog import Catalog
from stream_engine.consumer import commit_applied
from stream_engine.demo_catalog import generate
from stream_engine.ingest import Ingest, read_note
from stream_engine.metrics import WorkerMetrics
from stream_engine.rdkafka_consumer import commit_offsets
from stream_engine.settings import Settings
from stream_engine.topics import GroupNotes
from tests.conftest import Stack, TopicFactory, free_port

CATALOG = Catalog(generate(50))


class Notes:
    """What the group committed, as a dict (the unit tests' stand-in for GroupNotes: which
    notes count is the question here, not how they are read); `failing` reads fail."""

    def __init__(self, notes: dict[int, str], failing: int = 0) -> None:
        self.notes = notes
        self.failing = failing
        self.asked: list[list[int]] = []

    async def __call__(self, partitions: Iterable[int]) -> dict[int, str]:
        asked = list(partitions)
        self.asked.append(asked)
        if self.failing:
            self.failing -= 1
            raise KafkaConnectionError("the coordinator is not available")
        return {p: self.notes[p] for p in asked if p in self.notes}


def _ingest(notes: Notes, tag: int = 7) -> Ingest:
    ingest = Ingest(Settings(), CATALOG, WorkerMetrics(), notes=notes)
    ingest.incarnation.tag = tag
    return ingest


def test_a_note_reads_back_as_written_and_anything_else_as_none() -> None:
    ingest = _ingest(Notes({}))
    assert ingest.commit_note(3) == ""  # nothing written to the partition: no note
    ingest.written_through[3] = 812
    assert read_note(ingest.commit_note(3)) == (7, 812)
    others = ["", "812", "kairos:1:", "kairos:1:7", "kairos:1:7:", "kairos:1:x:812",
              "kairos:1:7:-1", "kairos:1:7:8²", "kairos:2:7:812", "something:1:7:812"]  # fmt: skip
    for other in others:
        assert read_note(other) is None, other


async def test_the_notes_of_the_topics_incarnation_raise_what_redis_must_hold() -> None:
    notes = Notes({0: "kairos:1:7:500", 1: "kairos:1:9:500", 2: "", 3: "kairos:1:7:40"})
    ingest = _ingest(notes)
    ingest.written_through[3] = 90  # written by this worker since: more than the note says
    await ingest.check_notes({0, 1, 2, 3, 4})
    # 1: taken on another incarnation of the topic; 2: a commit without a note (an
    # operator's reset); 4: nothing committed
    assert ingest.written_through == {0: 500, 3: 90}
    assert notes.asked == [[0, 1, 2, 3, 4]]


async def test_partitions_are_asked_about_once_until_the_group_rebalances() -> None:
    notes = Notes({0: "kairos:1:7:500"})
    ingest = _ingest(notes)
    await ingest.check_notes({0, 1})
    await ingest.check_notes({0, 1})
    await ingest.check_notes({1, 2})
    assert notes.asked == [[0, 1], [2]]
    ingest.rebalanced()
    await ingest.check_notes({0, 2})
    assert notes.asked == [[0, 1], [2], [0, 2]]


async def test_a_group_that_cannot_be_asked_is_tried_again_then_left_unchecked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notes = Notes({0: "kairos:1:7:500"}, failing=2)
    ingest = _ingest(notes)
    await ingest.check_notes({0})  # the third read answers
    assert ingest.written_through == {0: 500}
    assert len(notes.asked) == 3
    down = Notes({0: "kairos:1:7:500"}, failing=100)
    ingest = _ingest(down)
    with caplog.at_level(logging.WARNING, logger="kairos.worker"):
        await ingest.check_notes({0})  # the stream goes on, unchecked
    assert ingest.written_through == {}
    assert "Redis is not checked against it" in caplog.text
    await ingest.check_notes({0})
    assert len(down.asked) == 4  # not asked again until a rebalance


@pytest.mark.integration
async def test_commits_carry_their_notes_through_the_broker(
    stack: Stack, topic_factory: TopicFactory, unique: str
) -> None:
    """Committed as aiokafka (the aiokafka and faust engines) and librdkafka commit them,
    read back whole, many times over: librdkafka's admin client once handed a note back
    with stray bytes after it (topics.GroupNotes)."""
    topic = await topic_factory("notes", partitions=4)
    notes = {0: "kairos:1:7:9", 1: "", 2: "kairos:1:1234567:88888888"}
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap,
                                group_id=f"notes-{unique}", enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(4)])
        offsets = {TopicPartition(topic, p): 10 + p for p in notes}
        await commit_applied(consumer, offsets, notes.__getitem__)
    finally:
        await consumer.stop()
    rdkafka = Consumer({"bootstrap.servers": stack.kafka_bootstrap,
                        "group.id": f"notes-rd-{unique}", "enable.auto.commit": False})  # fmt: skip
    try:
        commit_offsets(rdkafka, offsets, notes.__getitem__, asynchronous=False)
    finally:
        rdkafka.close()
    for group in (f"notes-{unique}", f"notes-rd-{unique}"):
        read = GroupNotes(stack.kafka_bootstrap, group, topic)
        for _ in range(20):
            assert await read([0, 1, 2, 3]) == notes  # 3: nothing committed
    unreachable = GroupNotes(f"127.0.0.1:{free_port()}", group, topic, timeout_s=1.0)
    with pytest.raises(KafkaError):
        await unreachable([0])
