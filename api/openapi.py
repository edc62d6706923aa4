"""The OpenAPI document of the public endpoints (GET /openapi.json), written by hand so it
says what the handlers really accept and answer, and made from the config in force: one
path per configured slot with that slot's bounds on `n`, and the beacon's events described
by the clickstream contract (stream_engine/schemas/clickstream-v1.json) as the collector
takes them. tests/api/test_openapi_conformance.py holds the handlers to it."""

from __future__ import annotations

import copy
import functools
import json
import time
from importlib import resources
from typing import Any

from api.collector import MAX_EVENTS
from api.config import DecisionConfig, Slot, SlotKind
from api.endpoints import MAX_PAGE_SLOTS
from stream_engine.events import MAX_FUTURE_SKEW_MS, MIN_TS_MS

_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$"}
_ERROR_FIELDS: dict[str, Any] = {"error": {"type": "string"}, "status": {"type": "integer"}}
_ERROR = {"type": "object", "required": ["error", "status"], "properties": _ERROR_FIELDS}
_ITEM = {
    "type": "object",
    "properties": {
        "item_id": _ID, "title": {"type": "string"}, "category": {"type": "string"},
        "price": {"type": "number"}, "image": {"type": "string"},
        "reason": {"type": "string", "description": "why this item, for a person to read"},
    },
}  # fmt: skip
_DECISION = {
    "type": "object",
    "required": ["slot", "decision_id", "strategy", "group", "config_version"],
    "properties": {
        "slot": {"type": "string"},
        "decision_id": {"type": "string", "description": "send it back on clicks (events)"},
        "strategy": {
            "enum": ["personalized", "profile", "contextual", "trending", "default", "holdout"]
        },
        "fallback_reason": {
            "enum": [None, "no_signal", "consent", "paused", "timeout", "overload",
                     "store_unavailable", "holdout"],
        },
        "group": {"enum": ["treatment", "holdout"]},
        "config_version": {"type": "string"},
        "state_age_ms": {"type": ["integer", "null"]},
        "items": {"type": "array", "items": _ITEM},
        "banner": {"type": "object", "description": "banner_id, creative fields, reason"},
        "rules": {"type": "array", "items": {"type": "string"}},
        "served_in_ms": {"type": "number"},
    },
}  # fmt: skip
_FALLBACK_HEADER = {
    "x-kairos-fallback": {
        "description": "present when a default was served: the reason(s)",
        "schema": {"type": "string"},
    }
}
_JSON_ERROR = {"content": {"application/json": {"schema": _ERROR}}}


def _ok(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {
        "200": {
            "description": what,
            "headers": _FALLBACK_HEADER,
            "content": {"application/json": {"schema": schema}},
        },
        "400": {"description": "bad input", **_JSON_ERROR},
        "404": {"description": "unknown slot", **_JSON_ERROR},
    }


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


# Optional values may be blank (a storefront's template renders `user_id=` for an anonymous
# visitor) and, in a JSON body, null: either means not given.
_BLANK = {"const": ""}
_OPTIONAL_ID = {"anyOf": [_ID, _BLANK, {"type": "null"}]}
# sensitive_ok: true or false, as JSON or as the query's text; blank or null is false
_FLAG = {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false", "1", "0", ""]},
                   {"type": "null"}]}  # fmt: skip


def _n(slot: Slot, query: bool = False) -> dict[str, Any]:
    n = {"type": "integer", "minimum": 1, "maximum": slot.max_n}
    return {"anyOf": [n, _BLANK if query else {"type": "null"}],
            "description": f"how many items, 1 to {slot.max_n} (blank: {slot.n})"}  # fmt: skip


def _slot_path(slot: Slot) -> dict[str, Any]:
    what = "one banner" if slot.kind is SlotKind.BANNER else f"{slot.n} items by default"
    return {"get": {
        "summary": f"Decide slot {slot.name} ({what}) for one visitor",
        "parameters": [
            _query("session_id", _ID, required=True), _query("user_id", _OPTIONAL_ID),
            _query("n", _n(slot, query=True)), _query("item_id", _OPTIONAL_ID),
            _query("sensitive_ok", _FLAG),
        ],
        "responses": _ok(_DECISION, "the decision (a fallback is a 200 too)"),
    }}  # fmt: skip


def _page_body(config: DecisionConfig) -> dict[str, Any]:
    names = sorted(config.slots)
    asks = [{"type": "object", "required": ["slot"],
             "properties": {"slot": {"const": name}, "n": _n(config.slots[name])}}
            for name in names]  # fmt: skip
    return {
        "type": "object", "required": ["session_id", "slots"],
        "properties": {
            "session_id": _ID, "user_id": _OPTIONAL_ID, "item_id": _OPTIONAL_ID,
            "sensitive_ok": _FLAG,
            "slots": {
                "type": "array", "minItems": 1, "maxItems": MAX_PAGE_SLOTS,
                "description": "each slot at most once, by name or as {slot, n}",
                "items": {"anyOf": [{"enum": names}, *asks]},
                # each slot at most once, whichever way it is named
                "allOf": [{"contains": {"anyOf": [{"const": name}, {
                    "type": "object", "required": ["slot"],
                    "properties": {"slot": {"const": name}}}]},
                    "minContains": 0, "maxContains": 1} for name in names],
            },
        },
    }  # fmt: skip


