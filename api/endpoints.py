"""Public decision endpoints: GET /v1/slots/{slot} and POST /v1/decisions.

A fallback is a normal 200: the body's `fallback_reason` and the `X-Kairos-Fallback`
header say what was served instead and why. Bad input is a 4xx that says what is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.config import Slot
from api.decisions import PageAsk, SlotAsk, SlotDecision
from api.exceptions import BadRequest
from api.limits import json_body, valid_id
from api.runtime import Runtime

MAX_PAGE_SLOTS = 10
FALLBACK_HEADER = "x-kairos-fallback"
VERSION_HEADER = "x-kairos-config-version"


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _slot(rt: Runtime, name: Any) -> Slot:
    slots = rt.serving.config.slots
    if not isinstance(name, str) or name not in slots:
        known = ", ".join(sorted(slots))
        raise BadRequest(f"unknown slot {str(name)[:64]!r}; this config has: {known}", 404)
    return slots[name]


def _n(slot: Slot, raw: Any, query: bool = True) -> int:
    """A slot's `n`: the digits of a query value, or a JSON integer (3.0 is one, as JSON
    Schema has it); blank in a query or null in JSON for the slot's default. Not 3.5, true,
    "3" or "" in JSON."""
    if raw is None or (query and raw == ""):
        return slot.n
    if query and isinstance(raw, str) and raw.isascii() and raw.isdigit():
        n = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        n = raw
    elif isinstance(raw, float) and raw.is_integer():
        n = int(raw)
    else:
        raise BadRequest(f"n must be an integer, got {str(raw)[:32]!r}")
    if not 1 <= n <= slot.max_n:
        raise BadRequest(f"n must be between 1 and {slot.max_n} for slot {slot.name}")
    return n


_FLAGS = {"true": True, "1": True, "false": False, "0": False, "": False}


def _flag(raw: Any, name: str) -> bool:
    """true or false, as JSON or as a query's text ("1", "0"); blank or null is false. Not
    the numbers 1 and 0, which Python would take for True and False."""
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    if isinstance(raw, str) and raw in _FLAGS:
        return _FLAGS[raw]
    raise BadRequest(f"{name} must be true or false")


def _headers(decisions: list[SlotDecision]) -> dict[str, str]:
    headers = {VERSION_HEADER: decisions[0].config_version if decisions else ""}
    reasons = sorted({d.fallback_reason.value for d in decisions if d.fallback_reason})
    if reasons:
        headers[FALLBACK_HEADER] = ",".join(reasons)
    return headers


def _stamped(body: dict[str, Any], started: float) -> dict[str, Any]:
    body["served_in_ms"] = round((time.perf_counter() - started) * 1000, 3)
    return body


def _answer(decisions: list[SlotDecision], body: dict[str, Any], started: float) -> Response:
    return JSON(_stamped(body, started), headers=_headers(decisions))


SLOT_PARAMS = ("session_id", "user_id", "n", "item_id", "sensitive_ok")


def slot_query(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A slot request's query as one value a name. One of the slot's parameters given twice
    (`session_id=a&session_id=b`) is a 400: which visitor or how many items was asked for is
    not the API's guess to make (the last one used to win). Other names are ignored."""
    q: dict[str, str] = {}
    for name, value in pairs:
        if name in q and name in SLOT_PARAMS:
            raise BadRequest(f"{name} given more than once")
        q[name] = value
    return q


async def slot_body(
    rt: Runtime, slot_name: str, q: Mapping[str, str], started: float
) -> tuple[bytes, dict[str, str]]:
    """GET /v1/slots/{slot} without the HTTP around it: the JSON body and its headers.
    Raises BadRequest for bad input."""
    slot = _slot(rt, slot_name)
    page = PageAsk(
        session_id=valid_id(q.get("session_id"), "session_id") or "",
        user_id=valid_id(q.get("user_id"), "user_id", required=False),
        asks=(SlotAsk(slot, _n(slot, q.get("n"))),),
        context_item=valid_id(q.get("item_id"), "item_id", required=False),
        sensitive_ok=_flag(q.get("sensitive_ok"), "sensitive_ok"),
    )
    decisions = await rt.decide(page)
    body = orjson.dumps(_stamped(decisions[0].as_json(), started))
    rt.metrics.handled("slots", time.perf_counter() - started)
    return body, _headers(decisions)


async def slot_decision(request: Request) -> Response:
    """One slot for one visitor: GET /v1/slots/{slot}?session_id=…[&user_id=…][&n=…]
    [&item_id=…][&sensitive_ok=true]. Normally answered by FastSlots (api/fastpath.py)
    before Starlette's router; this route serves what it passes on."""
    started = time.perf_counter()
    q = slot_query(request.query_params.multi_items())
    body, headers = await slot_body(runtime(request), request.path_params["slot"], q, started)
    return Response(body, media_type=JSON.media_type, headers=headers)


def _page(rt: Runtime, body: Any) -> PageAsk:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    raw_slots = body.get("slots")
    if not isinstance(raw_slots, list) or not 1 <= len(raw_slots) <= MAX_PAGE_SLOTS:
        raise BadRequest(f"slots must be a list of 1 to {MAX_PAGE_SLOTS} slots")
    asks: list[SlotAsk] = []
    for entry in raw_slots:
        spec = entry if isinstance(entry, dict) else {"slot": entry}
        slot = _slot(rt, spec.get("slot"))
        if any(a.slot.name == slot.name for a in asks):
            raise BadRequest(f"slot {slot.name} is asked for twice")
        asks.append(SlotAsk(slot, _n(slot, spec.get("n"), query=False)))
    return PageAsk(
        session_id=valid_id(body.get("session_id"), "session_id") or "",
        user_id=valid_id(body.get("user_id"), "user_id", required=False),
        asks=tuple(asks),
        context_item=valid_id(body.get("item_id"), "item_id", required=False),
        sensitive_ok=_flag(body.get("sensitive_ok"), "sensitive_ok"),
    )


async def page_decisions(request: Request) -> Response:
    """Several slots of one page: one state read, no item twice on the page.

    Body: {"session_id": "…", "user_id": "…"?, "item_id": "…"?, "slots": ["home_hero",
    {"slot": "home_recs", "n": 8}]}"""
    started = time.perf_counter()
    rt = runtime(request)
    page = _page(rt, json_body(await request.body()))
    decisions = await rt.decide(page)
    body = {"session_id": page.session_id, "decisions": [d.as_json() for d in decisions]}
    response = _answer(decisions, body, started)
    rt.metrics.handled("decisions", time.perf_counter() - started)
    return response


async def static_baseline(request: Request) -> Response:
    """The benchmark's baseline: same process, same stack, a static payload."""
    return JSON(STATIC)


STATIC = {
    "slot": "baseline",
    "strategy": "default",
    "items": [{"item_id": f"sku-{i:06d}", "reason": "static"} for i in range(8)],
}
