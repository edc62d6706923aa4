"""The decision API application: `create_app(settings)` builds it, clients open in lifespan.

This first slice serves health only (`/healthz`, `/readyz`); the slot endpoints, the beacon
collector and the rest of the decision API arrive with their issue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.settings import Settings
from stream_engine.store import connect


@dataclass
class State:
    settings: Settings
    redis: aioredis.Redis


def _state(request: Request) -> State:
    state: State = request.app.state.kairos
    return state


async def healthz(request: Request) -> Response:
    """Alive: the process answers. Says nothing about its dependencies (see /readyz)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: Redis answers within the store budget. 503 with the reason otherwise."""
    state = _state(request)
    try:
        async with asyncio.timeout(state.settings.redis_timeout_ms / 1000):
            await state.redis.ping()
    except (OSError, TimeoutError, aioredis.RedisError) as exc:
        body = {"status": "not_ready", "redis": "unavailable", "detail": type(exc).__name__}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok"})


async def http_error(request: Request, exc: Exception) -> Response:
    """Every error answers JSON with the status and what went wrong."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code
    )


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, timeout_s=settings.redis_timeout_ms / 1000)
        app.state.kairos = State(settings, redis)
        try:
            yield
        finally:
            await redis.aclose()

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
