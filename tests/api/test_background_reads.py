"""Background reads get seconds, not the request path's 8 ms: a large catalog mirror is
read and applied (it timed out on every refresh tick before)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

import api.runtime
from api.aggregates import CovisCache
from api.holdout import Group, assign
from api.runtime import Runtime
from api.serving import compile_for
from api.settings import Settings
from stream_engine.catalog import Catalog
from stream_engine.catalog_updates import (
    catalog_changed_key,
    catalog_items_key,
    catalog_version_key,
    changed_since,
    mirror,
    mirrored,
)
from stream_engine.events import EventType
from stream_engine.latent import latent_key
from stream_engine.state import Keys
from tests.api.conftest import Clicks, client_for

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


async def test_a_trending_set_of_another_type_does_not_stop_the_refresh(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    """One trending key another writer left of another type failed every refresh: stock
    changes, new items and learned models stopped reaching the API."""
    prefix = settings.key_prefix
    await redis_client.set(Keys(prefix).trending(), "not a sorted set")
    sold_out = dataclasses.replace(catalog.items[0], stock=0)
    await mirror(redis_client, prefix, [sold_out], 3_600_000)
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        await rt.refresh()
        assert not rt.catalog.in_stock[rt.catalog.row(sold_out.item_id)]
        assert rt.serving.trending.by_key[""].size == 0  # read as an empty set


async def test_catalog_and_model_keys_of_another_type_do_not_stop_the_refresh(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    """The catalog's version or change index, or the learned model's key, of another type
    (or a version that is no number) failed every refresh, as a trending set did; and the
    worker's mirror write failed on them too, so stock changes stopped for good."""
    prefix = settings.key_prefix
    await redis_client.rpush(catalog_version_key(prefix), "not", "a", "number")
    await redis_client.set(catalog_changed_key(prefix), "not a sorted set")
    await redis_client.set(latent_key(prefix), "not a hash")
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        await rt.refresh()  # read as no version and no model
        assert rt.latent_seen == 0
        assert await changed_since(redis_client, prefix, 0, 5) is None  # "read it all"
        await redis_client.set(catalog_items_key(prefix), "not a hash")
        assert await mirrored(redis_client, prefix) == []
        sold_out = dataclasses.replace(catalog.items[0], stock=0)
        assert await mirror(redis_client, prefix, [sold_out], 3_600_000) == 1  # replaced
        await rt.refresh()
        assert not rt.catalog.in_stock[rt.catalog.row(sold_out.item_id)]
        await redis_client.set(catalog_version_key(prefix), "seven")
        await redis_client.delete(latent_key(prefix))
        await redis_client.hset(latent_key(prefix), "version", "eight")
        await rt.refresh()
        again = dataclasses.replace(catalog.items[0], stock=5)
        assert await mirror(redis_client, prefix, [again], 3_600_000) == 1  # starts again
        await rt.refresh()
        assert rt.catalog.in_stock[rt.catalog.row(again.item_id)]


