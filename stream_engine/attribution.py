"""Attribution: decision exposures meet the clicks, carts and purchases that followed them.

`python -m stream_engine attribution` runs one consumer (group `<consumer group>-attribution`)
over the `decisions` and `clickstream` topics, both keyed by session id. Per batch:

* exposures are remembered per session for the attribution window (`P:{sid}:exp`:
  `d:<decision id>` and `i:<item or banner id>` -> the exposure), and counted;
* a click, add-to-cart or purchase is attributed to the decision that showed the item: the
  one named by the event's `decision_id`, else the session's latest exposure of that item
  within the window; it is counted under that decision's slot, strategy and group;
* every event is counted for identity resolution (events with a user id; sessions seen
  and sessions linked to a user).

Counters live in per-minute hashes `P:{report}:m:<minute>` (fields below), visitors in
HyperLogLogs `P:{report}:v:<group>:<hour>` (visitors exposed), `vp` (visitors who got a
personalized answer), `s` (sessions seen) and `su` (sessions with a user).
All of them are written by one script together with a per-(topic, partition) offset fence
(`P:{report}:fence`), so a redelivered batch changes nothing; everything is bounded by TTLs.

    x|slot|strategy|group   exposures        k|slot|strategy|group   clicks
    a|slot|strategy|group   add to carts     p|slot|strategy|group   purchases
    r|slot|strategy|group   revenue          f|slot|reason           fallbacks by reason
    b|banner                banner served    u|rule                  rule fired
    ev, eu                  events, events with a user id
    fr|<ms>                 freshness histogram (written by the worker, stream_engine/ingest.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_engine.catalog import Catalog
from stream_engine.consumer import commit_applied
from stream_engine.events import EventType, InvalidEvent, parse_event
from stream_engine.processor import STORE_TIMEOUT_S
from stream_engine.settings import Settings
from stream_engine.state import (
    FENCED_ON,
    NUMBER,
    REPORT_TTL_MS,
    Keys,
    fenced_on,
    hll_key,
    minute_key,
    report_fence_key,
    stored_int,
    stored_text,
)
from stream_engine.store import STORE_ERRORS, connect, unless_wrong_type, wrong_type_as_none
from stream_engine.topics import CONSUMER_METADATA_MAX_AGE_MS, Incarnation, TopicIdentity

log = logging.getLogger("kairos.attribution")

ATTRIBUTED = {EventType.CLICK: "k", EventType.ADD_TO_CART: "a", EventType.PURCHASE: "p"}
MAX_SKEW_MS = 60_000
MAX_CONFLICTS = 5
MAX_TS_MS = 1 << 53  # an exposure's time, ms: beyond it is not one the API wrote
PERSONAL = frozenset(
    {"personalized", "profile", "contextual"}
)  # a click may carry a timestamp a little before its exposure's

# KEYS: fence, then counter hashes and HyperLogLogs
# ARGV: fence field, expected ("" = none), new, ttl ms, the topic's incarnation tag ("0"
#       unknown: state.FENCED_ON), then per key: kind ("h" hash of "field increment ..."
#       pairs, "v" HyperLogLog of "member member ..."), packed values
# Returns 1 applied, 0 fence conflict (someone else moved it: re-read, re-filter, retry).
# What something else wrote is replaced rather than failed on (found by pcall: no extra
# command on the normal path): a key of another type starts again, a counter that is not
# a number is set, and a fence that is not a number counts as none, as the reader takes it.
APPLY_REPORT = """
local cur = redis.pcall('HGET', KEYS[1], ARGV[1])
if type(cur) == 'table' then
  redis.call('DEL', KEYS[1])
  cur = false
