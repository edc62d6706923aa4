"""BatchProcessor on the real Redis: the math lands, fences hold, consent and erasure stick."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_engine import processor as processor_module
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate
from stream_engine.erasure import erase_session, erase_user
from stream_engine.events import Event, EventType, encode_event
from stream_engine.latent import read_covisitation
from stream_engine.planning import SEEN_IDS, Tuning, incarnation_tag
from stream_engine.processor import BatchProcessor, Record, Ttls
from stream_engine.state import Keys
from stream_engine.vectors import DEFAULT_WEIGHTS, fold_events, from_bytes, user_profile

pytestmark = pytest.mark.integration

TUNING = Tuning(1_800_000, 14 * 86_400_000, 7 * 86_400_000, 6 * 3_600_000)
TTLS = Ttls(3_600_000, 86_400_000, 86_400_000, 86_400_000)
CATALOG = Catalog(generate(300))
ITEMS = [it.item_id for it in CATALOG.items]


@pytest.fixture
async def processor(redis_client: aioredis.Redis, key_prefix: str) -> AsyncIterator[BatchProcessor]:
    made = BatchProcessor(redis_client, Keys(key_prefix), CATALOG, TUNING, TTLS)
    yield made
    await made.aclose()


@pytest.fixture
async def second(redis_client: aioredis.Redis, key_prefix: str) -> AsyncIterator[BatchProcessor]:
    """Another worker's processor on the same Redis and key prefix."""
    made = BatchProcessor(redis_client, Keys(key_prefix), CATALOG, TUNING, TTLS)
    yield made
    await made.aclose()


EVENT_IDS = itertools.count()


class Log:
    """Builds records as a partition of the clickstream would hold them."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = 0
        self.t0 = int(time.time() * 1000) - 60_000
        self._ids: Iterator[int] = iter(range(10**9))

    def __call__(self, etype: EventType, sid: str, **kw: object) -> Record:
        n = next(self._ids)
        eid = f"e{next(EVENT_IDS)}"  # unique across logs: a repeated id is a duplicate
        event = Event(eid, etype, sid, self.t0 + 1000 * n, **kw)  # type: ignore[arg-type]
        rec = Record(self.partition, self.offset, sid.encode(), encode_event(event), self.t0)
        self.offset += 1
        return rec


async def _hash(redis: aioredis.Redis, key: str | bytes) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], await redis.hgetall(key))


async def _session(redis: aioredis.Redis, key_prefix: str, sid: str) -> dict[bytes, bytes]:
    return await _hash(redis, Keys(key_prefix).session(sid))


async def test_state_matches_the_vector_math(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    seq = [(EventType.VIEW, ITEMS[0]), (EventType.CLICK, ITEMS[1]),
           (EventType.ADD_TO_CART, ITEMS[2]), (EventType.PURCHASE, ITEMS[2])]  # fmt: skip
    records = [log(t, "s1", item_id=i) for t, i in seq]
    out = await processor.process(records)
    assert out.applied == 4
    s = await _session(redis_client, key_prefix, "s1")
    ts = np.array([log.t0 + 1000 * k for k in range(4)])
    weights = np.array([DEFAULT_WEIGHTS[t] for t, _ in seq])
    rows = CATALOG.matrix[[CATALOG.row[i] for _, i in seq]]
    expected, t = fold_events(np.zeros(CATALOG.space.dims, np.float32), None, ts, weights,
                              rows, TUNING.session_half_life_ms)  # fmt: skip
    stored = from_bytes(s[b"v"], CATALOG.space.dims)
    assert stored is not None
    np.testing.assert_allclose(stored, expected, rtol=1e-5)
    assert int(s[b"t"]) == t
    assert s[b"r"].decode().split() == [ITEMS[2], ITEMS[1], ITEMS[0]]
    assert s[b"c"] == b""  # bought, so out of the cart
    assert s[b"b"] == ITEMS[2].encode()
    assert int(s[b"n"]) == 4
    ttl = await redis_client.pttl(Keys(key_prefix).session("s1"))
    assert 0 < ttl <= TTLS.session_ms


async def test_redelivery_changes_nothing(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    records = [log(EventType.VIEW, f"s{k % 3}", item_id=ITEMS[k]) for k in range(9)]
    await processor.process(records)
    keys = sorted([k async for k in redis_client.scan_iter(match=f"{key_prefix}*")])
    before = {k: await _dump(redis_client, k) for k in keys}
    again = await processor.process(records[3:] + records[:3])
    assert again.applied == 0
    assert again.duplicates == 9
    after = {k: await _dump(redis_client, k) for k in keys}
    assert _without_written_at(after) == _without_written_at(before)


async def test_an_event_sent_again_under_its_id_changes_nothing(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:  # fmt: skip
    """A tracker's or a browser's retry, or a producer without idempotence, puts the same
    event in the topic twice, at two offsets: the offset fences take the second for new.
    Its id is not: the session, its user, co-visitation and trending stay as they were,
    whether the repeat comes in a later batch (from the worker's cache, or read back from
    Redis by another worker) or in the same batch as the first."""
    log = Log()
    records = [log(EventType.VIEW, "s1", item_id=ITEMS[0]),
               log(EventType.CLICK, "s1", item_id=ITEMS[1], user_id="u1"),
               log(EventType.VIEW, "s2", item_id=ITEMS[1])]  # fmt: skip
    await processor.process(records)
    keys = sorted([k async for k in redis_client.scan_iter(match=f"{key_prefix}*")])
    before = {k: await _dump(redis_client, k) for k in keys}

    def sent_again(rs: list[Record]) -> list[Record]:
        return [Record(r.partition, log.offset + k, r.key, r.value, r.timestamp_ms)
                for k, r in enumerate(rs)]  # fmt: skip

    again = await processor.process(sent_again(records))
    assert (again.applied, again.duplicates) == (0, 3)
    second.cache.clear()
    log.offset += 10
    read_back = await second.process(sent_again(records))
    assert (read_back.applied, read_back.duplicates) == (0, 3)
    after = {k: await _dump(redis_client, k) for k in keys}
    fence = Keys(key_prefix).agg_fence.encode()  # the aggregates are fenced past the repeats
    assert cast(dict[bytes, bytes], after.pop(fence))[b"0"] == b"%d" % (log.offset + 2)
    before.pop(fence)
    assert _without_written_at(after) == _without_written_at(before)

    # in one batch: s3 clicks ITEMS[2] and sends it again, s4 clicks ITEMS[3] once, at once
    ts = log.t0 + 500
    twice = encode_event(Event("retried", EventType.CLICK, "s3", ts, item_id=ITEMS[2]))
    once = encode_event(Event("single", EventType.CLICK, "s4", ts, item_id=ITEMS[3]))
    batch = [Record(0, 900, b"s3", twice, ts), Record(0, 901, b"s4", once, ts),
             Record(0, 902, b"s3", twice, ts)]  # fmt: skip
    out = await processor.process(batch)
    assert (out.applied, out.duplicates) == (2, 1)
    assert int((await _session(redis_client, key_prefix, "s3"))[b"n"]) == 1
    trending = dict(await _zset(redis_client, Keys(key_prefix).trending(), desc=True))
    assert trending[ITEMS[2].encode()] == trending[ITEMS[3].encode()]


async def test_a_repeat_is_not_counted_when_the_aggregates_are_written_again(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:  # fmt: skip
    """The session's write lands, the aggregates' is refused (another worker moved their
    fence: a rebalance), and the batch's next attempt skips the session it wrote: the
    repeat the first attempt found must stay out of co-visitation and trending."""
    ts = int(time.time() * 1000) - 60_000

    def rec(offset: int, eid: str, sid: str, item: str) -> Record:
        event = Event(eid, EventType.CLICK, sid, ts, item_id=item)
        return Record(0, offset, sid.encode(), encode_event(event), ts)

    await processor.process([rec(0, "warm", "s1", ITEMS[9])])  # caches s1, and the fence at 0
    await second.process([rec(1, "elsewhere", "s9", ITEMS[8])])  # moves the fence to 1
    out = await processor.process([rec(2, "first", "s1", ITEMS[5]),
                                   rec(3, "first", "s1", ITEMS[5]),  # sent again
                                   rec(4, "other", "s1", ITEMS[6])])  # fmt: skip
    assert out.conflicts == 1  # the aggregates' write, refused; s1's landed
    assert (out.applied, out.duplicates) == (2, 1)
    trending = dict(await _zset(redis_client, Keys(key_prefix).trending(), desc=True))
    assert trending[ITEMS[5].encode()] == trending[ITEMS[6].encode()]


async def test_a_session_remembers_only_its_last_ids(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A bounded memory (SEEN_IDS digests of 8 bytes a session): a repeat sent after more
    than that many later events of its session is applied again."""
    log = Log()
    records = [log(EventType.VIEW, "s1", item_id=ITEMS[k % 10]) for k in range(SEEN_IDS + 4)]
    await processor.process(records)
    session = await _session(redis_client, key_prefix, "s1")
    assert len(session[b"e"]) == SEEN_IDS * 8
    late = [Record(0, log.offset + k, r.key, r.value, r.timestamp_ms)
            for k, r in enumerate([records[0], records[-1]])]  # fmt: skip
    out = await processor.process(late)
    assert (out.applied, out.duplicates) == (1, 1)  # the oldest is forgotten, the last known


