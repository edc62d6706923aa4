"""The OpenAPI document of the public endpoints (GET /openapi.json), written by hand so it
says what the handlers really accept and answer."""

from __future__ import annotations

from typing import Any

_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$"}
_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
}
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


def _ok(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {
        "200": {
            "description": what,
            "headers": _FALLBACK_HEADER,
            "content": {"application/json": {"schema": schema}},
        },
        "400": {"description": "bad input", "content": {"application/json": {"schema": _ERROR}}},
        "404": {"description": "unknown slot", "content": {"application/json": {"schema": _ERROR}}},
    }


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kairos decision API", "version": version},
        "paths": {
            "/v1/slots/{slot}": {"get": {
                "summary": "Decide one slot for one visitor",
                "parameters": [
                    {"name": "slot", "in": "path", "required": True, "schema": {"type": "string"}},
                    _query("session_id", _ID, required=True), _query("user_id", _ID),
                    _query("n", {"type": "integer", "minimum": 1}), _query("item_id", _ID),
                    _query("sensitive_ok", {"type": "boolean"}),
                ],
                "responses": _ok(_DECISION, "the decision (a fallback is a 200 too)"),
            }},
            "/v1/decisions": {"post": {
                "summary": "Decide several slots of one page, no item twice",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["session_id", "slots"],
                    "properties": {
                        "session_id": _ID, "user_id": _ID, "item_id": _ID,
                        "sensitive_ok": {"type": "boolean"},
                        "slots": {"type": "array", "maxItems": 10, "items": {"oneOf": [
                            {"type": "string"},
                            {"type": "object", "properties": {
                                "slot": {"type": "string"}, "n": {"type": "integer"}}},
                        ]}},
                    },
                }}}},
                "responses": _ok({"type": "object", "properties": {
                    "session_id": _ID, "decisions": {"type": "array", "items": _DECISION},
                    "served_in_ms": {"type": "number"}}}, "one decision per slot"),
            }},
            "/v1/events": {"post": {
                "summary": "Collect clickstream events (contract v1) for the clickstream topic",
                "description": "One event, a list, or {events: [...]} (max 100); event_id and "
                "ts are filled in when missing. Never waits for Kafka.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": ["object", "array"]}}}},
                "responses": {
                    "202": {"description": "accepted count and refused events with reasons"},
                    "400": {"description": "no valid event"},
                    "413": {"description": "body too large"},
                    "503": {"description": "queue to Kafka full; retry later"},
                },
            }},
            "/healthz": {"get": {"summary": "alive", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Redis up, config loaded, caches warm", "responses": {
                "200": {"description": "ready"}, "503": {"description": "not ready, and why"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text format"}}}},
        },
    }  # fmt: skip
