"""The faust worker's hand-off of clickstream messages from the drain loop to the agent:
batches in fetch order, a full hand-off holds its partitions back from fetching, and a
rebalance's clear lets them go (faust_transport.Handoff)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from faust.types import TP

from stream_engine.app import PartitionLanes
from stream_engine.faust_transport import Handoff, KairosConsumer
from stream_engine.metrics import WorkerMetrics
from stream_engine.settings import Settings


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


def _by_partition(messages: list[Any]) -> dict[int, list[Any]]:
    parts: dict[int, list[Any]] = {}
    for m in messages:
        parts.setdefault(m.partition, []).append(m)
    return parts


async def test_batches_keep_each_partitions_order_at_most_max_each() -> None:
    handoff, _ = _handoff(high=1000)
    sent = [_Message("clicks", k % 3, k // 3) for k in range(25)]
    for m in sent:
        handoff.put(m)
    got = [await handoff.take(10, 0.0) for _ in range(3)]
    assert [len(b) for b in got] == [10, 10, 5]
    assert _by_partition([m for b in got for m in b]) == _by_partition(sent)
    assert handoff.count == 0


async def test_a_full_take_goes_on_next_time_with_the_partitions_it_left() -> None:
    handoff, _ = _handoff(high=1000)
    for k in range(30):
        handoff.put(_Message("clicks", k // 10, k % 10))  # 10 each in partitions 0, 1, 2
    first = await handoff.take(15, 0.0)
    assert {m.partition for m in first} == {0, 1}
    second = await handoff.take(10, 0.0)  # partition 2 first: it was passed over
    assert [m.partition for m in second] == [2] * 10


async def test_take_passes_over_busy_partitions_and_waits_for_them_when_poked() -> None:
    handoff, _ = _handoff(high=1000)
    for k in range(6):
        handoff.put(_Message("clicks", k % 2, k // 2))
    busy = {0}
    got = await handoff.take(10, 0.0, busy)
    assert [(m.partition, m.offset) for m in got] == [(1, 0), (1, 1), (1, 2)]
    assert handoff.waiting(busy) == 0
    assert handoff.waiting() == 3
    waiting = asyncio.create_task(handoff.take(10, 0.0, busy))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # partition 0 is still being applied
    busy.clear()
    handoff.poke()
    got = await asyncio.wait_for(waiting, 1)
    assert [(m.partition, m.offset) for m in got] == [(0, 0), (0, 1), (0, 2)]


async def test_while_busy_a_take_waits_for_least_while_busy_messages() -> None:
    handoff, _ = _handoff(high=1000)
    busy = {0}
    for k in range(3):
        handoff.put(_Message("clicks", 1, k))
    waiting = asyncio.create_task(handoff.take(10, 0.0, busy, least_while_busy=5))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # three are not worth a second lane's round trip
    busy.clear()  # the busy lane is done: one is enough
    handoff.poke()
    assert len(await asyncio.wait_for(waiting, 1)) == 3


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
    assert handoff.count == 0
    assert not handoff.queues
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
    assert _by_partition(got) == _by_partition(sent)


class _Applies:
    """An apply that takes `slow[partition]` seconds for a part holding that partition and
    records what it saw: every part, and whether a partition was ever in two at once."""

    def __init__(self, slow: dict[int, float], fail_on: int | None = None, expect: int = 0) -> None:
        self.slow = slow
        self.expect = expect
        self.failures_left = 1 if fail_on is not None else 0
        self.all_applied = asyncio.Event()
        self.fail_on = fail_on
        self.parts: list[tuple[int, list[Any]]] = []
        self.in_flight: set[int] = set()
        self.overlaps = 0
        self.most_at_once = 0
        self.lanes_in_use: set[int] = set()

    async def __call__(self, lane: int, part: list[Any]) -> None:
        partitions = {m.partition for m in part}
        if partitions & self.in_flight or lane in self.lanes_in_use:
            self.overlaps += 1
        self.in_flight |= partitions
        self.lanes_in_use.add(lane)
        self.most_at_once = max(self.most_at_once, len(self.lanes_in_use))
        try:
            await asyncio.sleep(max([self.slow.get(p, 0.001) for p in partitions]))
            if self.fail_on in partitions and self.failures_left > 0:
                self.failures_left -= 1
                raise RuntimeError("the DLQ send failed")
            self.parts.append((lane, part))
            if sum(len(p) for _, p in self.parts) >= self.expect:
                self.all_applied.set()
        finally:
            self.in_flight -= partitions
            self.lanes_in_use.discard(lane)


def _lanes(handoff: Handoff, applies: _Applies, lanes: int = 4, split_from: int = 4) -> Any:
    settings = Settings(lanes=lanes, faust_split_from=split_from, batch_max=50)
    return PartitionLanes(handoff, settings, applies, WorkerMetrics())


async def test_partition_lanes_apply_everything_once_in_each_partitions_order() -> None:
    handoff, _ = _handoff(high=10_000)
    applies = _Applies(slow={0: 0.02}, expect=2_000)  # partition 0 is slow: others overtake
    task = asyncio.create_task(_lanes(handoff, applies).run())
    sent = [_Message("clicks", k % 4, k // 4) for k in range(2_000)]
    for k, m in enumerate(sent):
        handoff.put(m)
        if k % 50 == 0:
            await asyncio.sleep(0.001)
    await asyncio.wait_for(applies.all_applied.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    applied = [m for _, part in applies.parts for m in part]
    assert _by_partition(applied) == _by_partition(sent)  # once each, in order
    assert applies.overlaps == 0  # no partition (nor lane) in two applies at once
    assert applies.most_at_once > 1
    # while partition 0 was slow, the others went on: more parts without it than with it
    with_0 = sum(1 for _, part in applies.parts if any(m.partition == 0 for m in part))
    assert len(applies.parts) - with_0 > 2 * with_0


async def test_partition_lanes_keep_a_trickle_on_one_lane() -> None:
    handoff, _ = _handoff(high=10_000)
    applies = _Applies(slow={p: 0.01 for p in range(4)}, expect=40)
    task = asyncio.create_task(_lanes(handoff, applies, split_from=64).run())
    for k in range(40):  # below faust_split_from while a lane is busy
        handoff.put(_Message("clicks", k % 4, k // 4))
        await asyncio.sleep(0.002)
    await asyncio.wait_for(applies.all_applied.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert applies.most_at_once == 1


async def test_a_failed_apply_is_retried_in_place_and_its_partitions_wait_for_it() -> None:
    handoff, _ = _handoff(high=10_000)
    applies = _Applies(slow={}, fail_on=1, expect=40)
    applies.failures_left = 3  # the DLQ unreachable three times, then back
    metrics = WorkerMetrics()
    lanes = PartitionLanes(handoff, Settings(lanes=4, faust_split_from=4, batch_max=50),
                           applies, metrics, retry_first_s=0.01, retry_max_s=0.02)  # fmt: skip
    task = asyncio.create_task(lanes.run())
    sent = [_Message("clicks", k % 2, k // 2) for k in range(20)]
    for m in sent:
        handoff.put(m)
    await asyncio.sleep(0.03)  # partition 1's first part is failing meanwhile
    later = [_Message("clicks", k % 2, 10 + k // 2) for k in range(20)]
    for m in later:
        handoff.put(m)
    await asyncio.wait_for(applies.all_applied.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    applied = [m for _, part in applies.parts for m in part]
    assert _by_partition(applied) == _by_partition(sent + later)  # once each, in order
    assert metrics.apply_failures._value.get() == 3
    assert applies.overlaps == 0


async def test_each_take_reports_how_long_its_messages_waited_in_the_hand_off() -> None:
    waits: list[list[float]] = []
    handoff = Handoff(cast(KairosConsumer, _Consumer()), "clicks", 1000, waits.append)
    now = [100.0]
    handoff.clock = lambda: now[0]
    handoff.put(_Message("clicks", 0, 0))
    handoff.put(_Message("clicks", 1, 0))
    now[0] = 100.5
    handoff.put(_Message("clicks", 0, 1))
    handoff.put(_Message("clicks", 1, 1))
    now[0] = 101.0
    first = await handoff.take(10, 0.0, busy={1})  # partition 1 stays: not observed yet
    assert [(m.partition, m.offset) for m in first] == [(0, 0), (0, 1)]
    assert waits == [[1.0, 0.5]]
    now[0] = 103.0
    handoff.put(_Message("clicks", 0, 2))
    second = await handoff.take(10, 0.0)
    assert sorted((m.partition, m.offset) for m in second) == [(0, 2), (1, 0), (1, 1)]
    assert sorted(waits[1]) == [0.0, 2.5, 3.0]
    handoff.clear()  # a rebalance: what waited is fetched again, never observed
    handoff.put(_Message("clicks", 2, 0))
    assert [m.offset for m in await handoff.take(10, 0.0)] == [0]
    assert waits[2] == [0.0]


def test_the_worker_exports_hand_off_waits_as_a_histogram() -> None:
    metrics = WorkerMetrics()
    metrics.handoff_wait.observe_many([0.0005, 0.004, 0.2])
    sample = metrics.registry.get_sample_value
    assert sample("kairos_handoff_wait_seconds_count") == 3
    assert sample("kairos_handoff_wait_seconds_bucket", {"le": "0.005"}) == 2
    assert sample("kairos_handoff_wait_seconds_bucket", {"le": "0.1"}) == 2