async def test_two_workers_racing_on_one_batch_apply_it_once(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    a, b = processor, second
    log = Log()
    records = [log(EventType.CLICK, "s1", item_id=ITEMS[k]) for k in range(20)]
    outs = await asyncio.gather(a.process(records), b.process(records))
    assert sum(o.applied for o in outs) == 20
    assert int((await _session(redis_client, key_prefix, "s1"))[b"n"]) == 20


async def test_consent_withdrawn_erases_and_blocks_until_given_again(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0], user_id="u1")])
    assert (await redis_client.exists(Keys(key_prefix).user("u1"))) == 1
    out = await processor.process([log(EventType.CONSENT, "s1", consent=False)])
    s = await _session(redis_client, key_prefix, "s1")
    assert set(s) == {b"o", b"p"}  # only the fence is left
    assert (await redis_client.exists(Keys(key_prefix).user("u1"))) == 0
    out = await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[1])])
    assert out.blocked == 1
    assert set(await _session(redis_client, key_prefix, "s1")) == {b"o", b"p"}
    await processor.process(
        [log(EventType.CONSENT, "s1", consent=True), log(EventType.CLICK, "s1", item_id=ITEMS[2])]
    )
    s = await _session(redis_client, key_prefix, "s1")
    assert s[b"r"] == ITEMS[2].encode()


async def _profile(redis: aioredis.Redis, key_prefix: str, uid: str) -> np.ndarray:
    fields = await _hash(redis, Keys(key_prefix).user(uid))
    now = int(time.time() * 1000)
    vector = user_profile(fields, CATALOG.space.dims, now, TUNING.user_half_life_ms)
    assert vector is not None
    return vector


async def test_identify_merges_the_session_into_the_user_profile(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[k]) for k in range(3)])
    await processor.process([log(EventType.IDENTIFY, "s1", user_id="u1")])
    keys = Keys(key_prefix)
    uv = await _profile(redis_client, key_prefix, "u1")
    session = await _session(redis_client, key_prefix, "s1")
    sv = from_bytes(session[b"v"], CATALOG.space.dims)
    assert sv is not None
    cos = float(uv @ sv / np.linalg.norm(uv) / np.linalg.norm(sv))
    assert cos > 0.999
    assert session[b"u"] == b"u1"
    assert await redis_client.smembers(keys.user_sessions("u1")) == {b"s1"}
    # Later events of the linked session keep feeding the profile.
    await processor.process([log(EventType.PURCHASE, "s1", item_id=ITEMS[9])])
    later = await _profile(redis_client, key_prefix, "u1")
    assert not np.allclose(later, uv)


