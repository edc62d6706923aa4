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
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from stream_engine.catalog import Catalog
from stream_engine.events import EventType, InvalidEvent, parse_event
from stream_engine.ingest import STORE_ERRORS
from stream_engine.processor import STORE_TIMEOUT_S
from stream_engine.settings import Settings
from stream_engine.state import REPORT_TTL_MS, Keys, hll_key, minute_key, report_fence_key
from stream_engine.store import connect

log = logging.getLogger("kairos.attribution")

ATTRIBUTED = {EventType.CLICK: "k", EventType.ADD_TO_CART: "a", EventType.PURCHASE: "p"}
MAX_SKEW_MS = 60_000
MAX_CONFLICTS = 5
PERSONAL = frozenset(
    {"personalized", "profile", "contextual"}
)  # a click may carry a timestamp a little before its exposure's

# KEYS: fence, then counter hashes and HyperLogLogs
# ARGV: fence field, expected ("" = none), new, ttl ms, then per key: kind ("h" hash of
#       "field increment ..." pairs, "v" HyperLogLog of "member member ..."), packed values
# Returns 1 applied, 0 fence conflict (someone else moved it: re-read, re-filter, retry).
APPLY_REPORT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
local ttl = tonumber(ARGV[4])
local i = 5
for k = 2, #KEYS do
  if ARGV[i] == 'h' then
    for f, inc in string.gmatch(ARGV[i + 1], '(%S+) (%S+)') do
      redis.call('HINCRBYFLOAT', KEYS[k], f, inc)
    end
  else
    local members = {}
    for m in string.gmatch(ARGV[i + 1], '%S+') do members[#members + 1] = m end
    if #members > 0 then redis.call('PFADD', KEYS[k], unpack(members)) end
  end
  redis.call('PEXPIRE', KEYS[k], ttl)
  i = i + 2
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


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
    def unpack(cls, raw: bytes | str) -> Exposure:
        text = raw.decode() if isinstance(raw, bytes) else raw
        d, slot, strategy, group, ts = text.split("|")
        return cls(d, slot, strategy, group, int(ts))


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
    def __init__(self, settings: Settings, catalog: Catalog, redis: aioredis.Redis) -> None:
        self.settings = settings
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
        for _ in range(MAX_CONFLICTS):
            current = await self.redis.hget(fence_key, fence_field)
            done = -1 if current is None else int(current)
            fresh = [r for r in records if r[0] > done]
            if not fresh:
                return False
            batch = Batch()
            if topic == self.settings.decisions_topic:
                await self._exposures(fresh, batch)
            else:
                await self._events(fresh, batch)
            expected = "" if current is None else str(done)
            if await self._commit(fence_field, expected, fresh[-1][0], batch):
                return True
        raise RuntimeError(f"attribution fence of {fence_field} kept moving under us")

    async def _exposures(self, records: list[tuple[int, bytes]], batch: Batch) -> None:
        pipe = self.redis.pipeline(transaction=False)
        p = self.prefix
        for _, raw in records:
            try:
                obj = orjson.loads(raw)
                exp = Exposure(obj["decision_id"], obj["slot"], obj["strategy"], obj["group"],
                               int(obj["ts"]))  # fmt: skip
                sid = obj["session_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("skipped a malformed exposure")
                continue
            if not all(_words(v) for v in (exp.decision_id, exp.slot, exp.strategy, exp.group)):
                continue
            cell = f"{exp.slot}|{exp.strategy}|{exp.group}"
            batch.count(exp.ts, p, f"x|{cell}")
            if _words(obj.get("fallback_reason")):
                batch.count(exp.ts, p, f"f|{exp.slot}|{obj['fallback_reason']}")
            shown = [i for i in obj.get("items") or [] if _words(i)]
            if _words(obj.get("banner")):
                shown.append(obj["banner"])
                batch.count(exp.ts, p, f"b|{obj['banner']}")
            for rule in obj.get("rules") or []:
                if _words(rule):
                    batch.count(exp.ts, p, f"u|{rule}")
            batch.hlls[hll_key(p, f"v:{exp.group}", exp.ts)].add(str(sid))
            if exp.strategy in PERSONAL:
                batch.hlls[hll_key(p, "vp", exp.ts)].add(str(sid))
            key = self.keys.exposures(str(sid))
            packed = exp.pack()
            pipe.hset(key, mapping={f"d:{exp.decision_id}": packed,
                                    **{f"i:{item}": packed for item in shown}})  # fmt: skip
            pipe.pexpire(key, self.window_ms)
        await pipe.execute()

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
        for (event, _), found in zip(wanted, await pipe.execute(), strict=True):
            if found is None:
                continue
            exp = Exposure.unpack(found)
            if not -MAX_SKEW_MS <= event.ts - exp.ts <= self.window_ms:
                continue
            cell = f"{exp.slot}|{exp.strategy}|{exp.group}"
            batch.count(exp.ts, p, f"{ATTRIBUTED[event.type]}|{cell}")
            if event.type is EventType.PURCHASE:
                item = self.catalog.get(event.item_id or "")
                if item is not None:
                    batch.count(exp.ts, p, f"r|{cell}", item.price)

    async def _commit(self, fence_field: str, expected: str, last_offset: int,
                      batch: Batch) -> bool:  # fmt: skip
        keys = [report_fence_key(self.prefix)]
        args: list[Any] = [fence_field, expected, str(last_offset), REPORT_TTL_MS]
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
    attributor = Attributor(settings, catalog, redis)
    consumer = AIOKafkaConsumer(
        settings.decisions_topic,
        settings.clickstream_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.consumer_group}-attribution",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(settings.group_session_timeout_s * 1000),
        heartbeat_interval_ms=int(min(3.0, settings.group_session_timeout_s / 4) * 1000),
    )
    await consumer.start()
    try:
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
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
            if batches:
                await consumer.commit()
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