async def _calls(redis: aioredis.Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_after_the_first_read_a_refresh_reads_only_the_items_changed_since(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    """A live catalog changes stock with every purchase and its mirror grows to every item
    ever changed: a refresh reads the changed items (HMGET), not the whole mirror (HGETALL),
    and reads the whole mirror again only when the version went back (a reset Redis)."""
    prefix, ttl = settings.key_prefix, 3_600_000
    await mirror(redis_client, prefix, list(catalog.items), ttl)
    a, b, c = catalog.items[0], catalog.items[1], catalog.items[2]
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        await rt.refresh()  # the whole mirror, once
        first = rt.catalog_version
        full, some = await _calls(redis_client, "hgetall"), await _calls(redis_client, "hmget")
        await mirror(
            redis_client,
            prefix,
            [
                dataclasses.replace(a, title="Changed A", stock=0),
                dataclasses.replace(b, title="Changed B"),
            ],
            ttl,
        )
        await rt.refresh()
        assert int(rt.catalog_version) == int(first) + 2
        assert rt.catalog.item(rt.catalog.row(a.item_id)).title == "Changed A"
        assert not rt.catalog.in_stock[rt.catalog.row(a.item_id)]
        assert rt.catalog.item(rt.catalog.row(b.item_id)).title == "Changed B"
        assert await _calls(redis_client, "hgetall") == full  # not the whole mirror
        assert await _calls(redis_client, "hmget") > some
        # Redis reset under the API: a lower version, a change without its index entry
        await redis_client.set(catalog_version_key(prefix), 1)
        changed = dataclasses.replace(c, title="Changed C").to_json()
        await redis_client.hset(catalog_items_key(prefix), c.item_id, orjson.dumps(changed))
        await rt.refresh()
        assert rt.catalog.item(rt.catalog.row(c.item_id)).title == "Changed C"
        assert await _calls(redis_client, "hgetall") > full
        assert rt.catalog_version == b"1"


async def test_new_items_from_the_mirror_are_served_after_the_next_refresh(
    settings: Settings, catalog: Catalog, clicks: Clicks, redis_client: aioredis.Redis
) -> None:
    """New items, one in a leaf category no item had, one without a category: after a
    refresh they are candidates of their categories, every compiled array covers them,
    and a personalized decision is still answered."""
    prefix, ttl = settings.key_prefix, 3_600_000
    await mirror(redis_client, prefix, list(catalog.items), ttl)
    like = next(it for it in catalog.items if len(it.category) >= 2 and it.available)
    fresh = [
        dataclasses.replace(like, item_id="new-in-a-known-leaf", stock=5),
        dataclasses.replace(like, item_id="new-in-a-new-leaf", stock=5,
                            category=(*like.category[:-1], "Brand New Leaf")),
        dataclasses.replace(like, item_id="new-without-a-category", stock=5, category=()),
    ]  # fmt: skip
    await clicks("newcomer", *[(EventType.CLICK, like.item_id)] * 3)
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        await rt.refresh()
        before = rt.serving.size
        leaf_ids = rt.catalog.leaf.copy()
        await mirror(redis_client, prefix, fresh, ttl)
        await rt.refresh()
        serving = rt.serving
        answer = await client.get("/v1/slots/home_recs?session_id=newcomer")
    assert serving.size == before + 3
    rows = [rt.catalog.row(it.item_id) for it in fresh]
    assert rows == [before, before + 1, before + 2]
    assert np.array_equal(rt.catalog.leaf[:before], leaf_ids)  # no leaf renumbered
    assert before in serving.category_rows[like.category_path]
    assert serving.category_rows[f"{like.category_path.rsplit(' > ', 1)[0]} > Brand New Leaf"
                                 ].tolist() == [before + 1]  # fmt: skip
    assert before + 1 in serving.category_rows[like.category[0]]
    for rules in serving.rules.values():
        assert rules.allowed.size == serving.size
    assert answer.status_code == 200
    assert answer.json()["strategy"] == "personalized"


async def test_a_refresh_and_a_reload_compile_in_threads_one_after_the_other(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh compiles off the event loop; a config reload (the admin's) asked for
    meanwhile compiles off it too, after the refresh (both read the catalog the refresh
    writes), and its config is the one in force afterwards."""
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        compiling, go_on = threading.Event(), threading.Event()
        threads: list[str] = []
        real = compile_for

        def held(*args: Any) -> Any:
            threads.append(threading.current_thread().name)
            compiling.set()
            go_on.wait(10)
            return real(*args)

        monkeypatch.setattr(api.runtime, "compile_for", held)
        before = rt.serving
        rt.catalog.layout_version += 1  # as a price change leaves it: a whole compile due
        refresh = asyncio.create_task(rt.refresh())
        assert await asyncio.to_thread(compiling.wait, 10)
        assert (await client.get("/healthz")).status_code == 200  # the loop answers meanwhile
        reload = asyncio.create_task(rt.reload_config(force=True))
        await asyncio.sleep(0.05)
        assert not reload.done()  # waits for the refresh in progress
        assert len(threads) == 1
        go_on.set()
        await refresh
        config = await reload
        assert config is not None
        assert rt.serving.config is config
        assert len(threads) == 2
        assert threading.current_thread().name not in threads  # never the event loop's
        reloaded = rt.serving
        await rt.refresh()  # the next refresh: nothing left to compile
        assert rt.serving.compiled is reloaded.compiled
        assert rt.serving is not before


async def test_a_background_loop_that_survives_its_cancel_still_stops_with_the_api(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round whose cancellation comes out as TimeoutError (or is lost, as
    asyncio.wait_for can on Python 3.11) must not keep the loop going after shutdown,
    reading through clients that shutdown closes."""
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        late_rounds, test_over = 0, False

        async def refresh_swallowing_cancel(self: Runtime) -> None:
            nonlocal late_rounds
            if test_over:  # ends a loop that did not stop, so a failure cannot hang the run
                raise RuntimeError("test over")
            late_rounds += self.stopping.is_set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise TimeoutError from None  # what run_refresher survives

        monkeypatch.setattr(Runtime, "refresh", refresh_swallowing_cancel)
        rt.settings = dataclasses.replace(rt.settings, refresh_interval_s=0.01)
        loop_task = asyncio.create_task(rt.run_refresher())
        try:
            await asyncio.sleep(0.1)  # a round is waiting in refresh
            rt.stopping.set()
            loop_task.cancel()
            done, _ = await asyncio.wait([loop_task], timeout=2.0)
            await asyncio.sleep(0.1)
        finally:
            test_over = True
            loop_task.cancel()
            await asyncio.wait([loop_task], timeout=2.0)
        assert done, "the loop went on after shutdown"
        assert late_rounds == 0


async def test_stale_co_visitation_is_served_and_read_again_in_the_background(
    settings: Settings, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    """An entry past its half minute still serves decisions (no second round trip on the
    request path) and the refresher reads it again: a neighbour the worker added since
    shows up after the next refresh, not before."""
    a, b, c = (catalog.items[k].item_id for k in range(3))
    keys = Keys(settings.key_prefix)
    await redis_client.zadd(keys.covisit(a), {b: 5.0})
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        now = [1000.0]
        rt.covis = CovisCache(ttl_s=30.0, clock=lambda: now[0])
        row_a, row_b, row_c = (rt.catalog.row(i) for i in (a, b, c))
        found, missing = rt.covis.lookup([row_a])
        assert (found, missing) == ({}, [row_a])  # never read: the request path reads it
        replies = await rt.reader.execute(rt.covis.commands(rt.keys, rt.catalog, missing), 1.0)
        rt.covis.store(missing, replies, rt.catalog)
        await redis_client.zadd(keys.covisit(a), {c: 10.0})
        now[0] += 31
        found, missing = rt.covis.lookup([row_a])
        assert missing == []
        assert found[row_a][0].tolist() == [row_b]  # stale, served as it was
        assert await rt.refresh_covis() == 1
        assert await rt.refresh_covis() == 0  # handed out once
        found, missing = rt.covis.lookup([row_a])
        assert found[row_a][0].tolist() == [row_c, row_b]
        np.testing.assert_allclose(found[row_a][1], [1.0, 0.5])


async def test_a_decision_reads_co_visitation_once_then_from_the_cache(
    settings: Settings, clicks: Any, redis_client: aioredis.Redis
) -> None:
    """kairos_api_covis_reads_total counts the decisions that paid a second round trip for
    co-visitation: the first decision on an item, not the next one."""
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        share = rt.serving.config.holdout_share
        sid = next(s for s in (f"covis-reader-{i}" for i in range(100))
                   if assign(s, share) is Group.TREATMENT)  # fmt: skip
        await clicks(sid, *((EventType.CLICK, f"sku-00000{k}") for k in (3, 4, 5)))

        def reads() -> float:
            return float(rt.metrics.covis_reads._value.get())

        assert reads() == 0
        for expected in (1, 1):
            r = await client.get(f"/v1/slots/home_recs?session_id={sid}")
            assert r.status_code == 200
            assert r.json()["strategy"] == "personalized"
            assert reads() == expected
        metrics = (await client.get("/metrics")).text
        assert "kairos_api_covis_reads_total 1.0" in metrics


async def test_a_starting_api_reads_co_visitation_before_decisions_ask_for_it(
    settings: Settings, catalog: Catalog, clicks: Any, redis_client: aioredis.Redis
) -> None:
    """The warm-up reads every item's co-visitation at start (/readyz waits for it), so a
    decision on a warmed item pays no second round trip; an item with none yet is left to
    the first decision that asks, which then sees what the worker wrote since."""
    a, b, c, d, e = (catalog.items[k].item_id for k in range(5))
    keys = Keys(settings.key_prefix)
    await redis_client.zadd(keys.covisit(a), {b: 5.0, c: 10.0})
    async with client_for(settings) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["covis"] == {"cached_items": 1, "warming": False}
        row_a, row_b, row_c, row_d, row_e = (rt.catalog.row(i) for i in (a, b, c, d, e))
        found, missing = rt.covis.lookup([row_a, row_d])
        assert missing == [row_d]
        assert found[row_a][0].tolist() == [row_c, row_b]
        np.testing.assert_allclose(found[row_a][1], [1.0, 0.5])

        share = rt.serving.config.holdout_share
        sid = next(s for s in (f"warm-{i}" for i in range(100))
                   if assign(s, share) is Group.TREATMENT)  # fmt: skip
        await clicks(sid, (EventType.CLICK, a))
        r = await client.get(f"/v1/slots/home_recs?session_id={sid}")
        assert r.json()["strategy"] == "personalized"
        assert rt.metrics.covis_reads._value.get() == 0  # a was warmed

        await redis_client.zadd(keys.covisit(d), {e: 1.0})  # the worker, since the start
        await clicks(sid, (EventType.CLICK, d))
        r = await client.get(f"/v1/slots/home_recs?session_id={sid}")
        assert rt.metrics.covis_reads._value.get() == 1  # d: read on first ask
        # e, written since the start, and a, from the click before d
        assert rt.covis.lookup([row_d])[0][row_d][0].tolist() == [row_e, row_a]

        rt.covis_warming = True  # as while warm_covis runs
        warming = await client.get("/readyz")
        assert warming.status_code == 503
        assert warming.json()["detail"] == "reading co-visitation (warm-up)"
        assert warming.json()["covis"]["warming"] is True
