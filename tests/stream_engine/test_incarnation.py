"""topics.Incarnation: when the worker reads its topic's id again (the reads are counted
here; the id itself comes from the real broker in test_worker.py's recreated-topic tests)."""

from __future__ import annotations

from stream_engine.planning import incarnation_tag
from stream_engine.topics import Incarnation


class Ids:
    def __init__(self, *ids: str | None) -> None:
        self.ids = list(ids)
        self.reads = 0

    async def __call__(self) -> str | None:
        self.reads += 1
        return self.ids[min(self.reads, len(self.ids)) - 1]


async def test_the_id_is_read_for_new_partitions_and_offsets_that_go_back() -> None:
    ids = Ids("a", "a", "a", "b", None)
    inc = Incarnation("clickstream", ids)
    assert await inc.follow([(0, 5), (0, 6), (1, 0)])  # the first records: unknown -> "a"
    assert (inc.tag, ids.reads) == (incarnation_tag("a"), 1)
    assert not await inc.follow([(0, 7), (1, 1)])  # onwards: nothing to read
    assert ids.reads == 1
    assert not await inc.follow([(2, 40)])  # a partition not seen before
    assert not await inc.follow([(0, 6)])  # a redelivery
    assert ids.reads == 3
    assert await inc.follow([(1, 0)])  # offsets from 0 again, and a new id
    assert (inc.tag, ids.reads) == (incarnation_tag("b"), 4)
    inc.forget()  # a rebalance
    assert not await inc.follow([(1, 1)])  # the id unreadable: the tag stays
    assert (inc.tag, ids.reads) == (incarnation_tag("b"), 5)


async def test_without_an_id_reader_the_tag_stays_unknown() -> None:
    inc = Incarnation("clickstream", None)
    assert not await inc.follow([(0, 1), (0, 0)])
    assert inc.tag == 0