end
cur = cur or ''
local tag = ARGV[5]
FENCED_ON
if cur ~= ARGV[2] and (ARGV[2] ~= '' or string.match(cur, NUMBER)) then return 0 end
local ttl = tonumber(ARGV[4])
local i = 6
for k = 2, #KEYS do
  if ARGV[i] == 'h' then
    for f, inc in string.gmatch(ARGV[i + 1], '(%S+) (%S+)') do
      if type(redis.pcall('HINCRBYFLOAT', KEYS[k], f, inc)) == 'table' then
        if redis.call('TYPE', KEYS[k]).ok ~= 'hash' then redis.call('DEL', KEYS[k]) end
        redis.call('HSET', KEYS[k], f, inc)
      end
    end
  else
    local members = {}
    for m in string.gmatch(ARGV[i + 1], '%S+') do members[#members + 1] = m end
    if #members > 0 and type(redis.pcall('PFADD', KEYS[k], unpack(members))) == 'table' then
      redis.call('DEL', KEYS[k])
      redis.call('PFADD', KEYS[k], unpack(members))
    end
  end
  redis.call('PEXPIRE', KEYS[k], ttl)
  i = i + 2
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if tag ~= '0' then redis.call('HSET', KEYS[1], ARGV[1] .. ':t', tag) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
""".replace("FENCED_ON", FENCED_ON).replace("NUMBER", NUMBER)


@dataclass(frozen=True, slots=True)
class Exposure:
    decision_id: str
    slot: str
    strategy: str
    group: str
    ts: int

    def pack(self) -> str:
        return f"{self.decision_id}|{self.slot}|{self.strategy}|{self.group}|{self.ts}"

    @classmethod
    def unpack(cls, raw: bytes | str) -> Exposure | None:
        """None for what is not a packed exposure (written by something else)."""
        text = stored_text(raw) if isinstance(raw, bytes) else raw
        parts = text.split("|")
        if len(parts) != 5 or (ts := stored_int(parts[4])) is None:
            return None
        d, slot, strategy, group, _ = parts
        return cls(d, slot, strategy, group, ts)


@dataclass(frozen=True, slots=True)
class Exposed:
    """One message of the decisions topic, as attribution counts it."""

    exposure: Exposure
    session_id: str
    shown: list[str]  # the items and the banner
    banner: str | None
    rules: list[str]
    fallback_reason: str | None

    @classmethod
    def of(cls, raw: bytes) -> Exposed | None:
        """None when the message is not one the API writes (any producer can write to the
        topic)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        ts, sid = obj.get("ts"), obj.get("session_id")
        banner, items, rules = obj.get("banner"), obj.get("items") or [], obj.get("rules") or []
        words = [obj.get(k) for k in ("decision_id", "slot", "strategy", "group")]
        reason = obj.get("fallback_reason")
        if not (all(_words(w) for w in words) and _words(sid)
                and type(ts) is int and 0 <= ts < MAX_TS_MS
                and (banner is None or _words(banner)) and (reason is None or _words(reason))
                and isinstance(items, list) and isinstance(rules, list)):  # fmt: skip
            return None
        shown = [i for i in items if _words(i)] + ([banner] if banner is not None else [])
        d, slot, strategy, group = (str(w) for w in words)
        return cls(Exposure(d, slot, strategy, group, ts), str(sid), shown, banner,
                   [r for r in rules if _words(r)], reason)  # fmt: skip


@dataclass
class Batch:
    """What one batch of one partition adds to the report."""

    counters: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    hlls: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def count(self, ts_ms: int, prefix: str, name: str, inc: float = 1.0) -> None:
        self.counters[minute_key(prefix, ts_ms)][name] += inc


def _words(value: Any) -> bool:
    return isinstance(value, str) and value != "" and " " not in value and "|" not in value


class Attributor:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        redis: aioredis.Redis,
        topic_ids: Mapping[str, Callable[[], Awaitable[str | None]]] | None = None,
    ) -> None:
        self.settings = settings
        # The fences are taken per incarnation of each topic (topics.Incarnation): a topic
        # created again numbers its offsets from 0, and the old fences would skip them.
        self.incarnations = {topic: Incarnation(topic, read)
                             for topic, read in (topic_ids or {}).items()}  # fmt: skip
        self.catalog = catalog
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.prefix = settings.key_prefix
        self.window_ms = int(settings.attribution_window_s * 1000)

    async def apply(self, topic: str, partition: int, records: list[tuple[int, bytes]]) -> bool:
        """records: (offset, value) of one partition, in order. Records at or below the
        partition's fence were counted before (a redelivery, maybe overlapping) and are
        skipped; False if none was left."""
        fence_key, fence_field = report_fence_key(self.prefix), f"{topic}:{partition}"
        tag = 0
        if (incarnation := self.incarnations.get(topic)) is not None:
            await incarnation.follow((partition, offset) for offset, _ in records)
            tag = incarnation.tag
        for _ in range(MAX_CONFLICTS):
            # A fence written by something else (another type, not a number) counts as none,
            # and the script replaces it; so does one of another incarnation of the topic.
            read: Awaitable[list[Any]] = self.redis.hmget(
                fence_key, [fence_field, f"{fence_field}:t"]
            )
            fence, fence_tag = await unless_wrong_type(read, [None, None])
            current = fenced_on(fence, fence_tag, tag)
            done = -1 if current is None else current
            fresh = [r for r in records if r[0] > done]
            if not fresh:
                return False
            batch = Batch()
            if topic == self.settings.decisions_topic:
                await self._exposures(fresh, batch)
            else:
                await self._events(fresh, batch)
            expected = "" if current is None else str(done)
            if await self._commit(fence_field, expected, fresh[-1][0], tag, batch):
                return True
        raise RuntimeError(f"attribution fence of {fence_field} kept moving under us")

    async def _exposures(self, records: list[tuple[int, bytes]], batch: Batch) -> None:
        pipe = self.redis.pipeline(transaction=False)
        p = self.prefix
        writes: list[tuple[str, dict[Any, Any]]] = []
        skipped = 0
        for _, raw in records:
            if (one := Exposed.of(raw)) is None:
                skipped += 1
                continue
            exp, sid = one.exposure, one.session_id
            cell = f"{exp.slot}|{exp.strategy}|{exp.group}"
            batch.count(exp.ts, p, f"x|{cell}")
            if one.fallback_reason is not None:
                batch.count(exp.ts, p, f"f|{exp.slot}|{one.fallback_reason}")
            if one.banner is not None:
                batch.count(exp.ts, p, f"b|{one.banner}")
            for rule in one.rules:
                batch.count(exp.ts, p, f"u|{rule}")
            batch.hlls[hll_key(p, f"v:{exp.group}", exp.ts)].add(sid)
            if exp.strategy in PERSONAL:
                batch.hlls[hll_key(p, "vp", exp.ts)].add(sid)
            packed = exp.pack()
            fields: dict[Any, Any] = {f"d:{exp.decision_id}": packed,
                                      **{f"i:{i}": packed for i in one.shown}}  # fmt: skip
            writes.append((self.keys.exposures(sid), fields))
            pipe.hset(writes[-1][0], mapping=fields)
            pipe.pexpire(writes[-1][0], self.window_ms)
        if skipped:
            log.warning("skipped %d malformed exposures of %d", skipped, len(records))
        replies = wrong_type_as_none(await pipe.execute(raise_on_error=False))
        # A session's exposures key of another type (written by something else) starts again.
        again = self.redis.pipeline(transaction=False)
        for (key, fields), reply in zip(writes, replies[::2], strict=True):
            if reply is None:
                again.delete(key)
                again.hset(key, mapping=fields)
                again.pexpire(key, self.window_ms)
        if again:
            await again.execute()

    async def _events(self, records: list[tuple[int, bytes]], batch: Batch) -> None:
        now_ms = int(time.time() * 1000)
        wanted: list[tuple[Any, str]] = []
        pipe = self.redis.pipeline(transaction=False)
        p = self.prefix
        for _, raw in records:
            try:
                event = parse_event(raw, now_ms)
            except InvalidEvent:
                continue  # the worker dead-letters it; the report ignores it
            batch.count(event.ts, p, "ev")
            batch.hlls[hll_key(p, "s", event.ts)].add(event.session_id)
            if event.user_id is not None:
                batch.count(event.ts, p, "eu")
                batch.hlls[hll_key(p, "su", event.ts)].add(event.session_id)
            if event.type in ATTRIBUTED and event.item_id is not None:
                field_name = f"d:{event.decision_id}" if event.decision_id else f"i:{event.item_id}"
                pipe.hget(self.keys.exposures(event.session_id), field_name)
                wanted.append((event, field_name))
        if not wanted:
            return
        found_all = wrong_type_as_none(await pipe.execute(raise_on_error=False))
        for (event, _), found in zip(wanted, found_all, strict=True):
            # None of a key of another type or a value that is not an exposure (written by
            # something else): the event is not attributed.
            if found is None or (exp := Exposure.unpack(found)) is None:
                continue
            if not -MAX_SKEW_MS <= event.ts - exp.ts <= self.window_ms:
                continue
            cell = f"{exp.slot}|{exp.strategy}|{exp.group}"
            batch.count(exp.ts, p, f"{ATTRIBUTED[event.type]}|{cell}")
            if event.type is EventType.PURCHASE:
                item = self.catalog.get(event.item_id or "")
                if item is not None:
                    batch.count(exp.ts, p, f"r|{cell}", item.price)

    async def _commit(self, fence_field: str, expected: str, last_offset: int, tag: int,
                      batch: Batch) -> bool:  # fmt: skip
        keys = [report_fence_key(self.prefix)]
        args: list[Any] = [fence_field, expected, str(last_offset), REPORT_TTL_MS, tag]
        for key, counters in batch.counters.items():
            keys.append(key)
            args += ["h", " ".join(f"{f} {v!r}" for f, v in counters.items())]
        for key, members in batch.hlls.items():
            keys.append(key)
            args += ["v", " ".join(sorted(members))]
        return bool(await self.redis.eval(APPLY_REPORT, len(keys), *keys, *args))


