"""Clickstream event contract v1: parse and validate one event, fast, with a reason when bad.

The contract (topic `clickstream`, key = session id, JSON value) is documented in
docs/events.md and stream_engine/schemas/clickstream-v1.json. Unknown fields are ignored;
a bad event raises InvalidEvent with a machine-readable `reason` that the worker puts on
the dead-letter topic and counts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import orjson

from stream_engine.exceptions import KairosError

CONTRACT_VERSION = 1
MAX_EVENT_BYTES = 16 * 1024
MAX_ID_LENGTH = 128
MAX_QUERY_LENGTH = 512
# Event time must be after 2020-01-01 and at most this far in the future (clock skew).
MIN_TS_MS = 1_577_836_800_000
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
ID_PATTERN = re.compile(r"[A-Za-z0-9._:@\-]{1,128}")


class EventType(enum.StrEnum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    SEARCH = "search"
    IMPRESSION = "impression"
    IDENTIFY = "identify"
    CONSENT = "consent"


ITEM_TYPES = frozenset(
    {
        EventType.VIEW,
        EventType.CLICK,
        EventType.ADD_TO_CART,
        EventType.REMOVE_FROM_CART,
        EventType.PURCHASE,
        EventType.IMPRESSION,
    }
)
_TYPES = {t.value: t for t in EventType}


class Reason(enum.StrEnum):
    """Why an event went to the dead-letter topic (the `reason` field there)."""

    OVERSIZE = "oversize"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_ITEM = "missing_item"
    TS_OUT_OF_RANGE = "ts_out_of_range"
    KEY_MISMATCH = "key_mismatch"


class InvalidEvent(KairosError):
    """The event breaks the contract; `reason` is one of Reason, `detail` says where."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    type: EventType
    session_id: str
    ts: int  # event time, epoch milliseconds
    user_id: str | None = None
    item_id: str | None = None
    slot: str | None = None
    decision_id: str | None = None
    query: str | None = None
    # consent events: whether personalization is allowed from now on
    consent: bool | None = None


def _id(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent(Reason.MISSING_FIELD, name)
        return None
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidEvent(Reason.BAD_FIELD, f"{name} must be 1-128 chars of [A-Za-z0-9._:@-]")
    return value


def _ts(obj: dict[str, Any], now_ms: int) -> int:
    value = obj.get("ts")
    if value is None:
        raise InvalidEvent(Reason.MISSING_FIELD, "ts")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent(Reason.BAD_FIELD, "ts must be epoch milliseconds (a number)")
    ts = int(value)
    if ts < MIN_TS_MS or ts > now_ms + MAX_FUTURE_SKEW_MS:
        raise InvalidEvent(Reason.TS_OUT_OF_RANGE, f"ts={ts} is before 2020 or in the future")
    return ts


def _consent(obj: dict[str, Any]) -> bool:
    value = obj.get("consent")
    if isinstance(value, dict):
        value = value.get("personalization")
    if not isinstance(value, bool):
        raise InvalidEvent(
            Reason.MISSING_FIELD, "consent events need consent: {personalization: true|false}"
        )
    return value


def _query(obj: dict[str, Any]) -> str | None:
    value = obj.get("query")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_QUERY_LENGTH:
        raise InvalidEvent(Reason.BAD_FIELD, f"query must be a string of <= {MAX_QUERY_LENGTH}")
    return value


def parse_event(raw: bytes, now_ms: int, key: bytes | None = None) -> Event:
    """Validate one clickstream message. Raises InvalidEvent; never anything else for bad input."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(Reason.OVERSIZE, f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(Reason.BAD_JSON, str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent(Reason.NOT_AN_OBJECT, type(obj).__name__)
    type_name = obj.get("type")
    if type_name is None:
        raise InvalidEvent(Reason.MISSING_FIELD, "type")
    etype = _TYPES.get(type_name) if isinstance(type_name, str) else None
    if etype is None:
        raise InvalidEvent(Reason.UNKNOWN_TYPE, repr(type_name)[:64])
    event_id = _id(obj, "event_id", required=True)
    session_id = _id(obj, "session_id", required=True)
    assert event_id is not None and session_id is not None  # noqa: PT018 - narrowed by required
    if key is not None and key.decode("utf-8", "replace") != session_id:
        raise InvalidEvent(Reason.KEY_MISMATCH, "message key must be the session_id")
    item_id = _id(obj, "item_id", required=False)
    if item_id is None and etype in ITEM_TYPES:
        raise InvalidEvent(Reason.MISSING_ITEM, f"{etype.value} events need item_id")
    user_id = _id(obj, "user_id", required=etype is EventType.IDENTIFY)
    return Event(
        event_id=event_id,
        type=etype,
        session_id=session_id,
        ts=_ts(obj, now_ms),
        user_id=user_id,
        item_id=item_id,
        slot=_id(obj, "slot", required=False),
        decision_id=_id(obj, "decision_id", required=False),
        query=_query(obj),
        consent=_consent(obj) if etype is EventType.CONSENT else None,
    )


def encode_event(event: Event) -> bytes:
    """The wire form of an event (for producers in tools, tests and the beacon collector)."""
    body = {k: v for k, v in _as_dict(event).items() if v is not None}
    if event.consent is not None:
        body["consent"] = {"personalization": event.consent}
    return orjson.dumps(body)


def _as_dict(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__slots__}
