"""Pure batch planning: from validated events and a snapshot of state, the writes to make.

No I/O here: `plan_batch` takes what the store read and returns what it must write, so the
rules (fences, consent, cart, recent items, co-visitation) are unit-testable without Redis.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import blake2b

import numpy as np

from stream_engine.catalog import CATEGORY_SEP, Catalog, Vector
from stream_engine.events import Event, EventType
from stream_engine.vectors import DEFAULT_WEIGHTS, fold_events, fold_many, fold_one, to_bytes

RECENT_MAX = 20
BOUGHT_MAX = 50
CART_MAX = 100
COVISIT_WINDOW = 4
SMALL_FOLD = 2  # sessions; up to this many are folded one by one
OPENS = frozenset({EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE})
TREND_WEIGHTS = {t: w for t, w in DEFAULT_WEIGHTS.items() if w > 0}
# A session remembers the ids of its last SEEN_IDS events (8-byte digests, field "e"): an
# event sent again under the same id at another offset (a tracker's or a browser's retry,
# a producer without idempotence) is a duplicate, as a redelivery at the same offset is.
SEEN_IDS = 16
DIGEST = 8


@dataclass(frozen=True, slots=True)
class Positioned:
    """A valid event and where it sits in Kafka."""

    event: Event
    partition: int
    offset: int
    produced_ms: int


@dataclass(slots=True)
class SessionSnapshot:
    fence: int | None = None
    partition: int | None = None
    vector: Vector | None = None
    vector_ts: int | None = None
    count: int = 0
    user: str | None = None
    recent: list[str] = field(default_factory=list)
    cart: list[str] = field(default_factory=list)
    bought: list[str] = field(default_factory=list)
    last_ts: int = 0
    block: str | None = None
    # The fence on the partition the session's events came from before (o2, p2): kept
    # when its events move to another partition (partitions added to the topic, or the
    # topic created again), so that a redelivery from the old one is still recognised.
    fence2: int | None = None
    partition2: int | None = None
    seen: bytes = b""  # the digests of its last SEEN_IDS event ids (unseen)

    def is_new(self, p: Positioned, tag: int = 0) -> bool:
        """Whether this session's fences leave `p` to apply (is_new, on both)."""
        return is_new(self.fence, self.partition, p, tag, self.fence2, self.partition2)


@dataclass(frozen=True, slots=True)
class Tuning:
    session_half_life_ms: float
    user_half_life_ms: float
    covisit_half_life_ms: float
    trending_half_life_ms: float


@dataclass(slots=True)
class SessionWrite:
    session_id: str
    expected_fence: int | None
    fence: int
    partition: int
    flags: str
    fields: dict[str, bytes | str | int]
    impressions: dict[str, int]
    applied: int  # events whose effect this write carries
    fence2: int | None = None  # the fence on the partition the session came from (is_new)
    partition2: int | None = None


@dataclass(slots=True)
class UserWrite:
    """A linked session's current state, copied into its user's profile."""

    user_id: str
    session_id: str
    count: int
    vector: bytes  # b"" while the session has no vector yet
    vector_ts: int


@dataclass(slots=True)
class AggregateWrite:
    partition: int
    expected_fence: int | None
    fence: int
    increments: dict[str, dict[str, float]]  # zset key suffix -> member -> increment
    landmark: int


@dataclass(slots=True)
class Plan:
    sessions: list[SessionWrite] = field(default_factory=list)
    users: list[UserWrite] = field(default_factory=list)
    user_blocks: list[tuple[str, bool]] = field(default_factory=list)  # (user, block?)
    aggregates: list[AggregateWrite] = field(default_factory=list)
    duplicates: int = 0
    unknown_items: int = 0


# A fence's partition also names the clickstream topic's incarnation it was taken on: the
# partition number in the low 16 bits, a tag of the topic's id above them (0: unknown, and
# what sessions written before tags carry). Kafka numbers a recreated topic's offsets, or a
# new cluster's after a migration, from 0 again: without the tag, the old fences took every
# event of the sessions they had seen for one already applied, until the sessions expired.
PARTITION_BITS = 16
PARTITION_MASK = (1 << PARTITION_BITS) - 1


def incarnation_tag(topic_id: str | None) -> int:
    """The tag of a topic id (Kafka's, as text); 0 when the id is unknown."""
    if not topic_id:
        return 0
    return (zlib.crc32(topic_id.encode()) & 0x7FFFFFFF) or 1


def tagged_partition(partition: int, tag: int) -> int:
    """The partition a fence is stored with (see PARTITION_BITS)."""
    return partition | (tag << PARTITION_BITS)


