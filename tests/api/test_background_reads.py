"""Background reads get seconds, not the request path's 8 ms: a large catalog mirror is
read and applied (it timed out on every refresh tick before)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from api.settings import Settings
from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import catalog_items_key, catalog_version_key
from tests.api.conftest import client_for

pytestmark = pytest.mark.integration


async def test_a_catalog_mirror_of_megabytes_is_applied_by_the_refresh(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    long_title = "Trail runner " + "x" * 10_000  # ~10 KB an item: tens of MB in all
    mirror: dict[Any, Any] = {}  # redis-py's mapping type is invariant in its keys
    for it in catalog.items:
        body = it.to_json()
        body["title"] = long_title
        mirror[it.item_id] = orjson.dumps(body)
    assert sum(map(len, mirror.values())) > 10_000_000
    prefix = settings.key_prefix
    await redis_client.hset(catalog_items_key(prefix), mapping=mirror)
    await redis_client.set(catalog_version_key(prefix), 7)
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        await rt.refresh()
        first = catalog.items[0].item_id
        assert rt.catalog_version == b"7"
        assert rt.catalog.item(rt.catalog.row(first)).title == long_title