async def run(settings: Settings, catalog: Catalog, stopping: asyncio.Event) -> None:
    """Consume both topics until `stopping` is set; Redis outages are retried in place."""
    redis = connect(settings.redis_url, timeout_s=STORE_TIMEOUT_S)
    topics = (settings.decisions_topic, settings.clickstream_topic)
    identities = {t: TopicIdentity(settings.kafka_bootstrap, t, security=settings.kafka)
                  for t in topics}  # fmt: skip
    attributor = Attributor(settings, catalog, redis, identities)
    consumer = AIOKafkaConsumer(
        settings.decisions_topic,
        settings.clickstream_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.consumer_group}-attribution",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(settings.group_session_timeout_s * 1000),
        heartbeat_interval_ms=int(min(3.0, settings.group_session_timeout_s / 4) * 1000),
        metadata_max_age_ms=CONSUMER_METADATA_MAX_AGE_MS,  # a topic created again: found soon
        **settings.kafka.aiokafka(),
    )
    await consumer.start()
    try:
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            applied: dict[TopicPartition, int] = {}
            for tp, messages in batches.items():
                records = [(m.offset, m.value or b"") for m in messages]
                delay = 0.05
                while True:
                    try:
                        await attributor.apply(tp.topic, tp.partition, records)
                        break
                    except STORE_ERRORS as exc:
                        log.warning("redis unavailable for attribution (%s); retrying", exc)
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 2.0)
                applied[tp] = messages[-1].offset + 1
            # (a commit refused after a broker's crash used to stop the process: seen in CI)
            await commit_applied(consumer, applied)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await redis.aclose()


def run_forever(settings: Settings, catalog: Catalog) -> None:
    import uvloop

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await run(settings, catalog, stopping)

    uvloop.run(main())