@functools.cache
def _contract() -> dict[str, Any]:
    text = resources.files("stream_engine").joinpath("schemas/clickstream-v1.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with its `#/$defs/...` references replaced by what they name (the contract's
    references are to its own root, which the OpenAPI document is not)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return {**defs[ref.removeprefix("#/$defs/")],
                    **{k: v for k, v in node.items() if k != "$ref"}}  # fmt: skip
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _beacon_event(now_ms: int) -> dict[str, Any]:
    """The clickstream contract as the collector takes an event: `event_id` and `ts` may be
    left out (filled in), `ts` within the range the worker accepts as of `now_ms`."""
    contract = copy.deepcopy(_contract())
    defs = contract.pop("$defs", {})
    for key in ("$schema", "$id"):
        contract.pop(key, None)
    event: dict[str, Any] = _inline(contract, defs)
    event["required"] = [f for f in event["required"] if f not in ("event_id", "ts")]
    event["properties"]["ts"] = {
        **event["properties"]["ts"], "minimum": MIN_TS_MS, "maximum": now_ms + MAX_FUTURE_SKEW_MS,
    }  # fmt: skip
    return event


def _events_body(now_ms: int) -> dict[str, Any]:
    event = _beacon_event(now_ms)
    many = {"type": "array", "minItems": 1, "maxItems": MAX_EVENTS, "items": event}
    return {"anyOf": [
        # an object with an `events` field is the wrapper, not an event
        {**event, "not": {"required": ["events"]}},
        many,
        {"type": "object", "required": ["events"], "properties": {"events": many}},
    ]}  # fmt: skip


_REJECTED = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "reason": {"type": "string"},
            "detail": {"type": "string"},
        },
    },
}


def document(config: DecisionConfig) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)  # an event's time is bounded as of now
    slots = {f"/v1/slots/{name}": _slot_path(config.slots[name]) for name in sorted(config.slots)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kairos decision API", "version": config.version,
                 "description": "The paths of the slots are those of the decision config in "
                 "force (its version is this document's)."},
        "paths": {
            **slots,
            "/v1/decisions": {"post": {
                "summary": "Decide several slots of one page, no item twice",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _page_body(config)}}},
                "responses": _ok({"type": "object", "properties": {
                    "session_id": _ID, "decisions": {"type": "array", "items": _DECISION},
                    "served_in_ms": {"type": "number"}}}, "one decision per slot"),
            }},
            "/v1/events": {"post": {
                "summary": "Collect clickstream events (contract v1) for the clickstream topic",
                "description": f"One event, a list, or {{events: [...]}} (1 to {MAX_EVENTS}); "
                "event_id and ts are filled in when missing. Each event is checked on its "
                "own: the valid ones are queued, the others listed with why. Never waits for "
                "Kafka.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _events_body(now_ms)}}},
                "responses": {
                    "202": {"description": "how many were queued, and the refused ones",
                            "content": {"application/json": {"schema": {
                                "type": "object", "required": ["accepted", "rejected"],
                                "properties": {"accepted": {"type": "integer"},
                                               "rejected": _REJECTED}}}}},
                    "400": {"description": "not JSON, no event, or no valid event",
                            "content": {"application/json": {"schema": {
                                **_ERROR, "properties": {**_ERROR_FIELDS,
                                                         "rejected": _REJECTED}}}}},
                    "413": {"description": "body too large", **_JSON_ERROR},
                    "503": {"description": "queue to Kafka full; retry later", **_JSON_ERROR},
                },
            }},
            "/healthz": {"get": {"summary": "alive", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Redis up, config loaded, caches warm", "responses": {
                "200": {"description": "ready"}, "503": {"description": "not ready, and why"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text format"}}}},
        },
    }  # fmt: skip


def admin_document(config: DecisionConfig, max_report_minutes: int) -> dict[str, Any]:
    """The admin routes (api/admin.py), behind the bearer token; GET /admin/openapi.json."""
    names = sorted(config.slots)
    auth = {
        "401": {"description": "missing or wrong token", **_JSON_ERROR},
        "403": {"description": "admin routes disabled (no KAIROS_ADMIN_TOKEN)", **_JSON_ERROR},
    }
    bad = {"400": {"description": "bad input", **_JSON_ERROR}, **auth}
    ok = {"200": {"description": "done", "content": {"application/json": {
        "schema": {"type": "object"}}}}}  # fmt: skip

    def body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    blank = {"anyOf": [_BLANK, {"type": "null"}]}  # the other id: not given
    erase = {"oneOf": [
        {"type": "object", "required": ["session_id"],
         "properties": {"session_id": _ID, "user_id": blank}},
        {"type": "object", "required": ["user_id"],
         "properties": {"user_id": _ID, "session_id": blank}},
    ]}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kairos admin", "version": config.version},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": {
            "/admin/status": {"get": {"summary": "config, pauses, guards, Kafka",
                                      "responses": {**ok, **auth}}},
            "/admin/pause": {"post": {
                "summary": "pause or resume one slot, or (no slot) everything",
                "requestBody": body({"type": "object", "properties": {
                    "slot": {"anyOf": [{"enum": names}, {"type": "null"}]},
                    "paused": {"type": "boolean", "description": "default true"}}},
                    required=False),
                "responses": {**ok, **bad, "404": {"description": "unknown slot", **_JSON_ERROR}},
            }},
            "/admin/reload": {"post": {"summary": "read the config file again now", "responses": {
                **ok, **auth, "422": {"description": "the file's error; the old config stays",
                                     **_JSON_ERROR}}}},
            "/admin/erase": {"post": {
                "summary": "erase a session's or a user's state now",
                "requestBody": body(erase), "responses": {**ok, **bad},
            }},
            "/admin/report": {"get": {
                "summary": "the zero-to-zero report over the last `minutes`",
                "parameters": [_query("minutes", {"type": "integer", "minimum": 1,
                                                  "maximum": max_report_minutes})],
                "responses": {**ok, **bad},
            }},
        },
    }  # fmt: skip
