"""Catalog changes from the `catalog` topic: new items, price and stock changes, in seconds.

A message is a JSON item object keyed by item_id. For a known item only the fields present
change (`{"item_id": "sku-1", "stock": 0}` marks it sold out); a new item needs only
`item_id` (`{"item_id": "sku-2"}` registers an item without metadata, which learned
embeddings and co-visitation can still recommend). Every worker reads the whole topic from
the beginning without a consumer group (each needs every change; make the topic compacted
in production), applies it to its in-memory catalog, and mirrors the merged item into Redis
for the decision API:

    P:{catalog}:items    hash   item_id -> item JSON (the catalog file's format)
    P:{catalog}:version  string incremented on every applied change
    P:{catalog}:changed  zset   item_id -> the version its last change made

so the API, which knows the version it applied, reads only the items changed since
(`changed_since`) instead of the whole mirror: on a live catalog every purchase changes
stock, and the mirror grows to every item ever changed.

The same loop installs newer learned embeddings (stream_engine/latent.py) every
`latent_poll_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from stream_engine.catalog import Catalog, CatalogError, Item, item_from_mapping
from stream_engine.ingest import MAX_BACKOFF_S
from stream_engine.latent import install_newer
from stream_engine.metrics import WorkerMetrics
from stream_engine.settings import Settings
from stream_engine.store import STORE_ERRORS, unless_wrong_type
from stream_engine.topics import CONSUMER_METADATA_MAX_AGE_MS

log = logging.getLogger("kairos.catalog")


def catalog_items_key(prefix: str) -> str:
    return f"{prefix}:{{catalog}}:items"


def catalog_version_key(prefix: str) -> str:
    return f"{prefix}:{{catalog}}:version"


def catalog_changed_key(prefix: str) -> str:
    return f"{prefix}:{{catalog}}:changed"


# KEYS: items, version, changed (one hash slot); ARGV: ttl_ms, then item_id, JSON pairs. One
# script, so that a reader never sees the version before the items and their index.
# Keys something else wrote (another type, a version that is no number) are replaced: the
# version then starts again, which a reader takes as a reset and reads the whole mirror.
MIRROR = """
local want = {'hash', 'string', 'zset'}
for k = 1, 3 do
  local t = redis.call('TYPE', KEYS[k]).ok
  if t ~= 'none' and t ~= want[k] then redis.call('DEL', KEYS[k]) end
