"""Admin operations under /admin, behind `Authorization: Bearer <KAIROS_ADMIN_TOKEN>`.

    GET  /admin/status                 config in force, last reload error, pauses, guards
    POST /admin/pause   {"slot": "home_hero"?, "paused": true}   (no slot = everything)
    POST /admin/reload                 re-read the config file now (422 with the error)
    POST /admin/erase   {"session_id": "…"} or {"user_id": "…"}  erase state now
    GET  /admin/report?minutes=60      the zero-to-zero report (api/report.py)
    GET  /admin/report/page            the same with charts (token asked in the page)
    GET  /admin/openapi.json           these routes' OpenAPI document

With no token configured (local mode only) every admin route answers 403.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from api.endpoints import JSON, runtime
from api.exceptions import BadRequest, ConfigFileError
from api.limits import json_body, valid_id
from api.openapi import admin_document
from api.report import MAX_REPORT_MINUTES, Window, build_report, read_counters
from stream_engine.erasure import erase_session, erase_user


def _authorize(request: Request) -> None:
    token = runtime(request).settings.admin_token
    if not token:
        raise BadRequest("admin routes are disabled: set KAIROS_ADMIN_TOKEN", 403)
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise BadRequest("missing or wrong admin token", 401)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    body = json_body(raw) if raw else {}
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def status(request: Request) -> Response:
    _authorize(request)
    rt = runtime(request)
    config = rt.serving.config
    return JSON(
        {
            "config": {"version": config.version, "source": config.source,
                       "reload_error": rt.source.error},
            "pauses": rt.pauses.as_json(),
            "breaker": rt.breaker.state,
            "in_flight": {"now": rt.limiter.in_flight, "limit": int(rt.limiter.limit)},
            "kafka": {
                "exposures": "connected" if rt.publisher.connected else "disconnected",
                "beacons": "connected" if rt.beacons.connected else "disconnected",
            },
            "catalog_items": len(rt.catalog),
        }
    )  # fmt: skip


async def pause(request: Request) -> Response:
    _authorize(request)
    rt = runtime(request)
    body = await _body(request)
    paused = body.get("paused", True)
    if not isinstance(paused, bool):
        raise BadRequest("paused must be true or false")
    slot = body.get("slot")
    if slot is None:
        rt.pauses.everything = paused
    elif not isinstance(slot, str):  # a list or an object is no slot (and no dict key)
        raise BadRequest("slot must be a slot's name")
    elif slot not in rt.serving.config.slots:
        raise BadRequest(f"unknown slot {str(slot)[:64]!r}", 404)
    elif paused:
        rt.pauses.slots.add(slot)
    else:
        rt.pauses.slots.discard(slot)
    return JSON({"pauses": rt.pauses.as_json()})


async def reload(request: Request) -> Response:
    _authorize(request)
    rt = runtime(request)
    try:
        await rt.reload_config(force=True)
    except ConfigFileError as exc:
        body = {"error": str(exc), "status": 422, "in_force": rt.serving.config.version}
        return JSON(body, 422)
    return JSON({"version": rt.serving.config.version})


async def report(request: Request) -> Response:
    """The zero-to-zero report over the last `minutes` (default 60) as JSON."""
    _authorize(request)
    rt = runtime(request)
    raw = request.query_params.get("minutes", "60")
    if not (raw.isascii() and raw.isdigit()):  # int() takes " 60", "+60" and "٦٠"
        raise BadRequest("minutes must be an integer")
    minutes = int(raw)
    if not 1 <= minutes <= MAX_REPORT_MINUTES:
        raise BadRequest(f"minutes must be between 1 and {MAX_REPORT_MINUTES}")
    window = Window(minutes, int(time.time() * 1000))
    totals, series, counts = await read_counters(rt.read_report, rt.settings.key_prefix, window)
    return JSON(build_report(rt.serving.config, totals, series, counts, window))


REPORT_PAGE = Path(__file__).resolve().parent / "report_page.html"


async def openapi(request: Request) -> Response:
    """The admin routes' OpenAPI document (the public one is GET /openapi.json)."""
    _authorize(request)
    return JSON(admin_document(runtime(request).serving.config, MAX_REPORT_MINUTES))


async def report_page(request: Request) -> Response:
    """The report with charts. The page holds no data: it asks for the token (or takes it
    from the URL fragment, which never reaches the server) and reads /admin/report."""
    return HTMLResponse(REPORT_PAGE.read_text(), headers={"cache-control": "no-store"})


async def erase(request: Request) -> Response:
    _authorize(request)
    rt = runtime(request)
    body = await _body(request)
    sid = valid_id(body.get("session_id"), "session_id", required=False)
    uid = valid_id(body.get("user_id"), "user_id", required=False)
    if (sid is None) == (uid is None):
        raise BadRequest("give exactly one of session_id or user_id")
    ttl_ms = rt.settings.erasure_ttl_s * 1000
    if uid is not None:
        sessions = await erase_user(rt.background, rt.keys, uid, ttl_ms)
        return JSON({"erased": {"user_id": uid, "sessions": sessions}})
    assert sid is not None
    await erase_session(rt.background, rt.keys, sid, ttl_ms)
    return JSON({"erased": {"session_id": sid}})
