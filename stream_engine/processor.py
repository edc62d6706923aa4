"""One micro-batch of clickstream: validate, read state once, plan, write once, fenced.

Round trips per batch: one pipelined read of the sessions this worker didn't write last
(see OwnerCache) and of the aggregate fences, and one pipelined write of every fenced
script, both on the worker's own connection (store.Batches). A fence
conflict (another worker wrote after our read, e.g. during a rebalance) re-runs the batch;
the fences make the parts already written no-ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from stream_engine import state
from stream_engine._resp import aggregate_args, upkeep_due
from stream_engine.catalog import Catalog
from stream_engine.events import InvalidEvent, parse_event
from stream_engine.migrations import migrate
from stream_engine.planning import (
    DIGEST,
    AggregateWrite,
    Plan,
    Positioned,
    SessionSnapshot,
    SessionWalk,
    SessionWrite,
    Tuning,
    UserWrite,
    covisit_windows,
    fold_session_vectors,
    plan_aggregates,
    plan_session,
    unseen,
)
from stream_engine.state import Keys, fenced_on, stored_int, stored_text
from stream_engine.store import Batches, raise_error_reply, wrong_type
from stream_engine.vectors import from_bytes, to_bytes

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5
MAX_USER_SESSIONS = 32
# Aggregate scores are integers (state.AGG_UNIT), exact below 2^52. After 16 half-lives a
# fresh event adds 2^16 * AGG_UNIT ~ 6.6e7 units, which leaves room for a member with
# ~6.8e7 events' worth of decayed weight (an item viewed ~2,000 times a second for its
# whole trending half-life). Past 2^52 scores are still right, only stored as text again.
REBASE_AFTER_HALF_LIVES = 16
# One deadline per round trip (the connection carries no per-reply timer).
STORE_TIMEOUT_S = 5.0
# A partition's events per aggregate write. Redis runs one script at a time: a 500-event
# batch of one partition held it 5.2 ms on an idle box, 14-30 ms on a full one, and every
# decision's read waited behind it (loadtest/JOURNAL.md, session 18).
AGGREGATE_CHUNK = 128


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka message as the processor sees it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str


@dataclass(slots=True)
class Outcome:
    valid: list[Positioned] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    blocked: int = 0
    unknown_items: int = 0
    conflicts: int = 0
    repaired: int = 0  # keys of another type deleted (BatchProcessor._repair)
    written_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Ttls:
    session_ms: int
    user_ms: int
    aggregate_ms: int
    erasure_ms: int


# A session as this worker last wrote it: SessionSnapshot's fields in order, the vector
# as its stored bytes and the item lists as tuples (see OwnerCache).
Entry = tuple[
    int | None, int | None, bytes | None, int | None, int, str | None,
    tuple[str, ...], tuple[str, ...], tuple[str, ...], int, str | None, int | None, int | None,
    bytes,
]  # fmt: skip


class OwnerCache:
    """What this worker last wrote, per session and per partition's aggregates.

    Sessions are partition-affine, so the worker that owns a partition is normally the only
    writer of its sessions and can skip reading them back. Every write still compares the
    fence it expects: if anyone else wrote meanwhile (rebalance, erasure, TTL expiry, a
    flushed Redis), the write is refused, the entry dropped and the state read again.

    Entries are tuples of ints, strings, bytes and tuples of strings (`Entry`): the garbage
    collector stops tracking such tuples, so a full cache doesn't lengthen its pauses (a
    cache of snapshot objects raised the worker's p99 at 5,000 events/s from ~22 ms to
    ~110 ms). They hold the values as the planner uses them, not as Redis returns them:
    turning each write into bytes and each next batch's snapshot back from them was ~7%
    of a batch's CPU (loadtest/JOURNAL.md, session 24).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.sessions: OrderedDict[str, Entry] = OrderedDict()
        self.agg_fences: dict[int, int | None] = {}
        self.landmark: int | None = None

    def get(self, sid: str) -> Entry | None:
        entry = self.sessions.get(sid)
        if entry is not None:
            self.sessions.move_to_end(sid)
        return entry

    def put(self, sid: str, entry: Entry) -> None:
        if self.size <= 0:
            return
        self.sessions[sid] = entry
        self.sessions.move_to_end(sid)
        while len(self.sessions) > self.size:
            self.sessions.popitem(last=False)

    def drop(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def drop_aggregates(self) -> None:
        self.agg_fences.clear()
        self.landmark = None

    def clear(self) -> None:
        self.sessions.clear()
        self.drop_aggregates()


class AggregateUpkeep:
    """Which aggregate sorted sets a write also trims and re-expires, shared by a process's
    lanes.

    Checking the size (ZCARD, then ZREMRANGEBYRANK) and PEXPIRE on every set a batch
    touched were ~40% of the commands of an aggregate write in Redis. Now a set's size is
    checked once a quarter of `keep` increments went to it since the last check (so it may
    overshoot `keep` by that much between trims; readers take the first few), and its TTL
    refreshed once this process hasn't refreshed it for `refresh_ms` (≤ the TTL).

    The schedule is recorded when a write is planned, not when Redis acknowledges it:
    bookkeeping every set twice per batch cost ~6% of the worker's batch time. A write
    that Redis refused, or that failed, makes the processor forget everything instead.

    Forgetting is always safe: a set it doesn't know gets both at once. A set that expired
    is recreated by its first increment after the TTL, which is later than `refresh_ms`
    after the last refresh, so that same write gives it a TTL again; only a set deleted
    by hand runs without one, for at most `refresh_ms`.
    """

    MAX_KNOWN = 200_000  # past this many sets, start over (costs one check of each)

    def __init__(self, ttl_ms: int, refresh_ms: int = 60_000) -> None:
        self.refresh_ms = min(refresh_ms, max(1, ttl_ms // 4))
        self._expired_at: dict[str, int] = {}  # set -> when this process last set its TTL
        self._since_check: dict[str, int] = {}  # set -> increments sent since its last check

    def due(self, key: str, keep: int, increments: int, now_ms: int) -> tuple[int, bool]:
        """(keep to check now, or 0; whether to refresh the TTL now), recorded as done: if
        the write carrying them is not applied, call forget(). Compiled (_resp.pyx), as
        is `queue`, its loop over a write's sets."""
        return upkeep_due(self._since_check, self._expired_at, key, keep, increments, now_ms,
                          self.refresh_ms, self.MAX_KNOWN)  # fmt: skip

    def queue(
        self,
        keys: list[str],
        args: list[Any],
        increments: dict[str, dict[str, float]],
        prefix: str,
        settled: Container[str],
        now_ms: int,
        covisit: tuple[int, str],
        trending: tuple[int, str],
    ) -> None:
        """Each set of an aggregate write: its key, and its arguments of
        state.APPLY_AGGREGATES, scheduled as `due` schedules one (covisit and trending:
        (keep, half-life) of the "cv:" sets and of the others)."""
        aggregate_args(keys, args, increments, prefix, settled, self._since_check,
                       self._expired_at, now_ms, self.refresh_ms, self.MAX_KNOWN, *covisit,
                       *trending, state.AGG_UNIT)  # fmt: skip

    def forget(self) -> None:
        self._since_check.clear()
        self._expired_at.clear()


def entry_after(write: SessionWrite) -> Entry:
    """The session as it is once `write` has been applied (plan_session's fields)."""
    f = write.fields
    vector, user = f.get("v"), f.get("u")
    return (
        write.fence,
        write.partition,
        None if vector is None else bytes(vector),  # type: ignore[arg-type]
        None if vector is None else int(f["t"]),
        int(f["n"]),
        None if user is None else str(user),
        tuple(str(f["r"]).split()),
        tuple(str(f["c"]).split()),
        tuple(str(f["b"]).split()),
        int(f["lt"]),
        None,
        write.fence2,
        write.partition2,
        bytes(f.get("e", b"")),  # type: ignore[arg-type]
    )


def _fence_only(write: SessionWrite) -> Entry:
    """A session whose consent was withdrawn: only its fence is kept (APPLY_SESSION drops
    the one of its earlier partition)."""
    return (write.fence, write.partition, None, None, 0, None, (), (), (), 0, "consent",
            None, None, b"")  # fmt: skip


class StoreRegressed(Exception):
    """Redis holds less of a partition than this worker wrote to it: its aggregates' fence
    is at `stored` where this worker had written through `through` (a failover that lost
    what the old primary had not replicated; a restart from an older snapshot or an
    `appendfsync everysec` log). The events in between are in Kafka, but the consumer
    has moved past them: the caller applies them again (ingest.Ingest._refill), and the
    fences skip whatever of them Redis still has. Raised before anything of the batch
    is written."""

    def __init__(self, partition: int, stored: int, through: int) -> None:
        super().__init__(f"partition {partition}: Redis has its events through offset "
                         f"{stored}, this worker wrote through {through}")  # fmt: skip
        self.partition, self.stored, self.through = partition, stored, through


class BatchProcessor:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        catalog: Catalog,
        tuning: Tuning,
        ttls: Ttls,
        covisit_keep: int = 50,
        trending_keep: int = 1000,
        cache_size: int = 50_000,
        upkeep: AggregateUpkeep | None = None,
        cache: OwnerCache | None = None,
        written_through: dict[int, int] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.catalog = catalog
        self.tuning = tuning
        self.ttls = ttls
        self.covisit_keep = covisit_keep
        self.trending_keep = trending_keep
        self._covisit_half_life = str(tuning.covisit_half_life_ms)
        self._trending_half_life = str(tuning.trending_half_life_ms)
        # Aggregate sets (by suffix) a write of this processor that Redis applied touched at
        # landmark _settled_at: they are on it, so a write at that landmark skips checking
        # theirs (an HGET per set, ~7 sets an event). Only an applied
        # write counts, and the write's own landmark check (APPLY_AGGREGATES) refuses it if
        # the landmark has moved since, so no set can be skipped while on an older one.
        # Every aggregate write refreshes the TTL of {agg}:lk; past the upkeep's refresh
        # interval without one this processor stops trusting what it knows.
        self._settled: set[str] = set()
        self._settled_at: int | None = None
        self._settled_ms = 0
        self._sha: dict[str, str] = {}
        self.cache = cache if cache is not None else OwnerCache(cache_size)
        self.upkeep = upkeep or AggregateUpkeep(ttls.aggregate_ms)
        self.batches = Batches(redis)
        self.repaired = 0  # keys deleted by _repair, ever
        # partitions Redis had no trace of where this worker had written (or the group's
        # commits say was written): an emptied Redis, ever (kairos_store_emptied_total)
        self.emptied = 0
        # partition -> the highest aggregates' fence this worker's writes set (Redis
        # accepted them), or that the group's last commit says was written (the commit
        # notes, ingest.Ingest.check_notes), to tell a Redis that lost some of them
        # (StoreRegressed). Shared by a worker's lanes (Ingest); kept across cache clears,
        # which follow exactly the errors a failover or a restart cause.
        self.written_through = written_through if written_through is not None else {}
        # The clickstream topic's incarnation the fences are taken on (planning.is_new):
        # 0 while unknown; set through adopt_incarnation.
        self.incarnation = 0

    def adopt_incarnation(self, tag: int) -> None:
        """Fence on the topic's incarnation `tag` from the next batch on; the fences cached
        for another one are dropped."""
        if tag != self.incarnation:
            if self.incarnation:  # offsets of another incarnation (a new lane's first tag
                self.written_through.clear()  # leaves the lanes' shared record be)
            self.incarnation = tag
            self.cache.clear()
            self.upkeep.forget()

    async def load_scripts(self) -> None:
        """SCRIPT LOAD once; batches then call EVALSHA. Called again after a NOSCRIPT
        (Redis restarted or flushed its scripts, or a failover: a script cache is not
        replicated). Loaded on the batches' own connection, the one that calls them: a
        pooled redis-py connection could still be on the old primary after a failover
        (SCRIPT LOAD is no write, so nothing told it), and the batches found NOSCRIPT on
        the new one until they gave up (tests/stream_engine/test_redis_failover.py)."""
        names = ("APPLY_SESSION", "APPLY_USER", "APPLY_AGGREGATES", "BLOCK_USER",
                 "UNBLOCK_USER", "MOVE_LANDMARK", "REPAIR_KEYS")  # fmt: skip
        loads = [("SCRIPT", "LOAD", getattr(state, name)) for name in names]
        async with asyncio.timeout(STORE_TIMEOUT_S):
            shas = await self.batches.execute(loads)
        for name, sha in zip(names, raise_error_reply(shas), strict=True):
            self._sha[name] = sha.decode()

    async def aclose(self) -> None:
        await self.batches.aclose()

    def _call(
        self, cmds: list[tuple[Any, ...]], name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        cmds.append(("EVALSHA", self._sha[name], len(keys), *keys, *args))

    @staticmethod
    def validate(
        records: Sequence[Record], now_ms: int
    ) -> tuple[list[Positioned], list[DeadLetter]]:
        valid: list[Positioned] = []
        dead: list[DeadLetter] = []
        for r in records:
            try:
                event = parse_event(r.value, now_ms, key=r.key or b"")
            except InvalidEvent as exc:
                dead.append(DeadLetter(r, exc.reason.value, exc.detail))
                continue
            valid.append(Positioned(event, r.partition, r.offset, r.timestamp_ms))
        return valid, dead

    async def process(self, records: Sequence[Record]) -> Outcome:
        now_ms = int(time.time() * 1000)
        valid, dead = self.validate(records, now_ms)
        out = Outcome(valid=valid, dead=dead)
        if not valid:
            return out
        if not self._sha:
            await migrate(self.redis, self.keys)
            await self.load_scripts()
        repaired = self.repaired
        # Sessions an earlier attempt wrote (or found erased or blocked): a refused write of
        # another session doesn't apply or count their events again.
        settled: set[str] = set()
        # Events sent again under an id their session had, (partition, offset) -> session,
        # as the attempts found them: a later attempt skips the sessions an earlier one
        # wrote, and must neither count their repeats in co-visitation and trending nor
        # forget them as duplicates.
        repeated: dict[tuple[int, int], str] = {}
        for _attempt in range(MAX_ATTEMPTS):
            skipped = set(settled)  # the sessions this attempt's plan leaves out
            try:
                plan = await self._plan(valid, now_ms, settled, repeated)
                conflicts = await self._write(plan, out, settled)
            except NoScriptError:
                await self.load_scripts()
                self.cache.clear()
                self.upkeep.forget()  # Redis restarted: its sets may be gone
                continue
            except BaseException:
                self.cache.clear()  # a write may or may not have landed: trust Redis again
                self.upkeep.forget()
                raise
            out.repaired = self.repaired - repaired
            if not conflicts:
                out.duplicates = plan.duplicates + sum(s in skipped for s in repeated.values())
                out.unknown_items = plan.unknown_items
                out.written_at_ms = int(time.time() * 1000)
                return out
            out.conflicts += conflicts
            now_ms = int(time.time() * 1000)
        raise RuntimeError(f"state writes still conflicting after {MAX_ATTEMPTS} attempts")

    # ------------------------------------------------------------------ read

    async def _read(
        self, sessions: Sequence[str], partitions: Sequence[int]
    ) -> tuple[dict[str, SessionSnapshot], dict[int, int | None], int | None]:
        """State as of now: from the owner cache where we hold it, else one pipelined read."""
        snaps: dict[str, SessionSnapshot] = {}
        dims = self.catalog.space.dims
        for sid in sessions:
            if (entry := self.cache.get(sid)) is not None:
                fence, part, v, t, n, u, r, c, b, lt, block, fence2, part2, seen = entry
                snaps[sid] = SessionSnapshot(fence, part, from_bytes(v, dims), t, n, u,
                                             list(r), list(c), list(b), lt, block,
                                             fence2, part2, seen)  # fmt: skip
        missing = [sid for sid in sessions if sid not in snaps]
        # A fence cached below what was written through (by another lane, or by whoever
        # held the partition before, as its commits tell: ingest.Ingest.check_notes) is
        # read again, and checked against that.
        cached, written = self.cache.agg_fences, self.written_through
        fences: dict[int, int | None] = {
            p: f for p in partitions if (f := cached.get(p)) is not None and f >= written.get(p, -1)
        }
        landmark = self.cache.landmark
        need_aggs = len(fences) < len(partitions) or landmark is None
        if not missing and not need_aggs:
            return snaps, fences, landmark
        cmds: list[tuple[Any, ...]] = []
        for sid in missing:
            cmds.append(("HMGET", self.keys.session(sid), *state.SESSION_FIELDS))
            cmds.append(("GET", self.keys.session_block(sid)))
        fields = [f for p in partitions for f in (str(p), f"{p}:t")]
        cmds.append(("HMGET", self.keys.agg_fence, *fields))
        cmds.append(("HGET", self.keys.agg_meta, "L"))
        async with asyncio.timeout(STORE_TIMEOUT_S):
            res = await self.batches.execute(cmds)
            k = self.keys
            wrong = [([k.session(sid), k.impressions(sid), k.session_block(sid)],
                      ["hash", "hash", "string"])
                     for i, sid in enumerate(missing)
                     if wrong_type(res[2 * i]) or wrong_type(res[2 * i + 1])]  # fmt: skip
            if wrong_type(res[-2]) or wrong_type(res[-1]):
                wrong.append(([k.agg_fence, k.agg_meta], ["hash", "hash"]))
            if wrong:
                res = await self._repair(wrong, cmds)
        raise_error_reply(res)
        for i, sid in enumerate(missing):
            snaps[sid] = self._session_snapshot(res[2 * i], res[2 * i + 1])
        stored = res[-2]
        fences = {p: fenced_on(stored[2 * i], stored[2 * i + 1], self.incarnation)
                  for i, p in enumerate(partitions)}  # fmt: skip
        for p, fence in fences.items():
            through = self.written_through.get(p)
            if through is None or (fence is not None and fence >= through):
                continue
            if fence is None:  # an emptied Redis (or the fence expired): nothing to go by
                log.warning("partition %d: Redis has no trace of its events, this worker "
                            "wrote through offset %d: applying what follows to fresh "
                            "state", p, through)  # fmt: skip
                del self.written_through[p]
                self.emptied += 1
                continue
            raise StoreRegressed(p, fence, through)
        return snaps, fences, stored_int(res[-1])

    async def _repair(
        self, wrong: Sequence[tuple[list[str], list[str]]], read: list[tuple[Any, ...]]
    ) -> list[Any]:
        """Keys of another type than the worker writes (written by something else: every
        command on them fails), given as (keys, the type each should have), are deleted and
        read again: a session's events apply to a fresh session, and the aggregates' fences
        start again, instead of every event going to the dead letters until the key
        expires. Returns the read's replies."""
        cmds: list[tuple[Any, ...]] = []
        for keys, types in wrong:
            self._call(cmds, "REPAIR_KEYS", keys, types)
        res = raise_error_reply(await self.batches.execute([*cmds, *read]))
        gone = sum(res[: len(cmds)])
        self.repaired += gone
        log.warning("%d keys of another type than the worker writes deleted: %s", gone,
                    ", ".join(k for keys, _ in wrong[:3] for k in keys))  # fmt: skip
        return res[len(cmds) :]

    def _session_snapshot(self, row: list[Any], block: bytes | None) -> SessionSnapshot:
        v, t, n, o, p, u, r, c, b, lt, o2, p2, e = row
        return SessionSnapshot(
            fence=stored_int(o),
            partition=stored_int(p),
            fence2=stored_int(o2),
            partition2=stored_int(p2),
            vector=from_bytes(v, self.catalog.space.dims),
            vector_ts=stored_int(t),
            count=stored_int(n) or 0,
            user=stored_text(u) if u else None,
            recent=stored_text(r).split() if r else [],
            cart=stored_text(c).split() if c else [],
            bought=stored_text(b).split() if b else [],
            last_ts=stored_int(lt) or 0,
            block=stored_text(block) if block else None,
            # bytes of whole digests (anything else, written by something else: none)
            seen=e if isinstance(e, bytes) and len(e) % DIGEST == 0 else b"",
        )

    # ------------------------------------------------------------------ plan

    async def _plan(
        self, valid: Sequence[Positioned], now_ms: int, settled: set[str],
        repeated: dict[tuple[int, int], str],
    ) -> Plan:  # fmt: skip
        by_session: dict[str, list[Positioned]] = defaultdict(list)
        for p in valid:
            by_session[p.event.session_id].append(p)
        partitions = sorted({p.partition for p in valid})
        snaps, agg_fences, landmark = await self._read(list(by_session), partitions)
        landmark = await self._rebase_if_due(landmark, max(p.event.ts for p in valid))
        plan = Plan()
        skip_aggregates: set[str] = set()
        planned: dict[str, tuple[SessionWrite, SessionWalk]] = {}
        recent_before: dict[str, list[str]] = {}
        for sid, events in by_session.items():
            snap = snaps[sid]
            recent_before[sid] = list(snap.recent)
            if sid in settled:
                continue
            fresh = [p for p in events if snap.is_new(p, self.incarnation)]
            fresh, seen, repeats = unseen(fresh, snap.seen)
            repeated.update(((p.partition, p.offset), sid) for p in repeats)
            plan.duplicates += len(events) - len(fresh)
            if not fresh:
                continue
            write, walk, unknown = plan_session(sid, fresh, snap, self.catalog, self.tuning, now_ms,
                                                self.incarnation)  # fmt: skip
            write.fields["e"] = seen
            plan.unknown_items += unknown
            plan.sessions.append(write)
            planned[sid] = (write, walk)
            if walk.reset or walk.blocked or snap.block is not None:
                skip_aggregates.add(sid)
            if walk.consents:
                self._plan_consent(plan, walk.consents, {snap.user, walk.user})
        fold_session_vectors(list(planned.values()), self.catalog, self.tuning)
        for sid in by_session:
            snap = snaps[sid]
            if sid in settled:
                continue
            if sid in planned:
                write, walk = planned[sid]
                user, blocked = walk.user, walk.blocked
                count = int(write.fields["n"])
                vector = bytes(write.fields.get("v", b""))  # type: ignore[arg-type]
                vector_ts = int(write.fields.get("t", 0))
            else:
                # Already applied (redelivery): still (re)copy it to the user, whose write
                # may be the part that didn't happen; the event count makes it idempotent.
                user, blocked, count = snap.user, snap.block is not None, snap.count
                vector = b"" if snap.vector is None else to_bytes(snap.vector)
                vector_ts = int(snap.vector_ts or 0)
            snap.recent = recent_before[sid]
            if user is not None and not blocked:
                plan.users.append(UserWrite(user, sid, count, vector, vector_ts))
        self._plan_aggregates(plan, valid, partitions, agg_fences, landmark, snaps,
                              skip_aggregates, repeated)  # fmt: skip
        return plan

    async def _rebase_if_due(self, landmark: int | None, newest_ms: int) -> int | None:
        """Move the aggregates' landmark forward before their scores could overflow."""
        if landmark is None:
            return None
        shortest = min(self.tuning.trending_half_life_ms, self.tuning.covisit_half_life_ms)
        if (newest_ms - landmark) / shortest < REBASE_AFTER_HALF_LIVES:
            return landmark
        new = newest_ms - newest_ms % 1000
        if new <= landmark:
            return landmark
        log.info("moving the aggregates' landmark from %d to %d", landmark, new)
        cmds: list[tuple[Any, ...]] = []
        self._call(cmds, "MOVE_LANDMARK", [self.keys.agg_meta], [landmark, new])
        cmds.append(("HGET", self.keys.agg_meta, "L"))
        self.cache.drop_aggregates()
        async with asyncio.timeout(STORE_TIMEOUT_S):  # on the node the batches write to
            _, stored = raise_error_reply(await self.batches.execute(cmds))
        return stored_int(stored)

    @staticmethod
    def _plan_consent(plan: Plan, consents: list[bool], users: set[str | None]) -> None:
        withdrawn = False in consents
        for uid in users - {None}:
            assert uid is not None
            plan.user_blocks.append((uid, withdrawn))

    def _plan_aggregates(
        self,
        plan: Plan,
        valid: Sequence[Positioned],
        partitions: Sequence[int],
        fences: dict[int, int | None],
        landmark: int | None,
        snaps: dict[str, SessionSnapshot],
        skip: set[str],
        repeated: Container[tuple[int, int]],
    ) -> None:
        """Co-visitation and trending of each partition's events past its fence; events of
        `skip`ped sessions, and events sent again under an id their session had (`repeated`:
        partition, offset), count nothing but are fenced past."""
        if landmark is None:
            first = min(p.event.ts for p in valid)
            landmark = first - first % 1000

        def counts(p: Positioned) -> bool:
            return p.event.session_id not in skip and (p.partition, p.offset) not in repeated

        for part in partitions:
            fence = fences[part]
            mine = sorted((p for p in valid if p.partition == part), key=lambda p: p.offset)
            todo = [p for p in mine if fence is None or p.offset > fence]
            if not todo:
                continue
            usable = [p for p in mine if counts(p)]
            windows = covisit_windows({p.event.session_id: snaps[p.event.session_id].recent
                                       for p in usable})  # fmt: skip
            # Counted by the aggregates but not yet applied to their sessions (a batch cut
            # off between its writes): not counted again, but the windows move on past them.
            # (snaps: the sessions as read, before this batch's plan)
            tag = self.incarnation
            behind = [p for p in usable if fence is not None and p.offset <= fence
                      and snaps[p.event.session_id].is_new(p, tag)]  # fmt: skip
            if behind:
                plan_aggregates(part, behind, windows, self.catalog, landmark, self.tuning,
                                counted_to=fence)  # fmt: skip
            # In chunks, each fenced at its own last offset: one script holds Redis, and
            # every read behind it, for its whole run (~10 µs an event on an idle box).
            expected = fence
            for start in range(0, len(todo), AGGREGATE_CHUNK):
                chunk = todo[start : start + AGGREGATE_CHUNK]
                inc = plan_aggregates(part, [p for p in chunk if counts(p)], windows,
                                      self.catalog, landmark, self.tuning)  # fmt: skip
                plan.aggregates.append(
                    AggregateWrite(part, expected, chunk[-1].offset, inc, landmark)
                )
                expected = chunk[-1].offset

    # ------------------------------------------------------------------ write

    async def _write(self, plan: Plan, out: Outcome, settled: set[str]) -> int:
        """Aggregates, then users, then sessions: a crash between them leaves each part's
        own fence telling the redelivery what is still to do."""
        pipe: list[tuple[Any, ...]] = []
        kinds: list[tuple[str, Any]] = []
        now_ms = int(time.time() * 1000)
        for agg in plan.aggregates:
            self._queue_aggregate(pipe, agg, now_ms)
            kinds.append(("agg", agg))
        for uid, block in plan.user_blocks:
            keys = [self.keys.user(uid), self.keys.user_sessions(uid), self.keys.user_block(uid)]
            if block:
                self._call(pipe, "BLOCK_USER", keys, ["consent", self.ttls.erasure_ms])
            else:
                self._call(pipe, "UNBLOCK_USER", [keys[2]], [])
            kinds.append(("ublock", None))
        for u in plan.users:
            self._call(
                pipe,
                "APPLY_USER",
                [self.keys.user(u.user_id), self.keys.user_sessions(u.user_id),
                 self.keys.user_block(u.user_id)],
                [u.session_id, u.count, u.vector, u.vector_ts, self.ttls.user_ms,
                 int(time.time() * 1000), MAX_USER_SESSIONS],
            )  # fmt: skip
            kinds.append(("user", u))
        for s in plan.sessions:
            args: list[Any] = [_fence(s.expected_fence), s.fence, s.partition,
                               self.ttls.session_ms, s.flags, len(s.fields)]  # fmt: skip
            for k, v in s.fields.items():
                args += [k, v]
            for item, n in s.impressions.items():
                args += [item, n]
            self._call(
                pipe,
                "APPLY_SESSION",
                [self.keys.session(s.session_id), self.keys.impressions(s.session_id),
                 self.keys.session_block(s.session_id)],
                args,
            )  # fmt: skip
            kinds.append(("session", s))
        async with asyncio.timeout(STORE_TIMEOUT_S):
            # An error reply (out of memory, a replica, a script error) applied nothing of
            # its own write: raised (the caller retries or isolates the batch), never read
            # as a refused fence or an erased session.
            results = raise_error_reply(await self.batches.execute(pipe))
        conflicts = 0
        for (kind, write), res in zip(kinds, results, strict=True):
            if kind == "session":
                refused = self._after_session_write(write, res, out)
                if not refused:
                    settled.add(write.session_id)
                conflicts += refused
            elif kind == "agg":
                conflicts += self._after_aggregate_write(write, res, now_ms)
        return conflicts

    def _after_session_write(self, write: SessionWrite, res: int, out: Outcome) -> int:
        sid = write.session_id
        if res == 0:
            self.cache.drop(sid)  # someone else wrote it: read it again
            return 1
        if res == 1:
            out.applied += write.applied
            if "B" in write.flags:  # consent withdrawn in this batch: only the fence is left
                self.cache.put(sid, _fence_only(write))
            else:
                self.cache.put(sid, entry_after(write))
            return 0
        # -1 erased, -2 consent withdrawn: counted, never stored
        out.blocked += write.applied
        if res == -2:
            self.cache.put(sid, _fence_only(write))
        else:
            self.cache.drop(sid)
        return 0

    def _after_aggregate_write(self, agg: AggregateWrite, res: int, now_ms: int) -> int:
        if res == 0:
            self.cache.drop_aggregates()
            self.upkeep.forget()  # its schedule counted this write
            return 1
        self.cache.agg_fences[agg.partition] = agg.fence
        if agg.fence > self.written_through.get(agg.partition, -1):
            self.written_through[agg.partition] = agg.fence
        self.cache.landmark = agg.landmark
        if agg.landmark != self._settled_at or len(self._settled) > AggregateUpkeep.MAX_KNOWN:
            self._settled.clear()
            self._settled_at = agg.landmark
        self._settled.update(agg.increments)
        self._settled_ms = now_ms
        return 0

    def _queue_aggregate(
        self, pipe: list[tuple[Any, ...]], agg: AggregateWrite, now_ms: int
    ) -> None:
        keys = [self.keys.agg_fence, self.keys.agg_meta, self.keys.agg_landmarks]
        args: list[Any] = [agg.partition, _fence(agg.expected_fence), agg.fence, agg.landmark,
                           self.ttls.aggregate_ms, self.incarnation]  # fmt: skip
        settled: set[str] | frozenset[str] = frozenset()
        if agg.landmark == self._settled_at and now_ms - self._settled_ms < self.upkeep.refresh_ms:
            settled = self._settled
        # Per set: its key, and (keep, expire, half-life, increments in whole units of
        # state.AGG_UNIT: what rounds to none counts nothing).
        self.upkeep.queue(keys, args, agg.increments, f"{self.keys.prefix}:{{agg}}:", settled,
                          now_ms, (self.covisit_keep, self._covisit_half_life),
                          (self.trending_keep, self._trending_half_life))  # fmt: skip
        self._call(pipe, "APPLY_AGGREGATES", keys, args)


def _fence(value: int | None) -> str:
    return "" if value is None else str(value)