def _on(fence_partition: int, p: Positioned, tag: int) -> bool:
    """Whether a fence stored with `fence_partition` orders `p`'s offsets."""
    if tag == 0 or fence_partition <= PARTITION_MASK:
        return fence_partition & PARTITION_MASK == p.partition
    return fence_partition == p.partition | (tag << PARTITION_BITS)


def is_new(
    fence: int | None, fence_partition: int | None, p: Positioned, tag: int = 0,
    fence2: int | None = None, partition2: int | None = None,
) -> bool:  # fmt: skip
    """Whether a fence leaves `p` to apply. A fence only orders offsets of the partition,
    and the topic's incarnation, it was taken on; one of an unknown incarnation (written
    before tags, or while the topic's id could not be read) is taken as this one's, so
    that such a worker doubles nothing. A session keeps a second fence for the partition
    its events came from before (`fence2`): events of a redelivery there are old too."""
    if fence is not None and fence_partition is not None and _on(fence_partition, p, tag):
        return p.offset > fence
    if fence2 is not None and partition2 is not None:
        # Strictly its own incarnation: an untagged fence2 predates the tagged fence beside
        # it, and is left behind by a recreated topic like any other (unless the id is
        # unknown now: then, like the first fence, partitions alone are compared).
        mask = PARTITION_MASK if tag == 0 else -1
        if partition2 & mask == p.partition | (tag << PARTITION_BITS):
            return p.offset > fence2
    return True


def id_digest(event_id: str) -> bytes:
    return blake2b(event_id.encode(), digest_size=DIGEST).digest()


def unseen(
    events: Sequence[Positioned], seen: bytes
) -> tuple[list[Positioned], bytes, list[Positioned]]:
    """`events` (new by the fences, in order) split by their ids: (those no earlier event
    of the session had, the digests to remember after them, the repeats). ~1 µs an event:
    a search of at most 16 digests' bytes, no set built."""
    known = bytearray(seen)
    kept: list[Positioned] = []
    repeats: list[Positioned] = []
    for p in events:
        d = id_digest(p.event.event_id)
        at = known.find(d)
        while at >= 0 and at % DIGEST:  # a match across two digests is none
            at = known.find(d, at + 1)
        if at >= 0:
            repeats.append(p)
            continue
        known += d
        kept.append(p)
    return kept, bytes(known[-SEEN_IDS * DIGEST :]), repeats


def _fences_after(
    snap: SessionSnapshot, events: Sequence[Positioned], tag: int
) -> tuple[int, int, int | None, int | None]:
    """The session's fence and partition once `events` (new, in order) apply, and the
    fence of the partition it was on before, if its events moved: (fence, partition,
    fence2, partition2). Of more than two partitions, the two latest are kept. A fence of
    another incarnation of the topic, or of the same partition number, is not kept as the
    second: is_new would never compare an event with it (after an upgrade or a topic
    created again, every session would store one for nothing)."""
    last = events[-1]
    partition = tagged_partition(last.partition, tag)
    if (
        snap.fence2 is None
        and snap.partition in (None, partition)
        and all(p.partition == last.partition for p in events)
    ):  # the common case: one partition, never moved
        return last.offset, partition, None, None
    held: dict[int, int] = {}  # tagged partition -> fence, latest last
    for fence, part in ((snap.fence2, snap.partition2), (snap.fence, snap.partition)):
        if fence is not None and part is not None:
            held.pop(part, None)
            held[part] = fence
    for p in events:
        part = tagged_partition(p.partition, tag)
        held[part] = max(held.pop(part, p.offset), p.offset)
    *earlier, (partition, fence) = held.items()
    for partition2, fence2 in reversed(earlier):
        if (tag == 0 or partition2 >> PARTITION_BITS == tag) and (
            partition2 & PARTITION_MASK != partition & PARTITION_MASK
        ):
            return fence, partition, fence2, partition2
    return fence, partition, None, None


@dataclass(slots=True)
class SessionWalk:
    """The running state of one session while its new events are applied in order."""

    snap: SessionSnapshot
    flags: str = ""
    blocked: bool = False
    reset: bool = False
    user: str | None = None
    rows: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    impressions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    count: int = 0
    last_ts: int = 0
    consents: list[bool] = field(default_factory=list)  # the consent events, in order

    def consent(self, allowed: bool) -> None:
        self.consents.append(allowed)
        if allowed:
            if self.blocked or self.snap.block == "consent":
                self.flags += "U"
            self.blocked = False
            return
        # Withdrawn: everything so far is erased, and nothing is stored until it is given again.
        self.reset, self.blocked = True, True
        self.flags = "R"
        self.rows, self.ts, self.weights = [], [], []
        self.impressions.clear()
        snap = self.snap
        self.snap = SessionSnapshot(fence=snap.fence, partition=snap.partition,
                                    fence2=snap.fence2, partition2=snap.partition2)  # fmt: skip
        self.count = 0


