from __future__ import annotations

import contextlib
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_engine.events import (
    MAX_EVENT_BYTES,
    Event,
    EventType,
    InvalidEvent,
    Reason,
    encode_event,
    parse_event,
)

NOW = int(time.time() * 1000)


def _raw(**fields: object) -> bytes:
    base: dict[str, object] = {
        "event_id": "e1",
        "type": "click",
        "session_id": "s1",
        "ts": NOW,
        "item_id": "sku-1",
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


def _reason(raw: bytes, key: bytes | None = None) -> Reason:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, NOW, key=key)
    return info.value.reason


def test_valid_click_parses_and_ignores_unknown_fields() -> None:
    e = parse_event(_raw(context={"device": "mobile"}, extra=1), NOW, key=b"s1")
    assert e == Event("e1", EventType.CLICK, "s1", NOW, item_id="sku-1")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{nope", Reason.BAD_JSON),
        (b"[1, 2]", Reason.NOT_AN_OBJECT),
        (_raw(type="teleport"), Reason.UNKNOWN_TYPE),
        (_raw(type=None), Reason.MISSING_FIELD),
        (_raw(event_id=None), Reason.MISSING_FIELD),
        (_raw(item_id=None), Reason.MISSING_ITEM),
        (_raw(session_id="has space"), Reason.BAD_FIELD),
        (_raw(session_id="x" * 129), Reason.BAD_FIELD),
        (_raw(ts="yesterday"), Reason.BAD_FIELD),
        (_raw(ts=True), Reason.BAD_FIELD),
        (_raw(ts=1_000), Reason.TS_OUT_OF_RANGE),
        (_raw(ts=NOW + 3_600_000), Reason.TS_OUT_OF_RANGE),
        (_raw(type="identify", item_id=None), Reason.MISSING_FIELD),
        (_raw(type="consent", item_id=None), Reason.MISSING_FIELD),
        (_raw(query="q" * 600), Reason.BAD_FIELD),
        (b" " * (MAX_EVENT_BYTES + 1), Reason.OVERSIZE),
    ],
)
def test_bad_events_get_a_reason(raw: bytes, reason: Reason) -> None:
    assert _reason(raw) is reason


def test_message_key_must_be_the_session() -> None:
    assert _reason(_raw(), key=b"other") is Reason.KEY_MISMATCH
    assert _reason(_raw(), key=b"") is Reason.KEY_MISMATCH


def test_consent_accepts_bool_or_object() -> None:
    assert parse_event(_raw(type="consent", consent=False), NOW).consent is False
    obj = _raw(type="consent", consent={"personalization": True})
    assert parse_event(obj, NOW).consent is True


ids = st.from_regex(r"[A-Za-z0-9._:@\-]{1,40}", fullmatch=True)


@given(
    etype=st.sampled_from(list(EventType)),
    sid=ids,
    item=ids,
    user=ids,
    dt=st.integers(min_value=-(10**9), max_value=0),
)
def test_encode_then_parse_round_trips(
    etype: EventType, sid: str, item: str, user: str, dt: int
) -> None:
    event = Event(
        event_id="e-" + sid,
        type=etype,
        session_id=sid,
        ts=NOW + dt,
        user_id=user,
        item_id=item,
        consent=True if etype is EventType.CONSENT else None,
    )
    assert parse_event(encode_event(event), NOW, key=sid.encode()) == event


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_event(raw: bytes) -> None:
    with contextlib.suppress(InvalidEvent):
        parse_event(raw, NOW)