async def test_erased_user_stays_erased_when_events_are_replayed(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:  # fmt: skip
    log = Log()
    keys = Keys(key_prefix)
    first = [log(EventType.VIEW, "s1", item_id=ITEMS[0], user_id="u1"),
             log(EventType.VIEW, "s2", item_id=ITEMS[1], user_id="u1")]  # fmt: skip
    await processor.process(first)
    assert await erase_user(redis_client, keys, "u1", TTLS.erasure_ms) == ["s1", "s2"]
    assert await redis_client.exists(keys.user("u1")) == 0
    # A replay re-publishes the old events as new messages (new offsets). The worker that
    # applied them still knows their ids; another (after a rebalance) finds the sessions
    # gone, ids and all, and the erasure's suppression record refuses them.
    replay = [Record(0, 100 + k, r.key, r.value, r.timestamp_ms) for k, r in enumerate(first)]
    again = await processor.process(replay)
    assert (again.applied, again.duplicates) == (0, 2)
    out = await second.process(replay)
    assert out.blocked == 2
    assert out.applied == 0
    for sid in ("s1", "s2"):
        assert b"v" not in await _session(redis_client, key_prefix, sid)
    assert await redis_client.exists(keys.user("u1")) == 0


async def test_covisitation_and_trending_are_counted_once(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    records = [log(EventType.VIEW, "s1", item_id=ITEMS[0]),
               log(EventType.VIEW, "s1", item_id=ITEMS[1]),
               log(EventType.VIEW, "s2", item_id=ITEMS[0]),
               log(EventType.CLICK, "s2", item_id=ITEMS[1])]  # fmt: skip
    await processor.process(records)
    keys = Keys(key_prefix)
    nxt = await _zset(redis_client, keys.covisit(ITEMS[0]))
    assert [m for m, _ in nxt] == [ITEMS[1].encode()]
    trending = await _zset(redis_client, keys.trending(), desc=True)
    assert trending[0][0] == ITEMS[1].encode()  # 1 view + 1 click beats 2 views
    await processor.process(records)
    assert await _zset(redis_client, keys.covisit(ITEMS[0])) == nxt


async def test_bad_events_are_dead_lettered_and_good_ones_still_flow(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    good = log(EventType.VIEW, "s1", item_id=ITEMS[0])
    bad = Record(0, 99, b"s1", b"{oops", 0)
    out = await processor.process([bad, good])
    assert [d.reason for d in out.dead] == ["bad_json"]
    assert out.applied == 1
    assert b"v" in await _session(redis_client, key_prefix, "s1")


async def _zset(
    redis: aioredis.Redis, key: str | bytes, desc: bool = False
) -> list[tuple[bytes, float]]:
    return cast(
        list[tuple[bytes, float]], await redis.zrange(key, 0, -1, desc=desc, withscores=True)
    )


async def _dump(redis: aioredis.Redis, key: bytes) -> object:
    kind = cast(bytes, await redis.type(key)).decode()
    if kind == "hash":
        return await _hash(redis, key)
    if kind == "zset":
        return await _zset(redis, key)
    return await redis.dump(key)


def _without_written_at(dumps: dict[bytes, object]) -> dict[bytes, object]:
    return {
        k: {f: v for f, v in d.items() if f != b"w"} if isinstance(d, dict) else d
        for k, d in dumps.items()
    }


async def test_a_session_moving_partition_still_applies(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """After a partition-count change a session's events arrive on another partition with
    unrelated offsets: they must apply (not conflict forever), and be fenced there."""
    first, second = Log(partition=0), Log(partition=3)
    first.offset = 500
    await processor.process([first(EventType.VIEW, "s1", item_id=ITEMS[0])])
    moved = [second(EventType.VIEW, "s1", item_id=ITEMS[1])]
    out = await processor.process(moved)
    assert out.applied == 1
    assert out.dead == []
    s = await _session(redis_client, key_prefix, "s1")
    assert (int(s[b"p"]), int(s[b"o"]), int(s[b"n"])) == (3, 0, 2)
    assert (await processor.process(moved)).duplicates == 1


async def test_sessions_of_one_user_on_two_workers_lose_no_update(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Two workers apply sessions of the same user at the same moment: the profile carries
    every session (each owns its fields, so neither can overwrite the other)."""
    a, b = processor, second
    log_a, log_b = Log(partition=0), Log(partition=1)
    for _ in range(5):
        await asyncio.gather(
            a.process([log_a(EventType.CLICK, "s1", item_id=ITEMS[0], user_id="u1")]),
            b.process(
                [
                    log_b(EventType.CLICK, "s2", item_id=ITEMS[1], user_id="u1"),
                    log_b(EventType.VIEW, "s3", item_id=ITEMS[2], user_id="u1"),
                ]
            ),
        )
    profile = await _profile(redis_client, key_prefix, "u1")
    sessions = [from_bytes((await _session(redis_client, key_prefix, s))[b"v"],
                           CATALOG.space.dims) for s in ("s1", "s2", "s3")]  # fmt: skip
    assert all(v is not None for v in sessions)
    expected = sum(v for v in sessions if v is not None)
    np.testing.assert_allclose(profile, expected, rtol=1e-3, atol=1e-5)
    for item in (ITEMS[0], ITEMS[1], ITEMS[2]):
        assert profile @ CATALOG.matrix[CATALOG.row[item]] > 0


async def test_a_redelivered_batch_repairs_a_missing_user_write(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A crash after the session write but before the user write: the redelivery finds the
    session already applied and still brings the profile up to date."""
    log = Log()
    records = [log(EventType.CLICK, "s1", item_id=ITEMS[0], user_id="u1")]
    await processor.process(records)
    await redis_client.delete(Keys(key_prefix).user("u1"))  # the lost write
    again = await processor.process(records)
    assert again.duplicates == 1
    assert await _profile(redis_client, key_prefix, "u1") is not None


async def test_the_owner_cache_yields_to_what_redis_holds(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The worker skips reading sessions it wrote last; if the key expired or was rewritten
    meanwhile, the fenced write is refused and the state read again."""
    log = Log()
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0])])
    assert processor.cache.get("s1") is not None
    await redis_client.delete(Keys(key_prefix).session("s1"))  # expired behind our back
    out = await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[1])])
    assert out.applied == 1
    assert out.conflicts == 1
    s = await _session(redis_client, key_prefix, "s1")
    assert int(s[b"n"]) == 1
    assert s[b"r"] == ITEMS[1].encode()


async def test_a_conflict_counts_each_event_once(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A batch whose write is refused for one session is planned again; the sessions the
        first attempt wrote or found erased are neither counted again as duplicates nor blocked
    twice."""
    log, sids = Log(), ("s1", "s2", "s3")
    await processor.process([log(EventType.VIEW, s, item_id=ITEMS[0]) for s in sids])
    await redis_client.delete(Keys(key_prefix).session("s1"))  # expired behind our back
    await erase_session(redis_client, Keys(key_prefix), "s3", TTLS.erasure_ms)
    out = await processor.process([log(EventType.CLICK, s, item_id=ITEMS[1]) for s in sids])
    assert (out.applied, out.blocked, out.duplicates) == (2, 1, 0)
    assert out.conflicts == 1


async def test_what_the_owner_cache_holds_is_what_a_read_of_redis_gives(
    processor: BatchProcessor, second: BatchProcessor
) -> None:
    """The cache keeps each session as the planner uses it, not as Redis returns it: for
    every kind of session (a vector, a cart, purchases, a user, no item events, consent
    withdrawn), the snapshot a batch starts from is the same from either."""
    log = Log()
    sessions: dict[str, list[tuple[EventType, str | None]]] = {
        "viewer": [(EventType.VIEW, ITEMS[0]), (EventType.CLICK, ITEMS[1])],
        "buyer": [(EventType.ADD_TO_CART, ITEMS[2]), (EventType.ADD_TO_CART, ITEMS[3]),
                  (EventType.ADD_TO_CART, ITEMS[5]), (EventType.REMOVE_FROM_CART, ITEMS[3]),
                  (EventType.PURCHASE, ITEMS[2])],
        "searcher": [(EventType.SEARCH, None)],
        "withdrawn": [(EventType.VIEW, ITEMS[4])],
    }  # fmt: skip
    records = [log(t, sid, item_id=item) for sid, seq in sessions.items() for t, item in seq]
    records.append(log(EventType.IDENTIFY, "viewer", user_id="u1"))
    records.append(log(EventType.CONSENT, "withdrawn", consent=False))
    other = Log(partition=1)  # its events moved there: two fences
    records.append(other(EventType.VIEW, "viewer", item_id=ITEMS[6]))
    out = await processor.process(records)
    assert (out.applied, out.blocked) == (len(records) - 2, 2)  # the withdrawn session's two
    names = list(sessions)
    cached, _, _ = await processor._read(names, [0, 1])
    second.cache.clear()
    read, _, _ = await second._read(names, [0, 1])
    assert (read["viewer"].partition, read["viewer"].partition2) == (1, 0)
    for sid in names:
        assert processor.cache.get(sid) is not None, sid
        a, b = cached[sid], read[sid]
        assert (a.vector is None) == (b.vector is None), sid
        if a.vector is not None and b.vector is not None:
            assert np.array_equal(a.vector, b.vector), sid
        a.vector = b.vector = None
        assert a == b, sid
    assert (read["buyer"].cart, read["buyer"].bought) == ([ITEMS[5]], [ITEMS[2]])
    assert (read["viewer"].user, read["viewer"].recent) == ("u1", [ITEMS[6], ITEMS[1], ITEMS[0]])
    assert read["withdrawn"].block == "consent"


async def test_a_session_whose_events_move_partition_still_knows_the_old_ones(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:  # fmt: skip
    """Partitions added to the clickstream topic move a session's key to another one. Its
    fence held one partition's offset: an event of the old partition redelivered after the
    session's first event on the new one (a crash or a rebalance before the commit)
    applied again. The fence of the partition it came from is kept beside it."""
    a, b = Log(partition=0), Log(partition=1)
    before = [a(EventType.VIEW, "s1", item_id=ITEMS[k]) for k in range(3)]
    assert (await processor.process(before)).applied == 3
    after = [b(EventType.VIEW, "s1", item_id=ITEMS[5])]
    assert (await processor.process(after)).applied == 1
    for worker in (processor, second):  # from the owner cache, then from a read of Redis
        assert (await worker.process(before)).duplicates == 3
        assert (await worker.process(after)).duplicates == 1
    # both partitions in one batch, and the old one's events after the new one's
    both = [b(EventType.VIEW, "s2", item_id=ITEMS[7]), a(EventType.VIEW, "s2", item_id=ITEMS[8])]
    assert (await processor.process(both)).applied == 2
    second.cache.clear()
    assert (await second.process(both)).duplicates == 2
    assert (await second.process([a(EventType.VIEW, "s2", item_id=ITEMS[9])])).applied == 1
    stored = await _session(redis_client, key_prefix, "s1")
    assert int(stored[b"n"]) == 4
    assert (int(stored[b"p"]), int(stored[b"p2"])) == (1, 0)
    # a third partition: the two latest are kept
    c = Log(partition=2)
    assert (await processor.process([c(EventType.VIEW, "s1", item_id=ITEMS[6])])).applied == 1
    assert (await second.process(after)).duplicates == 1
    stored = await _session(redis_client, key_prefix, "s1")
    assert (int(stored[b"p"]), int(stored[b"p2"]), int(stored[b"n"])) == (2, 1, 5)


async def test_the_landmark_moves_and_each_aggregate_set_follows_it_at_its_next_write(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Scores are whole units. With 1 s half-lives, 300 s of events is 300 half-lives: the
    landmark moves; a set the next batch writes is first scaled to it (what decays to less
    than a unit goes), a set it does not write keeps its scores and its own landmark until
    it is written, and the latent model's read puts it on the current landmark meanwhile."""
    fast = Tuning(1_800_000, 86_400_000, covisit_half_life_ms=2_000, trending_half_life_ms=1_000)
    processor = BatchProcessor(redis_client, Keys(key_prefix), CATALOG, fast, TTLS)
    keys = Keys(key_prefix)
    try:
        log = Log()
        log.t0 -= 600_000
        await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                                 log(EventType.VIEW, "s1", item_id=ITEMS[1])])  # fmt: skip
        old = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
        ((_, before),) = old_pair = await _zset(redis_client, keys.covisit(ITEMS[0]))
        assert before == int(before) > 0
        log.t0 += 300_000
        await processor.process([log(EventType.VIEW, "s2", item_id=ITEMS[2]),
                                 log(EventType.VIEW, "s2", item_id=ITEMS[3])])  # fmt: skip
        landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
        assert landmark > old + 250_000
        trending = await _zset(redis_client, keys.trending(), desc=True)
        # The old views were scaled by 2^-300: nothing left of them.
        assert [m for m, _ in trending] == [ITEMS[3].encode(), ITEMS[2].encode()]
        assert all(score == int(score) and 0 < score < 2**52 for _, score in trending)
        assert await redis_client.pttl(keys.trending()) > 0

        # Not written since the move: as it was, on its own landmark ...
        assert await _zset(redis_client, keys.covisit(ITEMS[0])) == old_pair
        assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == old
        rows = await read_covisitation(redis_client, keys, fast.covisit_half_life_ms)
        scaled = before * 2.0 ** ((old - landmark) / fast.covisit_half_life_ms)
        assert rows[ITEMS[0]][ITEMS[1]] == pytest.approx(scaled, rel=1e-9)
        ((_, fresh),) = await _zset(redis_client, keys.covisit(ITEMS[2]))
        assert rows[ITEMS[2]] == {ITEMS[3]: fresh}
        # ... until a write touches it.
        await processor.process([log(EventType.VIEW, "s3", item_id=ITEMS[0]),
                                 log(EventType.VIEW, "s3", item_id=ITEMS[4])])  # fmt: skip
        after = await _zset(redis_client, keys.covisit(ITEMS[0]))
        assert [m for m, _ in after] == [ITEMS[4].encode()]
        assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark
    finally:
        await processor.aclose()


async def test_a_set_a_worker_wrote_is_still_scaled_when_another_worker_moved_the_landmark(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A worker skips checking the landmark of sets it wrote at the current one; when
    another worker moved it meanwhile, its write is refused, and the retry checks and
    scales the set."""
    fast = Tuning(1_800_000, 86_400_000, covisit_half_life_ms=10_000, trending_half_life_ms=1_000)
    keys = Keys(key_prefix)
    mine = BatchProcessor(redis_client, keys, CATALOG, fast, TTLS)
    other = BatchProcessor(redis_client, keys, CATALOG, fast, TTLS)
    try:
        log, theirs = Log(partition=0), Log(partition=1)
        for _ in range(2):  # the second write of the set skips the check
            await mine.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                                log(EventType.VIEW, "s1", item_id=ITEMS[1]),
                                log(EventType.VIEW, "s4", item_id=ITEMS[7])])  # fmt: skip
        old = await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0]))
        ((_, before),) = await _zset(redis_client, keys.covisit(ITEMS[0]))
        theirs.t0 = log.t0 + 25_000  # 25 trending half-lives on: the other worker moves it
        await other.process([theirs(EventType.VIEW, "s2", item_id=ITEMS[5])])
        landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
        assert landmark > old + 20_000
        # s4, whose state this worker wrote (nothing to read first), 7 s after the old
        # landmark: no reason to move it itself
        out = await mine.process([log(EventType.VIEW, "s4", item_id=ITEMS[0])])
        assert out.conflicts >= 1
        after = dict(await _zset(redis_client, keys.covisit(ITEMS[0])))
        scaled = before * 2.0 ** ((old - landmark) / fast.covisit_half_life_ms)
        assert after[ITEMS[1].encode()] == pytest.approx(scaled, abs=0.5)
        assert ITEMS[7].encode() in after
        assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark
    finally:
        await mine.aclose()
        await other.aclose()


async def test_a_set_written_before_whole_units_is_scaled_to_them_by_its_next_write(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """An earlier version stored scores in event weights and recorded no landmark per set:
    the latent read and the next write both take such a set as on the current landmark,
    in weights, so it keeps its share instead of counting a thousandth as much."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s0", item_id=ITEMS[9])])  # sets L
    await redis_client.zadd(keys.covisit(ITEMS[0]), {ITEMS[1]: 2.5, ITEMS[2]: 0.25})
    rows = await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms)
    assert rows[ITEMS[0]] == {ITEMS[1]: 2500.0, ITEMS[2]: 250.0}
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                             log(EventType.VIEW, "s1", item_id=ITEMS[3])])  # fmt: skip
    after = dict(await _zset(redis_client, keys.covisit(ITEMS[0])))
    assert after[ITEMS[1].encode()] == 2500.0
    assert after[ITEMS[2].encode()] == 250.0
    assert 900 < after[ITEMS[3].encode()] < 1100  # one forward co-visit, about now
    landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
    assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark


async def _landmark_of(redis: aioredis.Redis, keys: Keys, key: str) -> int:
    return int(cast(bytes, await redis.hget(keys.agg_landmarks, key)))


async def _aggregates(redis: aioredis.Redis, prefix: str) -> dict[str, dict[str, float]]:
    """Every co-visitation and trending set under `prefix`, by key suffix."""
    out: dict[str, dict[str, float]] = {}
    base = f"{prefix}:{{agg}}:"
    async for key in redis.scan_iter(match=f"{base}*"):
        name = key.decode()[len(base) :]
        if name.startswith(("cv:", "tr")):
            out[name] = {m.decode(): s for m, s in await _zset(redis, key)}
    return out


def _assert_same_aggregates(
    got: dict[str, dict[str, float]], want: dict[str, dict[str, float]]
) -> None:
    assert sorted(got) == sorted(want)
    for name, members in want.items():
        assert sorted(got[name]) == sorted(members), name
        for m, score in members.items():  # each write rounds to whole units: ±0.5 a write
            assert got[name][m] == pytest.approx(score, abs=2.0), (name, m)


def _shopping(log: Log, n: int) -> list[Record]:
    """n opens by four sessions, interleaved, on one partition."""
    return [log(EventType.VIEW if k % 3 else EventType.CLICK, f"s{k % 4}",
                item_id=ITEMS[(7 * k) % 40]) for k in range(n)]  # fmt: skip


async def test_a_large_batch_writes_its_aggregates_in_chunks_that_add_up_to_one_write(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """One partition's events go to Redis in scripts of AGGREGATE_CHUNK events (so none
    holds Redis for a whole batch), and they count what one script would have."""
    records = _shopping(Log(), 30)
    whole = BatchProcessor(redis_client, Keys(f"{key_prefix}-whole"), CATALOG, TUNING, TTLS)
    try:
        await whole.process(records)
        monkeypatch.setattr(processor_module, "AGGREGATE_CHUNK", 8)
        scripts: list[int] = []
        real = processor.batches.execute

        async def counting(commands: Any) -> list[Any]:
            sha = processor._sha.get("APPLY_AGGREGATES")  # none while it loads its scripts
            scripts.append(sum(1 for c in commands if c[1] == sha))
            return await real(commands)

        monkeypatch.setattr(processor.batches, "execute", counting)
        await processor.process(records)
        assert max(scripts) == 4  # 30 events: 8 + 8 + 8 + 6
        _assert_same_aggregates(await _aggregates(redis_client, key_prefix),
                                await _aggregates(redis_client, f"{key_prefix}-whole"))  # fmt: skip
        assert (await processor.process(records)).duplicates == 30
        _assert_same_aggregates(await _aggregates(redis_client, key_prefix),
                                await _aggregates(redis_client, f"{key_prefix}-whole"))  # fmt: skip
    finally:
        await whole.aclose()


async def test_a_batch_cut_off_between_its_writes_is_counted_once_when_redelivered_longer(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Only the first aggregate chunk of a batch reached Redis (the worker died): its
    sessions are not applied, the aggregates' fence is past the chunk. The redelivery,
    which now holds more events, counts each event once, and co-visitation pairs the first
    new events with the items the cut-off batch opened before them, as one clean write
    does."""
    log = Log()
    records = _shopping(log, 24)
    more = records + _shopping(log, 8)
    whole = BatchProcessor(redis_client, Keys(f"{key_prefix}-whole"), CATALOG, TUNING, TTLS)
    try:
        await whole.process(more)
        monkeypatch.setattr(processor_module, "AGGREGATE_CHUNK", 8)
        real = processor.batches.execute

        async def dies_after_the_first_script(commands: Any) -> list[Any]:
            if any(c[1] == processor._sha.get("APPLY_AGGREGATES") for c in commands):
                monkeypatch.setattr(processor.batches, "execute", real)
                await real(commands[:1])
                raise RedisConnectionError("worker died mid-pipeline")
            return await real(commands)

        await processor.load_scripts()
        monkeypatch.setattr(processor.batches, "execute", dies_after_the_first_script)
        with pytest.raises(RedisConnectionError):
            await processor.process(records)
        assert await redis_client.exists(Keys(key_prefix).session("s0")) == 0
        out = await processor.process(more)
        assert out.applied == 32
        _assert_same_aggregates(await _aggregates(redis_client, key_prefix),
                                await _aggregates(redis_client, f"{key_prefix}-whole"))  # fmt: skip
    finally:
        await whole.aclose()


async def test_a_session_whose_fields_something_else_wrote_takes_its_next_event(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Fields that do not parse (a count or a fence that is not a number, recent items that
    are not UTF-8) are left out of the state the event applies to, not the event refused:
    every later event of the session would have gone to the dead letters. The write's
    compare-and-set takes a stored fence that is not a number as none, as the read does."""
    key = Keys(key_prefix).session("garbled")
    garbage = {"n": "three", "lt": "", "r": b"\xff " + ITEMS[5].encode(), "o": " 7"}
    await redis_client.hset(key, mapping=garbage)  # type: ignore[arg-type]
    log = Log()
    out = await processor.process([log(EventType.VIEW, "garbled", item_id=ITEMS[0])])
    assert out.applied == 1
    assert not out.dead
    s = await _session(redis_client, key_prefix, "garbled")
    assert int(s[b"n"]) == 1  # counted from zero
    assert s[b"o"] == b"0"  # the event's offset: a fence again
    assert s[b"r"].decode().split()[:2] == [ITEMS[0], "\ufffd"]  # the rest kept as it came
    assert from_bytes(s[b"v"], CATALOG.space.dims) is not None


async def test_session_keys_of_another_type_are_replaced_not_every_event_refused(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A session's keys holding another Redis type than the worker writes fail every
    command on them: the worker deletes them (counted) and applies the events to a fresh
    session, whether it finds them on its first read or after it has cached the session."""
    keys = Keys(key_prefix)
    await redis_client.set(keys.session("s1"), "not a hash")
    await redis_client.rpush(keys.impressions("s1"), "not", "a", "hash")
    await redis_client.hset(keys.session_block("s1"), "not", "a string")
    log = Log()
    out = await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                                   log(EventType.IMPRESSION, "s1", item_id=ITEMS[1])])  # fmt: skip
    assert (out.applied, out.repaired, out.dead) == (2, 3, [])
    assert int((await _session(redis_client, key_prefix, "s1"))[b"n"]) == 2
    assert await redis_client.hgetall(keys.impressions("s1")) == {ITEMS[1].encode(): b"1"}
    assert await redis_client.exists(keys.session_block("s1")) == 0
    # Cached by this worker, then overwritten: the write's fence check sees another type,
    # the re-read replaces it.
    await redis_client.set(keys.session("s1"), "not a hash")
    out = await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[2])])
    assert (out.applied, out.repaired, out.conflicts) == (1, 1, 1)
    assert int((await _session(redis_client, key_prefix, "s1"))[b"n"]) == 1
    # An impressions key of another type, or a count that is not a number, starts again.
    await redis_client.set(keys.impressions("s1"), "not a hash")
    await processor.process([log(EventType.IMPRESSION, "s1", item_id=ITEMS[1])])
    await redis_client.hset(keys.impressions("s1"), ITEMS[1], "many")
    await processor.process([log(EventType.IMPRESSION, "s1", item_id=ITEMS[1])])
    assert await redis_client.hgetall(keys.impressions("s1")) == {ITEMS[1].encode(): b"1"}
    assert int((await _session(redis_client, key_prefix, "s1"))[b"n"]) == 3


async def test_user_keys_of_another_type_are_replaced_and_erasure_still_erases(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    await redis_client.set(keys.user("u1"), "not a hash")
    await redis_client.set(keys.user_sessions("u1"), "not a set")
    log = Log()
    out = await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0], user_id="u1")])
    assert (out.applied, out.dead) == (1, [])
    assert await redis_client.smembers(keys.user_sessions("u1")) == {b"s1"}
    await _profile(redis_client, key_prefix, "u1")  # a profile, from this write
    # A user hash with a count and a time that are not numbers takes the next write too.
    await redis_client.hset(keys.user("u1"), mapping={"n:s1": "x", "t:s1": "y"})
    out = await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[1])])
    assert (out.applied, out.dead) == (1, [])
    assert int((await _hash(redis_client, keys.user("u1")))[b"n:s1"]) == 2
    # Erasure, whatever the keys hold.
    await redis_client.set(keys.session("s1"), "not a hash")
    await redis_client.set(keys.user_sessions("u1"), "not a set")
    assert await erase_user(redis_client, keys, "u1", TTLS.erasure_ms) == []
    await erase_session(redis_client, keys, "s1", TTLS.erasure_ms)
    assert await redis_client.get(keys.session_block("s1")) == b"erased"
    assert await redis_client.get(keys.user_block("u1")) == b"erased"
    assert await redis_client.exists(keys.user("u1"), keys.user_sessions("u1")) == 0
    replay = await processor.process([log(EventType.CLICK, "s1", item_id=ITEMS[2])])
    assert (replay.applied, replay.blocked) == (0, 1)


async def test_a_session_named_like_a_user_cannot_touch_that_users_consent(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Session ids may hold ':' (events.ID_PATTERN), and a user's keys are tagged {u:<id>}:
    the session "u:alice" must not share a key with the user "alice". It shared the block:
    anyone could lift alice's withdrawn consent with a consent event of that session, or
    withdraw it for her."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0], user_id="alice")])
    await processor.process([log(EventType.CONSENT, "s1", consent=False)])
    assert await redis_client.get(keys.user_block("alice")) == b"consent"
    out = await processor.process([log(EventType.CONSENT, "u:alice", consent=True),
                                   log(EventType.VIEW, "u:alice", item_id=ITEMS[1])])  # fmt: skip
    assert out.applied == 2  # the stranger's own session is a session like any other
    assert await redis_client.get(keys.user_block("alice")) == b"consent"
    await processor.process([log(EventType.VIEW, "s2", item_id=ITEMS[2], user_id="bob")])
    await processor.process([log(EventType.CONSENT, "u:bob", consent=False)])
    assert await redis_client.exists(keys.user_block("bob")) == 0
    await _profile(redis_client, key_prefix, "bob")  # bob's profile stands


async def test_user_blocks_under_their_old_key_are_carried_over_once_before_any_write(
    processor: BatchProcessor,
    second: BatchProcessor,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    """A user's block moved from {u:<id>}:x to {u:<id>}:ux: an erasure or a withdrawn
    consent stored by an earlier version still holds (stream_engine/migrations.py)."""
    keys = Keys(key_prefix)

    def old(uid: str) -> str:
        return f"{key_prefix}:{{u:{uid}}}:x"

    await redis_client.set(old("carol"), "erased", px=3_600_000)
    await redis_client.set(old("dave"), "consent")
    await redis_client.set(keys.user_block("erin"), "erased")
    await redis_client.set(old("erin"), "consent")  # does not lift a newer erasure
    await redis_client.set(keys.user_block("fay"), "consent")
    await redis_client.set(old("fay"), "erased")  # an erasure is never lost
    log = Log()
    views = [log(EventType.VIEW, f"s{k}", item_id=ITEMS[k], user_id=u)
             for k, u in enumerate(("carol", "dave"))]  # fmt: skip
    await processor.process(views)
    blocks = [await redis_client.get(keys.user_block(u)) for u in ("carol", "dave", "erin", "fay")]
    assert blocks == [b"erased", b"consent", b"erased", b"erased"]
    assert 0 < await redis_client.pttl(keys.user_block("carol")) <= 3_600_000
    assert await redis_client.exists(keys.user("carol"), keys.user("dave")) == 0  # no profile
    # Once: what an earlier version could not have written is not looked for again.
    await redis_client.set(old("gus"), "erased")
    await second.process([log(EventType.VIEW, "s3", item_id=ITEMS[2], user_id="gus")])
    assert await redis_client.exists(keys.user_block("gus")) == 0


@pytest.mark.parametrize("which", ["trending", "covisit", "fence", "meta", "landmarks"])
async def test_an_aggregate_key_of_another_type_is_replaced_not_the_whole_stream_refused(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str, which: str
) -> None:
    """Every view and click writes the aggregates: one of their keys holding another type
    (written by something else) failed every batch's script, and every event of the whole
    stream went to the dead letters, one at a time."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s0", item_id=ITEMS[5])])  # keys exist
    key = {"trending": keys.trending(), "covisit": keys.covisit(ITEMS[0]),
           "fence": keys.agg_fence, "meta": keys.agg_meta,
           "landmarks": keys.agg_landmarks}[which]  # fmt: skip
    await redis_client.delete(key)
    await redis_client.rpush(key, "not", "a", "hash", "or", "zset")
    processor.cache.clear()
    records = [log(EventType.VIEW, "s1", item_id=ITEMS[0]),
               log(EventType.VIEW, "s1", item_id=ITEMS[1]),
               log(EventType.CLICK, "s2", item_id=ITEMS[1])]  # fmt: skip
    out = await processor.process(records)
    assert (out.applied, out.dead) == (3, [])
    assert out.repaired == (which in ("fence", "meta"))  # by the read; the rest in the script
    assert [m for m, _ in await _zset(redis_client, keys.covisit(ITEMS[0]))] == [ITEMS[1].encode()]
    assert (await _zset(redis_client, keys.trending(), desc=True))[0][0] == ITEMS[1].encode()


async def test_a_landmark_mark_that_is_no_number_is_the_current_landmark_not_a_refusal(
    processor: BatchProcessor, second: BatchProcessor, redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:  # fmt: skip
    """A set's landmark record holding something else than a number (written by something
    else) failed the aggregate script's arithmetic, and with it every batch that touched
    the set; the latent read failed on it too."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                             log(EventType.VIEW, "s1", item_id=ITEMS[1])])  # fmt: skip
    before = dict(await _zset(redis_client, keys.covisit(ITEMS[0])))
    await redis_client.hset(keys.agg_landmarks, keys.covisit(ITEMS[0]), "yesterday")
    rows = await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms)
    assert rows[ITEMS[0]] == {ITEMS[1]: before[ITEMS[1].encode()]}  # as on the landmark
    # another worker's processor: it has not written the set, so it checks the record
    out = await second.process([log(EventType.VIEW, "s2", item_id=ITEMS[0]),
                                log(EventType.VIEW, "s2", item_id=ITEMS[2])])  # fmt: skip
    assert (out.applied, out.dead) == (2, [])
    after = dict(await _zset(redis_client, keys.covisit(ITEMS[0])))
    assert after[ITEMS[1].encode()] == before[ITEMS[1].encode()]  # kept, unscaled
    assert ITEMS[2].encode() in after
    landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
    assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark


async def test_a_landmark_record_of_another_type_is_replaced_and_its_sets_still_follow_moves(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """{agg}:lk of another type was read as "every set on the current landmark" but never
    replaced: every write refreshed its TTL, so no set got a mark again, and after the
    next landmark move sets not written since kept scores of the old one, inflated against
    fresh ones. Replaced, it records the landmark the unmarked sets are on; after a move,
    the latent read and the next write scale them from there, not as sets of before whole
    units (x1000)."""
    fast = Tuning(1_800_000, 86_400_000, covisit_half_life_ms=10_000, trending_half_life_ms=1_000)
    keys = Keys(key_prefix)
    workers = [BatchProcessor(redis_client, keys, CATALOG, fast, TTLS) for _ in range(3)]
    try:
        log = Log(partition=0)
        await workers[0].process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                                  log(EventType.VIEW, "s1", item_id=ITEMS[1])])  # fmt: skip
        ((_, before),) = await _zset(redis_client, keys.covisit(ITEMS[0]))
        old = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
        await redis_client.delete(keys.agg_landmarks)
        await redis_client.rpush(keys.agg_landmarks, "not", "a", "hash")
        # a worker that wrote no set checks the marks, and replaces the record
        out = await workers[1].process([log(EventType.VIEW, "s2", item_id=ITEMS[5]),
                                        log(EventType.VIEW, "s2", item_id=ITEMS[6])])  # fmt: skip
        assert (out.applied, out.dead) == (2, [])
        assert await redis_client.type(keys.agg_landmarks) == b"hash"
        assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[5])) == old
        assert await redis_client.hget(keys.agg_landmarks, keys.covisit(ITEMS[0])) is None
        read = await read_covisitation(redis_client, keys, fast.covisit_half_life_ms)
        assert read[ITEMS[0]] == {ITEMS[1]: before}  # unmarked, on the landmark
        # 25 trending half-lives on, another worker moves the landmark
        later = Log(partition=1)
        later.t0 = log.t0 + 25_000
        await workers[2].process([later(EventType.VIEW, "s3", item_id=ITEMS[7])])
        landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
        assert landmark > old + 20_000
        scaled = before * 2.0 ** ((old - landmark) / fast.covisit_half_life_ms)
        read = await read_covisitation(redis_client, keys, fast.covisit_half_life_ms)
        assert read[ITEMS[0]][ITEMS[1]] == pytest.approx(scaled, rel=1e-9)
        out = await workers[2].process([later(EventType.VIEW, "s3", item_id=ITEMS[0]),
                                        later(EventType.VIEW, "s3", item_id=ITEMS[2])])  # fmt: skip
        assert (out.applied, out.dead) == (2, [])
        after = dict(await _zset(redis_client, keys.covisit(ITEMS[0])))
        assert after[ITEMS[1].encode()] == pytest.approx(scaled, abs=0.5)
        assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark
    finally:
        for worker in workers:
            await worker.aclose()


async def test_the_latent_read_takes_aggregate_keys_of_another_type_as_the_worker_does(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The learner read every co-visitation key in one pipeline that raised on the first
    error reply: one key of another type under the prefix, or a landmark hash of another
    type, failed every round, and no model was learned again."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                             log(EventType.VIEW, "s1", item_id=ITEMS[1])])  # fmt: skip
    read = await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms)
    assert read[ITEMS[0]] == {ITEMS[1]: (await _zset(redis_client, keys.covisit(ITEMS[0])))[0][1]}
    await redis_client.set(keys.covisit(ITEMS[5]), "not a sorted set")
    assert await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms) == read
    await redis_client.delete(keys.agg_landmarks)
    await redis_client.rpush(keys.agg_landmarks, "not", "a", "hash")
    # every set on the landmark, as the script reads it
    assert await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms) == read
    await redis_client.delete(keys.agg_meta)
    await redis_client.rpush(keys.agg_meta, "not", "a", "hash")
    assert await read_covisitation(redis_client, keys, TUNING.covisit_half_life_ms) == read


@pytest.mark.parametrize("field", ["landmark", "fence"])
async def test_an_aggregate_landmark_or_fence_that_is_no_number_is_replaced_not_refused(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str, field: str
) -> None:
    """The worker reads a landmark or a partition's fence that is not a number as none and
    writes its own; the script took it for another worker's and refused every batch as a
    conflict: each failed after five attempts ("still conflicting"), and every event of
    the stream went to the dead letters, one at a time."""
    keys = Keys(key_prefix)
    log = Log()
    await processor.process([log(EventType.VIEW, "s0", item_id=ITEMS[5])])
    if field == "landmark":
        await redis_client.hset(keys.agg_meta, "L", "garbage")
    else:
        await redis_client.hset(keys.agg_fence, str(log.partition), "garbage")
    processor.cache.clear()
    out = await processor.process([log(EventType.VIEW, "s1", item_id=ITEMS[0]),
                                   log(EventType.VIEW, "s1", item_id=ITEMS[1])])  # fmt: skip
    assert (out.applied, out.dead) == (2, [])
    landmark = int(cast(bytes, await redis_client.hget(keys.agg_meta, "L")))
    assert abs(landmark - log.t0) < 3_600_000  # the worker's own, about the events' time
    assert [m for m, _ in await _zset(redis_client, keys.covisit(ITEMS[0]))] == [ITEMS[1].encode()]
    assert await _landmark_of(redis_client, keys, keys.covisit(ITEMS[0])) == landmark


async def test_fences_hold_per_incarnation_of_the_topic(
    processor: BatchProcessor, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A recreated topic (or another cluster) numbers its offsets from 0 again: the fences
    of the old one must not take its events for ones applied, in the session or the
    aggregates; within one incarnation a redelivery still changes nothing, and fences from
    before incarnations were known (or while the topic's id can't be read) still hold."""
    keys = Keys(key_prefix)
    old = Log()
    first = [old(EventType.VIEW, "s1", item_id=ITEMS[k]) for k in range(10)]
    await processor.process(first)
    trending = await redis_client.zscore(keys.trending(), ITEMS[9])
    processor.adopt_incarnation(incarnation_tag("topic-id-1"))
    assert (await processor.process(first[-1:])).duplicates == 1  # a fence of before tags
    assert await redis_client.zscore(keys.trending(), ITEMS[9]) == trending
    more = [old(EventType.VIEW, "s1", item_id=ITEMS[0])]
    assert (await processor.process(more)).applied == 1
    assert (await processor.process(more)).duplicates == 1
    # the untagged fence it replaced could never be compared again: not kept as a second
    assert b"o2" not in await _session(redis_client, key_prefix, "s1")
    trending = await redis_client.zscore(keys.trending(), ITEMS[1])
    processor.adopt_incarnation(incarnation_tag("topic-id-2"))
    new = Log()  # offsets from 0 again
    records = [new(EventType.VIEW, "s1", item_id=ITEMS[1]) for _ in range(3)]
    out = await processor.process(records)
    assert (out.applied, out.duplicates) == (3, 0)
    assert (await processor.process(records)).duplicates == 3
    assert b"o2" not in await _session(redis_client, key_prefix, "s1")  # nor the old topic's
    assert int((await _session(redis_client, key_prefix, "s1"))[b"n"]) == 14
    assert (await redis_client.zscore(keys.trending(), ITEMS[1]) or 0) > (trending or 0)
    processor.adopt_incarnation(0)  # the id unreadable: partitions alone are compared
    assert (await processor.process(records)).duplicates == 3
