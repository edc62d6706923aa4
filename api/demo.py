"""The demo storefront (GET /demo) and the small JSON it needs besides the public API.

The page calls the real endpoints (`/v1/decisions`, `/v1/events`), so every click goes
through Kafka, the worker and Redis. What lives here is only what a real storefront has of
its own: a catalog to browse, a live strip of what the engine is doing, and — in local
mode only — a pause switch the page can flip without the admin token.

    GET  /demo                      the page
    GET  /demo/api/catalog?category=Sports%20%3E%20Running&limit=24
    GET  /demo/api/activity         decisions by strategy, beacons, trending, pauses
    POST /demo/api/pause {"paused": true}   (KAIROS_ENVIRONMENT=local only)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from api.endpoints import JSON, runtime
from api.exceptions import BadRequest
from api.limits import json_body
from stream_engine.catalog import CATEGORY_SEP

PAGE = Path(__file__).resolve().parent / "demo_page.html"
MAX_ITEMS = 60


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE.read_text(), headers={"cache-control": "no-store"})


def _tree(rt: Any) -> list[dict[str, Any]]:
    departments: dict[str, list[str]] = {}
    for leaf in rt.catalog.leaf_names:
        if not leaf:  # items without a category are not in the menu
            continue
        parts = leaf.split(CATEGORY_SEP)
        cats = departments.setdefault(parts[0], [])
        if len(parts) > 1 and parts[1] not in cats:
            cats.append(parts[1])
    return [{"name": d, "categories": c} for d, c in departments.items()]


async def catalog(request: Request) -> Response:
    rt = runtime(request)
    category = request.query_params.get("category", "")
    try:
        limit = min(MAX_ITEMS, max(1, int(request.query_params.get("limit", "24"))))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if category:
        found = rt.serving.category_rows.get(category)
        if found is None:
            raise BadRequest(f"unknown category {category[:80]!r}", 404)
        rows = [int(r) for r in found[:limit]]
    else:  # the front page: the most popular item of each leaf category
        rows = [int(r[0]) for r in rt.serving.category_rows.values() if len(r)][:limit]
    items = []
    for row in rows:
        item = rt.catalog.item(int(row))
        items.append({"item_id": item.item_id, "title": item.title, "brand": item.brand,
                      "category": item.category_path, "price": item.price})  # fmt: skip
    return JSON({"categories": _tree(rt), "category": category, "items": items})


async def activity(request: Request) -> Response:
    rt = runtime(request)
    trending = [rt.catalog.item(int(r)).title for r in rt.serving.trending.get()[:5]]
    return JSON(
        {
            "decisions": dict(rt.tally),
            "beacons": rt.beacons_accepted,
            "trending": trending,
            "pauses": rt.pauses.as_json(),
            "config_version": rt.serving.config.version,
            "kafka": "connected" if rt.beacons.connected else "disconnected",
            "breaker": rt.breaker.state,
        }
    )


async def pause(request: Request) -> Response:
    rt = runtime(request)
    if rt.settings.environment != "local":
        raise BadRequest("the demo pause switch only works in local mode; use /admin/pause", 403)
    body = json_body(await request.body())
    paused = body.get("paused") if isinstance(body, dict) else None
    if not isinstance(paused, bool):
        raise BadRequest('body must be {"paused": true|false}')
    rt.pauses.everything = paused
    return JSON({"pauses": rt.pauses.as_json()})


routes = [
    Route("/", page),
    Route("/api/catalog", catalog),
    Route("/api/activity", activity),
    Route("/api/pause", pause, methods=["POST"]),
]
