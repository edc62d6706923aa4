"""The faust worker's hand-off of clickstream messages from the drain loop to the agent:
batches in fetch order, a full hand-off holds its partitions back from fetching, and a
rebalance's clear lets them go (faust_transport.Handoff)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from faust.types import TP

from stream_engine.faust_transport import Handoff, KairosConsumer


class _Message:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


class _Consumer:
    """What Handoff uses of faust's consumer: the buffer-full calls and the monitor."""

    def __init__(self) -> None:
        self.full: list[TP] = []
        self.dropped: list[TP] = []
        self.app = type("App", (), {"monitor": type("M", (), {"stream_inbound_time": {}})()})()

    def on_buffer_full(self, tp: TP) -> None:
        self.full.append(tp)

    def on_buffer_drop(self, tp: TP) -> None:
        self.dropped.append(tp)


def _handoff(high: int = 10) -> tuple[Handoff, _Consumer]:
    consumer = _Consumer()
    return Handoff(cast(KairosConsumer, consumer), "clicks", high), consumer


async def test_batches_come_in_fetch_order_at_most_max_each() -> None:
    handoff, _ = _handoff(high=1000)
    sent = [_Message("clicks", k % 3, k // 3) for k in range(25)]
    for m in sent:
        handoff.put(m)
    got = [await handoff.take(10, 0.0) for _ in range(3)]
    assert [len(b) for b in got] == [10, 10, 5]
    assert [m for b in got for m in b] == sent


async def test_take_waits_for_the_first_message_then_within_for_more() -> None:
    handoff, _ = _handoff()
    loop = asyncio.get_running_loop()
    first, second = _Message("clicks", 0, 0), _Message("clicks", 0, 1)
    loop.call_later(0.05, handoff.put, first)
    loop.call_later(0.08, handoff.put, second)
    started = loop.time()
    assert await handoff.take(10, 0.1) == [first, second]  # waited for the second
    assert 0.1 <= loop.time() - started < 0.5
    third = _Message("clicks", 0, 2)
    loop.call_later(0.05, handoff.put, third)
    assert await handoff.take(10, 0.0) == [third]  # within 0: what is there


async def test_a_full_handoff_holds_its_partitions_back_until_taken_down_to_half() -> None:
    handoff, consumer = _handoff(high=10)
    for k in range(12):
        handoff.put(_Message("clicks", k % 2, k // 2))
    assert consumer.full == [TP("clicks", 1), TP("clicks", 0)]  # each partition once
    assert all(type(tp) is TP for tp in consumer.full)  # faust asserts on the type
    await handoff.take(4, 0.0)  # 8 left: above half
    assert consumer.dropped == []
    await handoff.take(3, 0.0)  # 5 left: half
    assert sorted(consumer.dropped) == [TP("clicks", 0), TP("clicks", 1)]
    seen = consumer.app.monitor.stream_inbound_time
    assert set(seen) == {TP("clicks", 0), TP("clicks", 1)}


async def test_a_rebalance_clears_it_and_lets_held_partitions_fetch_again() -> None:
    handoff, consumer = _handoff(high=2)
    for k in range(3):
        handoff.put(_Message("clicks", 0, k))
    handoff.clear()
    assert consumer.dropped == [TP("clicks", 0)]
    assert not handoff.queue
    late = _Message("clicks", 0, 3)  # fetched again from the committed offset
    handoff.put(late)
    assert await handoff.take(10, 0.0) == [late]


@pytest.mark.parametrize("high", [1, 3])
async def test_every_message_put_is_taken_once(high: int) -> None:
    handoff, _ = _handoff(high=high)
    sent: list[Any] = [_Message("clicks", k % 4, k) for k in range(50)]
    got: list[Any] = []

    async def agent() -> None:
        while len(got) < len(sent):
            got.extend(await handoff.take(7, 0.0))

    task = asyncio.create_task(agent())
    for m in sent:
        handoff.put(m)
        await asyncio.sleep(0)
    await asyncio.wait_for(task, 5)
    assert got == sent