end
local v = redis.pcall('INCRBY', KEYS[2], (#ARGV - 1) / 2)
if type(v) == 'table' then
  redis.call('DEL', KEYS[2])
  v = redis.call('INCRBY', KEYS[2], (#ARGV - 1) / 2)
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], v, ARGV[i])
end
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ARGV[1]) end
return v
"""


async def mirror(redis: aioredis.Redis, prefix: str, items: list[Item], ttl_ms: int) -> int:
    """Writes merged items to the mirror and its change index; returns the new version."""
    args: list[Any] = [ttl_ms]
    for it in items:
        args += [it.item_id, orjson.dumps(it.to_json())]
    keys = (catalog_items_key(prefix), catalog_version_key(prefix), catalog_changed_key(prefix))
    return int(await redis.eval(MIRROR, 3, *keys, *args))


async def changed_since(
    redis: aioredis.Redis, prefix: str, since: int, upto: int
) -> list[tuple[str, bytes]] | None:
    """The mirrored items whose last change made a version in (since, upto], as (item_id,
    JSON); None when the change index cannot say (it names none, as with a mirror written
    before the index existed): the caller reads the whole mirror."""
    # Keys of another type (written by something else; the next mirror write replaces
    # them) cannot say either.
    key = catalog_changed_key(prefix)
    by_version = redis.zrangebyscore(key, f"({since}", upto)
    found = cast(list[bytes | str], await unless_wrong_type(by_version, []))
    if not found:
        return None
    values = await unless_wrong_type(redis.hmget(catalog_items_key(prefix), found), None)
    if values is None:
        return None
    return _pairs((i, v) for i, v in zip(found, values, strict=True) if v is not None)


async def mirrored(redis: aioredis.Redis, prefix: str) -> list[tuple[str, bytes]]:
    """Every mirrored item, as (item_id, JSON); none while the key holds another type
    (written by something else: the next mirror write replaces it)."""
    return _pairs((await unless_wrong_type(redis.hgetall(catalog_items_key(prefix)), {})).items())


def _pairs(raw: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, bytes]]:
    """(item_id, JSON) from a client that may decode replies or not."""
    return [(i.decode() if isinstance(i, bytes) else i, v if isinstance(v, bytes) else v.encode())
            for i, v in raw]  # fmt: skip


def merge_update(catalog: Catalog, raw: bytes, where: str) -> Item:
    """The item after applying one update message; CatalogError if it is malformed."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict) or "item_id" not in obj:
        raise CatalogError(f"{where}: expected an object with item_id")
    existing = catalog.get(str(obj["item_id"]))
    merged: dict[str, Any] = existing.to_json() if existing is not None else {}
    merged.update(obj)
    return item_from_mapping(merged, where)


class CatalogFollower:
    """Applies the catalog topic to a worker's catalog, and mirrors it into Redis."""

    def __init__(
        self, settings: Settings, catalog: Catalog, redis: aioredis.Redis, metrics: WorkerMetrics
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.redis = redis
        self.metrics = metrics
        self._latent_due = 0.0
        self._latent_seen = 0

    async def run(self, stopping: asyncio.Event | None = None) -> None:
        # No group: subscribing assigns every partition of the topic (aiokafka's
        # NoGroupCoordinator), from the beginning. (An earlier version assigned the partitions
        # that `partitions_for_topic` named after `topics()`, which fills another metadata
        # object: it saw none and followed partition 0 alone, a quarter of the updates.)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            isolation_level=self.settings.isolation_level,
            metadata_max_age_ms=CONSUMER_METADATA_MAX_AGE_MS,  # a topic created again: found soon
            **self.settings.kafka.aiokafka(),
        )
        await consumer.start()
        try:
            topic = self.settings.catalog_topic
            consumer.subscribe([topic])
            while stopping is None or not stopping.is_set():
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    await self._apply_retrying(
                        [(f"{topic}/{m.partition}@{m.offset}", m.value) for m in msgs]
                    )
                await self.follow_latent()
        finally:
            await consumer.stop()

    async def follow_latent(self) -> None:
        """Install newer learned embeddings, at most every latent_poll_s; a Redis failure
        keeps the ones in use."""
        now = time.monotonic()
        if now < self._latent_due:
            return
        self._latent_due = now + self.settings.latent_poll_s
        try:
            catalog = self.catalog
            self._latent_seen, model = await install_newer(
                self.redis, self.settings.key_prefix, catalog, self._latent_seen,
                lambda m: catalog.latent_update(m.ids, m.vectors, m.version),
                catalog.adopt_latent,
            )  # fmt: skip
        except STORE_ERRORS as exc:
            log.warning("could not read the latent model (%s); keeping the one in use", exc)
            return
        if model is not None:
            self.metrics.latent_version.set(model.version)

    async def _apply_retrying(self, messages: list[tuple[str, bytes | None]]) -> None:
        delay = 0.05
        while True:
            try:
                await self.apply(messages)
                return
            except STORE_ERRORS as exc:
                log.warning("redis unavailable for catalog updates (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    async def apply(self, messages: list[tuple[str, bytes | None]]) -> int:
        items: list[Item] = []
        for where, raw in messages:
            try:
                items.append(merge_update(self.catalog, raw or b"", where))
            except CatalogError as exc:
                self.metrics.catalog_updates.labels("invalid").inc()
                log.warning("catalog update refused: %s", exc)
        if not items:
            return 0
        # room for the new ones grown in a thread (the processor reads the catalog meanwhile)
        await asyncio.to_thread(self.catalog.reserve_for, [it.item_id for it in items])
        for item in items:
            self.catalog.upsert(item)
        await mirror(self.redis, self.settings.key_prefix, items,
                     int(self.settings.aggregate_ttl_s * 1000))  # fmt: skip
        self.metrics.catalog_updates.labels("applied").inc(len(items))
        return len(items)
