"""The API's first slice: health endpoints, on the real Redis and on an absent one."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import Stack


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, behind an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kairos") as client:
            yield client


def _no_redis() -> Settings:
    return Settings(redis_url=f"redis://127.0.0.1:{_dead_port()}/0")


async def test_healthz_answers_without_dependencies() -> None:
    async with client_for(_no_redis()) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.integration
async def test_readyz_is_ready_with_the_real_redis(stack: Stack) -> None:
    async with client_for(Settings(redis_url=stack.redis_url)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "redis": "ok"}


async def test_readyz_says_why_when_redis_is_down() -> None:
    async with client_for(_no_redis()) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] == "unavailable"


async def test_unknown_paths_answer_json() -> None:
    async with client_for(_no_redis()) as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}
