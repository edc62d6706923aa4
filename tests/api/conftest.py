"""API fixtures: a demo catalog file shared with an in-process stream processor, settings
pointing at the real stack with this test's key prefix, an in-process HTTP client, and the
app served by a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from api.app import create_app
from api.server import server_options
from api.settings import Settings
from stream_engine.catalog import Catalog
from stream_engine.events import Event, EventType, encode_event
from stream_engine.planning import Tuning
from stream_engine.processor import BatchProcessor, Record, Ttls
from stream_engine.state import Keys
from tests.conftest import Stack, wait_for

ADMIN_TOKEN = "test-admin-token-0123456789"
TUNING = Tuning(1_800_000, 14 * 86_400_000, 7 * 86_400_000, 6 * 3_600_000)
TTLS = Ttls(3_600_000, 86_400_000, 86_400_000, 86_400_000)


@pytest.fixture(scope="session")
def catalog(catalog_file: Path) -> Catalog:
    return Catalog.from_file(catalog_file)


@pytest.fixture
def settings(stack: Stack, key_prefix: str, catalog_file: Path, unique: str) -> Settings:
    return Settings(
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        key_prefix=key_prefix,
        catalog_path=str(catalog_file),
        admin_token=ADMIN_TOKEN,
        clickstream_topic=f"clickstream.{unique}",
        decisions_topic=f"decisions.{unique}",
        refresh_interval_s=0.2,
        # The API runs inside the pytest process, whose CPU (the tests', hypothesis's) is
        # not the API's load: the CPU-share limiter stays off unless a test turns it on.
        max_cpu_share=0.0,
        max_runqueue_share=0.0,  # and the box's other work (the stack, CI) is not either
        # ...nor are its pauses: with the production 15 ms read budget, CI runs saw an
        # answer `timeout` or `overload` where identical requests read the state. Tests
        # compare answers; the few that are about budgets set their own.
        redis_timeout_ms=500.0,
        deadline_ms=600.0,
    )


@asynccontextmanager
async def client_for(
    settings: Settings, fast_path: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, behind an in-process HTTP client."""
    app = create_app(settings, fast_path=fast_path)
    async with app.router.lifespan_context(app):
        # Tests write their state after the start: a warm-up reading co-visitation while a
        # test clicks would cache whatever it caught (api/runtime.py, warm_covis).
        await wait_for(lambda: not app.state.runtime.covis_warming, 10, "co-visitation warm-up")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kairos") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app as `python -m api` serves it (uvicorn, KairosHttpProtocol, its lifespan), on
    a free loopback port, behind an HTTP client; `client.app` is the app."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **server_options(settings)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started or task.done(), 30, "uvicorn start")
        if task.done():
            task.result()  # raises what stopped it
        await wait_for(lambda: not app.state.runtime.covis_warming, 10, "co-visitation warm-up")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


def with_(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)  # type: ignore[arg-type]


class Clicks:
    """Writes session state with the real stream processor (the worker's code path)."""

    def __init__(self, processor: BatchProcessor) -> None:
        self.processor = processor
        self.offset = 0
        self.t0 = int(time.time() * 1000) - 120_000
        self._n = iter(range(10**9))

    async def __call__(self, sid: str, *events: tuple[EventType, str | None], **kw: object) -> None:
        records = []
        for etype, item in events:
            n = next(self._n)
            event = Event(f"e{n}", etype, sid, self.t0 + 100 * n, item_id=item, **kw)  # type: ignore[arg-type]
            records.append(Record(0, self.offset, sid.encode(), encode_event(event), self.t0))
            self.offset += 1
        out = await self.processor.process(records)
        assert not out.dead


@pytest.fixture
async def clicks(
    redis_client: aioredis.Redis, key_prefix: str, catalog: Catalog
) -> AsyncIterator[Clicks]:
    processor = BatchProcessor(redis_client, Keys(key_prefix), catalog, TUNING, TTLS)
    yield Clicks(processor)
    await processor.aclose()


@pytest.fixture
def items_in(catalog: Catalog) -> Callable[[str], list[str]]:
    def pick(category: str) -> list[str]:
        return [it.item_id for it in catalog.items
                if it.category_path.startswith(category) and it.available]  # fmt: skip

    return pick


@pytest.fixture
async def topics(kafka_admin: AIOKafkaAdminClient, settings: Settings) -> AsyncIterator[None]:
    """The API's clickstream and decisions topics of this test, on the real broker."""
    names = [settings.clickstream_topic, settings.decisions_topic]
    await kafka_admin.create_topics([NewTopic(n, 1, 1) for n in names])
    yield
    await kafka_admin.delete_topics(names)