def _apply_lists(walk: SessionWalk, e: Event) -> None:
    snap, item = walk.snap, e.item_id
    if item is None:
        return
    if e.type in OPENS:
        recent = snap.recent
        if item in recent:  # most opens are of items not in the list: no copy
            recent = [r for r in recent if r != item]
        snap.recent = [item, *recent[: RECENT_MAX - 1]]
    if e.type is EventType.ADD_TO_CART and item not in snap.cart:
        snap.cart = [*snap.cart, item][-CART_MAX:]
    elif e.type in (EventType.REMOVE_FROM_CART, EventType.PURCHASE):
        snap.cart = [c for c in snap.cart if c != item]
    if e.type is EventType.PURCHASE and item not in snap.bought:
        snap.bought = [item, *snap.bought][:BOUGHT_MAX]
    if e.type is EventType.IMPRESSION:
        walk.impressions[item] += 1


def plan_session(
    sid: str,
    events: Sequence[Positioned],
    snap: SessionSnapshot,
    catalog: Catalog,
    tuning: Tuning,
    now_ms: int,
    tag: int = 0,
) -> tuple[SessionWrite, SessionWalk, int]:
    """The write for one session's new events (already fence-filtered, in offset order),
    fenced on the topic's incarnation `tag` (is_new)."""
    walk = SessionWalk(snap=snap, blocked=snap.block == "consent", user=snap.user)
    unknown = 0
    for p in events:
        e = p.event
        walk.last_ts = max(walk.last_ts, e.ts)
        if e.type is EventType.CONSENT:
            walk.consent(bool(e.consent))
            continue
        if walk.blocked:
            continue
        walk.count += 1
        if e.user_id is not None:
            walk.user = e.user_id
        _apply_lists(walk, e)
        weight = DEFAULT_WEIGHTS.get(e.type)
        if weight is None or e.item_id is None:
            continue
        row = catalog.row.get(e.item_id)
        if row is None:
            unknown += 1
            continue
        walk.rows.append(row)
        walk.ts.append(e.ts)
        walk.weights.append(weight)
    if walk.blocked and "R" in walk.flags:
        walk.flags += "B"
    s = walk.snap
    fields: dict[str, bytes | str | int] = {
        "n": s.count + walk.count,
        "r": " ".join(s.recent),
        "c": " ".join(s.cart),
        "b": " ".join(s.bought),
        "lt": max(s.last_ts, walk.last_ts),
        "w": now_ms,
    }
    if not walk.rows and s.vector is not None:  # no item events: the vector stays as it was
        fields["v"] = to_bytes(s.vector)
        fields["t"] = int(s.vector_ts or 0)
    if walk.user is not None:
        fields["u"] = walk.user
    fence, partition, fence2, partition2 = _fences_after(snap, events, tag)
    if fence2 is not None and partition2 is not None:
        fields["o2"], fields["p2"] = fence2, partition2
    return (
        SessionWrite(
            session_id=sid,
            expected_fence=snap.fence,  # compare-and-set on what we read, whatever its partition
            fence=fence,
            partition=partition,
            flags=walk.flags,
            fields=fields,
            impressions=dict(walk.impressions),
            applied=len(events),
            fence2=fence2,
            partition2=partition2,
        ),
        walk,
        unknown,
    )


def fold_session_vectors(
    planned: Sequence[tuple[SessionWrite, SessionWalk]], catalog: Catalog, tuning: Tuning
) -> None:
    """Fold the item events of every planned session into its vector, in one numpy pass,
    and put the vector and its time into the session's write."""
    moving = [(w, walk) for w, walk in planned if walk.rows]
    if len(moving) <= SMALL_FOLD:
        # numpy's fixed costs make the batched pass slower than this for one or two
        # sessions (measured: 27 us vs 14 us for one; 0.5 us vs 8 us each for a hundred).
        for write, walk in moving:
            s = walk.snap
            if len(walk.rows) == 1:
                vector, t = fold_one(
                    s.vector, s.vector_ts, walk.ts[0], walk.weights[0],
                    catalog.matrix[walk.rows[0]], tuning.session_half_life_ms,
                )  # fmt: skip
                write.fields["v"], write.fields["t"] = to_bytes(vector), t
                continue
            start = s.vector if s.vector is not None else np.zeros(catalog.space.dims, np.float32)
            vector, t = fold_events(
                start, s.vector_ts if s.vector is not None else None,
                np.asarray(walk.ts, dtype=np.int64), np.asarray(walk.weights),
                catalog.matrix[walk.rows], tuning.session_half_life_ms,
            )  # fmt: skip
            write.fields["v"], write.fields["t"] = to_bytes(vector), t
        return
    dims = catalog.space.dims
    old = np.zeros((len(moving), dims), dtype=np.float32)
    old_ts = np.zeros(len(moving), dtype=np.int64)
    has_old = np.zeros(len(moving), dtype=np.bool_)
    owner, rows, ts, weights = [], [], [], []
    for i, (_, walk) in enumerate(moving):
        s = walk.snap
        if s.vector is not None and s.vector_ts is not None:
            old[i], old_ts[i], has_old[i] = s.vector, s.vector_ts, True
        owner += [i] * len(walk.rows)
        rows += walk.rows
        ts += walk.ts
        weights += walk.weights
    vectors, times = fold_many(
        old, old_ts, has_old, np.asarray(owner, dtype=np.int64), np.asarray(ts, dtype=np.int64),
        np.asarray(weights, dtype=np.float64), catalog.matrix[np.asarray(rows, dtype=np.int64)],
        tuning.session_half_life_ms,
    )  # fmt: skip
    for i, (write, _) in enumerate(moving):
        write.fields["v"] = to_bytes(vectors[i])
        write.fields["t"] = int(times[i])


