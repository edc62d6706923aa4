"""How long the API's background work holds its event loop, by catalog size.

    python -m loadtest stalls [--items 100000] [--changes 100] [--new 10] [--repeats 3]

Every decision of an API process waits while its event loop runs something else. The
background work (catalog changes, a compile of the rules and banners, a new learned model)
runs on that loop too, and its cost grows with the catalog: what is nothing at 10,000
items can hold every request for a tenth of a second at 100,000. This measures it on an
API app in this process, on the real Redis, with a catalog of --items written to Redis
the way the worker mirrors it:

  idle        nothing but the background loops: the same-run baseline;
  catalog     a refresh after --changes stock changes reach the mirror (every purchase
              changes stock on a live catalog);
  compile     a refresh after one price change (a price moves an item's vector: rules,
              banners and category rows compiled again, as on a new learned model or a
              window's start or end);
  latent      a refresh that installs a newer learned model (the learner publishes one a
              minute);
  new         a refresh after --new new items reach the mirror, one of them in a leaf
              category no item had before (merchandisers add items all day);
  reload      an admin reload of the decision config (rules and banners compiled again).

A ticker sleeps 1 ms at a time; the figure is the longest it waited beyond that while the
work ran (ms), beside the work's CPU on the loop's thread. Medians over --repeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from loadtest.ingest import discard_workdir
from stream_engine.catalog import Catalog, Item
from stream_engine.catalog_updates import mirror
from stream_engine.demo_catalog import write_demo_catalog
from stream_engine.latent import NEIGHBOURS, LatentModel, publish
from stream_engine.looplag import LoopLag

MEASURES = ("idle", "catalog", "compile", "latent", "new", "reload")
TTL_MS = 600_000
MODEL_ITEMS = 20_000  # the learner's default KAIROS_LATENT_MAX_ITEMS


class Ticker:
    """The event loop's waits: a LoopLag ticking every 1 ms, and the latest tick since
    `around` began."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._lag = LoopLag(tick_s=0.001, observe=self._seen)
        self._task: asyncio.Task[None] | None = None

    def _seen(self, lag_s: float) -> None:
        self.longest = max(self.longest, lag_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._lag.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def around(self, work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
        """(the loop's longest wait, the work's CPU on this thread), ms."""
        await asyncio.sleep(0.05)  # the ticker running
        self.longest = 0.0
        cpu = time.thread_time()
        await work()
        cpu = time.thread_time() - cpu
        await asyncio.sleep(0.01)  # a wait the work ended inside is recorded
        return self.longest * 1000, cpu * 1000


def random_model(catalog: Catalog, version: int, rng: np.random.Generator) -> LatentModel:
    n = min(MODEL_ITEMS, len(catalog.items))
    dims = catalog.space.latent_dims
    return LatentModel(
        version, tuple(it.item_id for it in catalog.items[:n]),
        rng.standard_normal((n, dims)).astype(np.float32),
        rng.integers(0, n, (n, NEIGHBOURS)).astype(np.int32),
        np.ones((n, NEIGHBOURS), np.float32), int(time.time() * 1000),
    )  # fmt: skip


def summarize(rounds: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in rounds.items():
        if not values:
            raise ValueError(f"no {name} rounds measured")
        out[name] = {"longest_wait_ms": statistics.median(w for w, _ in values),
                     "cpu_ms": statistics.median(c for _, c in values)}  # fmt: skip
    return out


def new_items(catalog: Catalog, round_: int, count: int) -> list[Item]:
    """`count` items no catalog had, like existing ones; the first in a new leaf category."""
    out = []
    for i in range(count):
        like = catalog.items[(round_ * count + i) * 7 % len(catalog.items)]
        category = like.category
        if i == 0 and category:
            category = (*category[:-1], f"{category[-1]} New {round_}")
        out.append(dataclasses.replace(like, item_id=f"new-{round_}-{i}", category=category,
                                       title=f"New {like.title}"))  # fmt: skip
    return out


async def run(items: int, changes: int, repeats: int, new: int = 10) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="kairos-stalls-"))
    path = write_demo_catalog(workdir / "catalog.jsonl", items)
    prefix = f"stalls-{uuid.uuid4().hex[:8]}"
    redis_url = os.environ.get("KAIROS_REDIS_URL", "redis://127.0.0.1:6379/0")
    os.environ.update({
        "KAIROS_REDIS_URL": redis_url, "KAIROS_KEY_PREFIX": prefix,
        "KAIROS_CATALOG_PATH": str(path), "KAIROS_STACK_DIR": str(workdir),
    })  # fmt: skip
    from api.app import create_app  # the API's modules only now (see loadtest/cost.py)
    from api.settings import Settings

    redis = aioredis.Redis.from_url(redis_url)
    catalog = Catalog.from_file(path)
    rng = np.random.default_rng(26)
    for start in range(0, len(catalog.items), 5000):  # the worker's mirror of the catalog
        await mirror(redis, prefix, catalog.items[start : start + 5000], TTL_MS)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in MEASURES}
    ticker = Ticker()
    app = create_app(Settings.from_env(os.environ))
    try:
        async with app.router.lifespan_context(app):
            rt = app.state.runtime
            for _ in range(1200):  # the start's co-visitation warm-up, 60 s at most
                if not rt.covis_warming:
                    break
                await asyncio.sleep(0.05)
            await rt.refresh()  # the whole mirror, once, as at any start
            ticker.start()
            for r in range(repeats):
                rounds["idle"].append(await ticker.around(lambda: asyncio.sleep(0.5)))
                picked = catalog.items[r * changes : (r + 1) * changes]
                changed = [dataclasses.replace(it, stock=(it.stock or 0) + r + 1) for it in picked]
                await mirror(redis, prefix, changed, TTL_MS)
                rounds["catalog"].append(await ticker.around(rt.refresh))
                last = changed[-1]
                if rt.catalog.item(rt.catalog.row(last.item_id)).stock != last.stock:
                    raise RuntimeError("the refresh did not apply the catalog changes")

                item = changed[0]
                await mirror(redis, prefix, [dataclasses.replace(item, price=item.price + 1)],
                             TTL_MS)  # fmt: skip
                compiled = rt.serving.compiled
                rounds["compile"].append(await ticker.around(rt.refresh))
                if rt.serving.compiled.compiled_at == compiled.compiled_at:
                    raise RuntimeError("the refresh after a price change did not compile")
                await publish(redis, prefix, random_model(catalog, r + 1, rng), TTL_MS)
                rounds["latent"].append(await ticker.around(rt.refresh))
                if rt.catalog.latent_version != r + 1:
                    raise RuntimeError("the refresh did not install the learned model")
                added = new_items(catalog, r, new)
                await mirror(redis, prefix, added, TTL_MS)
                rounds["new"].append(await ticker.around(rt.refresh))
                if rt.catalog.row(added[-1].item_id) is None or rt.serving.size != (
                    len(catalog.items) + (r + 1) * new
                ):
                    raise RuntimeError("the refresh did not add the new items")
                compiled = rt.serving.compiled
                rounds["reload"].append(await ticker.around(lambda: rt.reload_config(force=True)))
                if rt.serving.compiled.compiled_at == compiled.compiled_at:
                    raise RuntimeError("the admin reload did not compile")
                print(f"  round {r + 1}  " + "  ".join(
                    f"{name} {rounds[name][-1][0]:.1f} ms (cpu {rounds[name][-1][1]:.1f})"
                    for name in MEASURES), flush=True)  # fmt: skip
            await ticker.stop()
    finally:
        async for key in redis.scan_iter(f"{prefix}:*"):
            await redis.delete(key)
        await redis.aclose()
        discard_workdir(workdir)
    summary = summarize(rounds)
    print(f"\nthe API's event loop with {items:,} items, median of {repeats}: its longest wait "
          "during each piece of work, and that work's CPU on the loop's thread")  # fmt: skip
    for name in MEASURES:
        s = summary[name]
        print(f"  {name:<8} {s['longest_wait_ms']:7.1f} ms   cpu {s['cpu_ms']:7.1f} ms")
    return summary
