"""The lanes both plain consumers share: what a lane hands to the processor, in which order,
and when the fetch loop must stop filling it; and how the faust agent splits a batch into
parts. Pure asyncio; the end-to-end behaviour of a worker in lanes (ordering, kill -9, two
workers) is in test_worker.py on the real broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from stream_engine.app import split_batch
from stream_engine.exceptions import ConfigError
from stream_engine.lanes import Batch, Lane
from stream_engine.processor import Record
from stream_engine.settings import Settings

TP0 = TopicPartition("clickstream", 0)
TP2 = TopicPartition("clickstream", 2)


def hand(lane: Lane, generation: int, batch: Batch) -> None:
    """What the fetching side does: count the records in, then queue them."""
    lane.reserve(batch)
    lane.put(generation, batch)


def rs(*offsets: int) -> list[Record]:
    return [Record(partition=0, offset=o, key=b"k", value=b"", timestamp_ms=0) for o in offsets]


async def test_a_lane_hands_over_what_queued_as_one_batch_in_offset_order() -> None:
    lane = Lane(0, depth=100)
    hand(lane, 1, {TP0: rs(10, 11)})
    hand(lane, 1, {TP2: rs(5), TP0: rs(12)})
    generation, batch = await lane.take()
    assert generation == 1
    assert batch == {TP0: rs(10, 11, 12), TP2: rs(5)}
    assert not lane.pending
    assert lane.queued == 0


async def test_merged_batches_stay_within_the_lanes_depth() -> None:
    """A lane holds up to its depth plus one fetch; what it hands over at once never exceeds
    its depth (KAIROS_BATCH_MAX), and the rest follows in order. (A worker's batch-size
    histogram once showed 2 of 150 batches above KAIROS_BATCH_MAX=8.)"""
    lane = Lane(0, depth=8)
    hand(lane, 1, {TP0: rs(1, 2, 3, 4, 5)})
    hand(lane, 1, {TP0: rs(6, 7, 8)})
    hand(lane, 1, {TP0: rs(9, 10, 11, 12)})
    assert await lane.take() == (1, {TP0: rs(1, 2, 3, 4, 5, 6, 7, 8)})
    assert await lane.take() == (1, {TP0: rs(9, 10, 11, 12)})
    assert lane.queued == 0


async def test_batches_fetched_before_a_rebalance_are_not_merged_with_later_ones() -> None:
    lane = Lane(0, depth=100)
    hand(lane, 1, {TP0: rs(10)})
    hand(lane, 2, {TP0: rs(10, 11)})  # replayed after the rebalance
    assert await lane.take() == (1, {TP0: rs(10)})
    assert await lane.take() == (2, {TP0: rs(10, 11)})


async def test_fetching_for_a_lane_waits_once_it_holds_depth_records() -> None:
    lane = Lane(0, depth=3)
    room = []
    hand(lane, 1, {TP0: rs(1, 2)})
    room.append(lane.has_room)
    hand(lane, 1, {TP0: rs(3)})
    room.append(lane.has_room)
    await lane.take()
    room.append(lane.has_room)
    assert room == [True, False, True]


async def test_records_counted_in_before_they_are_queued_already_fill_the_lane() -> None:
    """The librdkafka thread counts a batch in before the event loop queues it: a lane is
    full as soon as the records are on their way, not only once they have arrived."""
    lane = Lane(0, depth=3)
    lane.reserve({TP0: rs(1, 2, 3)})
    assert (lane.queued, lane.has_room) == (3, False)
    lane.put(1, {TP0: rs(1, 2, 3)})
    assert await lane.take() == (1, {TP0: rs(1, 2, 3)})
    assert lane.has_room
    assert lane.queued == 0


async def test_take_waits_for_a_batch() -> None:
    lane = Lane(0, depth=10)
    waiting = asyncio.create_task(lane.take())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    hand(lane, 3, {TP2: rs(7)})
    assert await asyncio.wait_for(waiting, 1.0) == (3, {TP2: rs(7)})


@pytest.mark.parametrize("lanes", [0, -1])
def test_lanes_must_be_positive(lanes: int) -> None:
    with pytest.raises(ConfigError, match="KAIROS_LANES"):
        Settings(lanes=lanes)


class _Message:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition = partition
        self.offset = offset


def _faust_batch(n: int, partitions: int) -> list[_Message]:
    return [_Message(k % partitions, k // partitions) for k in range(n)]


def test_a_large_faust_batch_splits_by_partition_and_keeps_each_partitions_order() -> None:
    messages = _faust_batch(200, 6)
    parts = split_batch(messages, 4, 64)
    # partitions 0 and 4 share lane 0, 1 and 5 lane 1; 2 and 3 have lanes of their own
    lanes = [sorted({m.partition for m in part}) for part in parts]
    assert sorted(lanes) == [[0, 4], [1, 5], [2], [3]]
    assert sum(len(part) for part in parts) == len(messages)
    assert {id(m) for part in parts for m in part} == {id(m) for m in messages}
    for part in parts:
        for p in {m.partition for m in part}:
            offsets = [m.offset for m in part if m.partition == p]
            assert offsets == sorted(offsets) == list(range(len(offsets)))


@pytest.mark.parametrize(("n", "lanes"), [(63, 4), (1, 4), (500, 1)])
def test_a_small_faust_batch_or_one_lane_stays_whole(n: int, lanes: int) -> None:
    messages = _faust_batch(n, 4)
    assert split_batch(messages, lanes, 64) == [messages]