def covisit_windows(recent: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Each session's recent items as far as co-visitation looks back (plan_aggregates)."""
    return {sid: items[:COVISIT_WINDOW] for sid, items in recent.items()}


def plan_aggregates(
    partition: int,
    events: Sequence[Positioned],
    windows: dict[str, list[str]],
    catalog: Catalog,
    landmark_ms: int,
    tuning: Tuning,
    counted_to: int | None = None,
) -> dict[str, dict[str, float]]:
    """Co-visitation (windowed, weighted by distance) and trending increments, forward-decayed.

    Scores are stored multiplied by 2^((t - landmark)/h), so a sorted set ranks by decayed
    value without ever being rewritten; readers divide by 2^((now - landmark)/h).

    `windows` (from covisit_windows) is carried through the events, in place, so the next
    chunk of a partition's events starts where this one ended. Events at or below
    `counted_to` (the aggregates' fence) were counted by an earlier write: they move the
    windows on and count nothing.
    """
    # Plain dicts and get(): defaultdict factories and copying the result back to dicts
    # were a third of this function's time. Only the first COVISIT_WINDOW recent items
    # matter here, so the windows carried through the batch are cut to that.
    inc: dict[str, dict[str, float]] = {}
    trend_all: dict[str, float] = {}
    cv_half, tr_half = tuning.covisit_half_life_ms, tuning.trending_half_life_ms
    for p in events:
        e = p.event
        item_id = e.item_id
        if item_id is None or e.type not in OPENS:
            continue
        window = windows.get(e.session_id, ())
        counted = counted_to is not None and p.offset <= counted_to
        if window and not counted:
            # float ** instead of np.exp2: a numpy scalar call costs ~1 µs, twice per event
            _covisit(inc, item_id, window, 2.0 ** ((e.ts - landmark_ms) / cv_half))
        windows[e.session_id] = [item_id, *[r for r in window if r != item_id]][:COVISIT_WINDOW]
        if counted:
            continue
        tr = TREND_WEIGHTS[e.type] * 2.0 ** ((e.ts - landmark_ms) / tr_half)
        trend_all[item_id] = trend_all.get(item_id, 0.0) + tr
        item = catalog.get(item_id)
        if item is not None:
            for key in _trend_keys(item.category):
                by_category = inc.get(key)
                if by_category is None:
                    by_category = inc[key] = {}
                by_category[item_id] = by_category.get(item_id, 0.0) + tr
    if trend_all:
        inc["tr"] = trend_all
    return inc


def _covisit(
    inc: dict[str, dict[str, float]], item_id: str, window: Sequence[str], scale: float
) -> None:
    """An opened item and each recent one before it, both ways (forward counts double)."""
    mine = inc.get(f"cv:{item_id}")
    if mine is None:
        mine = inc[f"cv:{item_id}"] = {}
    for d, prev in enumerate(window, start=1):
        if prev == item_id:
            continue
        forward = inc.get(f"cv:{prev}")
        if forward is None:
            forward = inc[f"cv:{prev}"] = {}
        forward[item_id] = forward.get(item_id, 0.0) + scale / d
        mine[prev] = mine.get(prev, 0.0) + 0.5 * scale / d
    if not mine:
        del inc[f"cv:{item_id}"]


@lru_cache(maxsize=4096)
def _trend_keys(category: tuple[str, ...]) -> tuple[str, ...]:
    """The per-category trending sets an item of `category` counts in (depths 1 and 2)."""
    return tuple(f"tr:{CATEGORY_SEP.join(category[:depth])}" for depth in (1, 2)
                 if len(category) >= depth)  # fmt: skip
