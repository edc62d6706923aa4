"""The decision API application: `create_app(settings)` builds it, clients open in lifespan.

    GET  /v1/slots/{slot}   POST /v1/decisions   POST /v1/events
    GET  /healthz  /readyz  /metrics  /openapi.json
    /admin/...     (bearer token; see api/admin.py)

The app starts without Kafka (exposures and beacons queue, then drop and count) and
without Redis (every decision is a default with its reason until Redis answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, request_response

from api import admin, demo
from api.collector import collect
from api.config import load_config
from api.endpoints import JSON, page_decisions, runtime, slot_decision, static_baseline
from api.exceptions import BadRequest
from api.fallback import Limiter, RunQueueClock
from api.fastpath import FastSlots, SlotRoute
from api.items import ServingCatalog
from api.limits import BodyLimit
from api.metrics import ApiMetrics
from api.openapi import document
from api.publisher import Publisher
from api.runtime import STORE_ERRORS, ConfigSource, Runtime, initial_serving
from api.session_state import StateReader
from api.settings import Settings
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import resolve_catalog_path
from stream_engine.heap import freeze_startup_heap
from stream_engine.state import Keys
from stream_engine.store import Batches, connect, store_unavailable

log = logging.getLogger("kairos.api")

DEMO_CONFIG = Path(__file__).resolve().parent / "demo_config.yaml"

# Background reads and admin operations: seconds, not the request path's milliseconds.
BACKGROUND_TIMEOUT_S = 5.0


# /readyz asks whether Redis is reachable, not whether it is within a decision's read
# budget: the decisions have their own deadline and breaker, and a probe that failed
# whenever a busy machine held one ping past 15 ms (seen in CI while Kafka warmed up) would
# take the API out of rotation for being busy, which the defaults already handle.
READY_PING_S = 0.25


async def healthz(request: Request) -> Response:
    """Alive: the process answers. Says nothing about its dependencies (see /readyz)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: Redis answers within READY_PING_S, a config is in force, and the
    co-visitation warm-up (Runtime.warm_covis) is over, so the first visitors do not pay a
    second Redis round trip each."""
    rt = runtime(request)
    config = {"version": rt.serving.config.version, "reload_error": rt.source.error}
    catalog = {"items": len(rt.catalog), "latent_version": rt.catalog.latent_version,
               "updates_applied": int(rt.catalog_version or 0)}  # fmt: skip
    covis = {"cached_items": len(rt.covis), "warming": rt.covis_warming}
    # Kafka is reported, not required: decisions are served without it (exposures and
    # beacons queue, then drop and count).
    kafka = "connected" if rt.publisher.connected and rt.beacons.connected else "disconnected"
    if rt.covis_warming:  # a fraction of a second: 10,000 items in ~0.2 s
        body = {"status": "not_ready", "detail": "reading co-visitation (warm-up)",
                "kafka": kafka, "config": config, "catalog": catalog, "covis": covis}  # fmt: skip
        return JSONResponse(body, status_code=503)
    try:
        async with asyncio.timeout(max(READY_PING_S, rt.settings.redis_timeout_ms / 1000)):
            await rt.redis.ping()
    except (TimeoutError, *STORE_ERRORS) as exc:
        body = {"status": "not_ready", "redis": "unavailable", "detail": type(exc).__name__,
                "kafka": kafka, "config": config, "catalog": catalog, "covis": covis}  # fmt: skip
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok", "kafka": kafka, "config": config,
                         "catalog": catalog, "covis": covis})  # fmt: skip


async def metrics_endpoint(request: Request) -> Response:
    registry = runtime(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSON(document(runtime(request).serving.config))


async def http_error(request: Request, exc: Exception) -> Response:
    """Every error answers JSON with the status and what went wrong, and the headers the
    error carries (a 405's Allow: the methods the path takes, as RFC 9110 requires)."""
    assert isinstance(exc, HTTPException)
    return JSON({"error": exc.detail, "status": exc.status_code}, exc.status_code,
                headers=exc.headers)  # fmt: skip


async def bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    # a body late (408): the connection closes after the answer, or what is left of the body
    # would be read as the next request
    headers = {"connection": "close"} if exc.status == 408 else None
    return JSON({"error": exc.detail, "status": exc.status}, exc.status, headers=headers)


async def store_error(request: Request, exc: Exception) -> Response:
    """An admin operation that needs Redis (an erasure, the report) while Redis is down or
    refusing writes: a 503 that says so, where it was a bare 500. The decision endpoints
    never get here, they serve defaults. Any other Redis error is a bug: still a 500."""
    if not store_unavailable(exc):
        raise exc
    detail = f"Redis is unavailable ({type(exc).__name__}); it may not have been done: retry"
    return JSON({"error": detail, "status": 503}, 503, headers={"retry-after": "1"})


def build_runtime(settings: Settings, metrics: ApiMetrics) -> Runtime:
    """Everything but the event loop's tasks; raises ConfigFileError or CatalogError."""
    config_path = Path(settings.config_path) if settings.config_path else DEMO_CONFIG
    config = load_config(config_path)
    path = resolve_catalog_path(settings.catalog_path, settings.stack_dir)
    catalog = ServingCatalog(Catalog.from_file(path))
    keys = Keys(settings.key_prefix)
    # No per-command socket timeout on the request path: every use (the state read, the
    # co-visitation read, /readyz) bounds its whole round trip with one asyncio.timeout,
    # and redis-py's own timer per write (asyncio.wait_for: a new Task) and per reply cost
    # ~4% of the API's CPU at 1,500 requests/s.
    redis = connect(settings.redis_url, max_connections=settings.redis_connections + 2,
                    timeout_s=None)  # fmt: skip
    reader = StateReader(redis, keys, catalog.space.dims, settings.user_half_life_s * 1000,
                         settings.redis_connections, settings.redis_reads)  # fmt: skip
    background = connect(settings.redis_url, max_connections=4, timeout_s=BACKGROUND_TIMEOUT_S)

    def dropped(topic: str, why: str, count: int) -> None:
        metrics.dropped.labels(topic, why).inc(count)

    rt = Runtime(
        settings=settings,
        redis=redis,
        reader=reader,
        catalog=catalog,
        serving=initial_serving(config, catalog),
        source=ConfigSource(config_path, config_path.stat().st_mtime_ns),
        metrics=metrics,
        # Exposures wait up to 100 ms to share produce requests (attribution reads them in
        # seconds): librdkafka lingers per partition, so at 2,000 decisions/s on 4
        # partitions 20 ms made ~160 requests a second for the broker, 100 ms ~40. Beacons
        # go at once (a click's freshness starts when it is collected).
        publisher=Publisher(
            settings.kafka_bootstrap, settings.publish_queue, dropped, 100, security=settings.kafka
        ),
        beacons=Publisher(
            settings.kafka_bootstrap, settings.publish_queue, dropped, 0, security=settings.kafka
        ),
        keys=keys,
        background=background,
        background_batches=Batches(background),
        limiter=Limiter(
            0.010,
            max_cpu_share=settings.max_cpu_share,
            max_runqueue_share=settings.max_runqueue_share,
            runqueue_clock=RunQueueClock(),
        ),
    )
    metrics.config_version.labels(config.version).set(1)
    metrics.watch(
        in_flight=lambda: rt.limiter.in_flight,
        limit=lambda: rt.limiter.limit,
        breaker_open=lambda: 0.0 if rt.breaker.state == "closed" else 1.0,
        loop_lag=lambda: rt.lag.recent_s,
        cpu_share=lambda: rt.limiter.cpu_share,
        runqueue_share=lambda: rt.limiter.runqueue_share,
    )
    return rt


def create_app(
    settings: Settings, metrics: ApiMetrics | None = None, fast_path: bool = True
) -> Starlette:
    """fast_path=False leaves GET /v1/slots to Starlette's route (the tests compare them)."""
    metrics = metrics or ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = build_runtime(settings, metrics)
        app.state.runtime = rt
        rt.publisher.start()
        rt.beacons.start()
        with contextlib.suppress(TimeoutError, *STORE_ERRORS):
            await rt.reader.warm()
            await rt.refresh()  # trending at once when Redis is there; else the loop retries
        freeze_startup_heap()
        rt.covis_warming = True  # not ready until warm_covis is over (/readyz)
        tasks = [
            asyncio.create_task(rt.run_refresher(), name="kairos-refresher"),
            asyncio.create_task(rt.run_covis_refresher(), name="kairos-covis-refresher"),
            asyncio.create_task(rt.warm_covis(), name="kairos-covis-warm-up"),
            asyncio.create_task(rt.run_reporter(), name="kairos-reporter"),
            asyncio.create_task(rt.lag.run(), name="kairos-loop-lag"),
            asyncio.create_task(rt.run_pressure_reporter(), name="kairos-pressure"),
        ]
        try:
            yield
        finally:
            rt.stopping.set()
            for task in tasks:
                task.cancel()
            # bounded: a task stuck in a client library must not hold the shutdown. A
            # cancellation can be lost on Python 3.11 (asyncio.wait_for, which redis-py uses
            # for writes, returns a result that arrived with it); `stopping` then ends the
            # loop after its round, and a second cancel covers a round that is waiting.
            _, stuck = await asyncio.wait(tasks, timeout=2.0)
            if stuck:
                for task in stuck:
                    task.cancel()
                _, stuck = await asyncio.wait(stuck, timeout=2.0)
            for task in stuck:
                log.warning("background task %s did not stop", task.get_name())
            await rt.publisher.stop()
            await rt.beacons.stop()
            await rt.reader.aclose()
            await rt.background_batches.aclose()
            await rt.background.aclose()
            await rt.redis.aclose()

    beacons = CORSMiddleware(
        request_response(collect),
        allow_origins=settings.origins,
        allow_methods=["POST"],
        allow_headers=["content-type"],
        max_age=600,
    )
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/openapi.json", openapi),
        Route("/v1/slots/{slot}", slot_decision),
        Route("/v1/decisions", page_decisions, methods=["POST"]),
        Route("/v1/events", beacons, methods=["POST", "OPTIONS"]),
        Mount("/demo", routes=demo.routes),
        Mount(
            "/admin",
            routes=[
                Route("/status", admin.status),
                Route("/pause", admin.pause, methods=["POST"]),
                Route("/reload", admin.reload, methods=["POST"]),
                Route("/erase", admin.erase, methods=["POST"]),
                Route("/report", admin.report),
                Route("/report/page", admin.report_page),
                Route("/openapi.json", admin.openapi),
            ],
        ),
    ]
    if settings.bench_static:
        routes.append(Route("/bench/static", static_baseline))
    app = Starlette(
        routes=routes,
        middleware=[
            *([Middleware(FastSlots, static=settings.bench_static)] if fast_path else []),
            Middleware(
                BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
            ),
        ],
        exception_handlers={
            HTTPException: http_error,
            BadRequest: bad_request,
            RedisError: store_error,
        },
        lifespan=lifespan,
    )
    # what KairosHttpProtocol (api/server.py) answers before ASGI, on the same code
    app.state.slot_route = SlotRoute(settings.bench_static) if fast_path else None
    return app
