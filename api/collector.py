"""POST /v1/events: the beacon collector for browsers and apps.

Takes one event, a list, or {"events": [...]} (at most 100), fills in `event_id` and `ts`
when a browser leaves them out, validates each against the clickstream contract v1, and
queues the valid ones for the `clickstream` topic keyed by session id. The caller never
waits for Kafka: 202 says how many were accepted and why each refused one was refused;
503 means the queue to Kafka is full and nothing was taken (retry later).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.endpoints import JSON, runtime
from api.exceptions import BadRequest
from api.limits import json_body
from stream_engine.events import InvalidEvent, parse_event

MAX_EVENTS = 100


def _events(body: Any) -> list[Any]:
    if isinstance(body, dict) and "events" in body:
        body = body["events"]
    events = body if isinstance(body, list) else [body]
    if not 1 <= len(events) <= MAX_EVENTS:
        raise BadRequest(f"send 1 to {MAX_EVENTS} events per request")
    return events


async def collect(request: Request) -> Response:
    rt = runtime(request)
    events = _events(json_body(await request.body()))
    now_ms = int(time.time() * 1000)
    accepted: list[tuple[bytes, bytes]] = []
    rejected: list[dict[str, Any]] = []
    for i, obj in enumerate(events):
        if isinstance(obj, dict):
            if "event_id" not in obj:  # (setdefault would draw a uuid for every event)
                obj["event_id"] = uuid.uuid4().hex
            obj.setdefault("ts", now_ms)
        raw = orjson.dumps(obj)
        try:
            event = parse_event(raw, now_ms)
        except InvalidEvent as exc:
            rejected.append({"index": i, "reason": exc.reason.value, "detail": exc.detail})
            continue
        accepted.append((event.session_id.encode(), raw))
    rt.metrics.beacons.labels("rejected").inc(len(rejected))
    if not accepted:
        return JSON({"error": "no valid events", "rejected": rejected, "status": 400}, 400)
    if rt.beacons.room() < len(accepted):
        rt.metrics.beacons.labels("dropped").inc(len(accepted))
        rt.metrics.dropped.labels(rt.settings.clickstream_topic, "queue_full").inc(len(accepted))
        body = {"error": "collector queue to Kafka is full; retry later", "status": 503}
        return JSON(body, 503, headers={"retry-after": "1"})
    for key, raw in accepted:
        rt.beacons.offer(rt.settings.clickstream_topic, key, raw)
    rt.metrics.beacons.labels("accepted").inc(len(accepted))
    rt.beacons_accepted += len(accepted)
    return JSON({"accepted": len(accepted), "rejected": rejected}, 202)
