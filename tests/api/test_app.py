"""Health, readiness and error shapes, on the real Redis and on an absent one."""

from __future__ import annotations

from api.settings import Settings
from tests.api.conftest import client_for, with_
from tests.conftest import free_port


def _no_redis(settings: Settings) -> Settings:
    return with_(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")


async def test_healthz_answers_without_dependencies(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_with_the_real_redis(settings: Settings) -> None:
    async with client_for(settings) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["redis"] == "ok"
    assert body["config"] == {"version": "demo-2026-11-22.1", "reload_error": None}


async def test_readyz_says_why_when_redis_is_down(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] == "unavailable"


async def test_unknown_paths_answer_json(settings: Settings) -> None:
    async with client_for(_no_redis(settings)) as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}
