"""The HTTP surface: input errors, the beacon collector and exposures on the real Kafka,
admin operations, config reload, OpenAPI and metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from api.app import DEMO_CONFIG
from api.fastpath import Answer, SlotRoute
from api.runtime import Runtime
from api.settings import Settings
from stream_engine.events import EventType
from stream_engine.state import Keys
from tests.api.conftest import ADMIN_TOKEN, Clicks, client_for, served, with_
from tests.conftest import Stack

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize(
    ("url", "status", "says"),
    [
        ("/v1/slots/home_recs", 400, "session_id is required"),
        ("/v1/slots/home_recs?session_id=a%20b", 400, "session_id must be 1-128 characters"),
        ("/v1/slots/home_recs?session_id=" + "x" * 129, 400, "session_id must be"),
        ("/v1/slots/nope?session_id=s", 404, "unknown slot 'nope'; this config has: home_hero"),
        ("/v1/slots/home_recs?session_id=s&n=0", 400, "n must be between 1 and 24"),
        ("/v1/slots/home_recs?session_id=s&n=x", 400, "n must be an integer"),
        ("/v1/slots/home_recs?session_id=s&n=-1", 400, "n must be an integer"),
        ("/v1/slots/home_recs?session_id=s&n=%EF%BC%93", 400, "n must be an integer"),  # a wide 3
        ("/v1/slots/home_recs?session_id=s&sensitive_ok=maybe", 400, "sensitive_ok must be"),
        # which visitor was asked for is not the API's guess to make (the last one won)
        ("/v1/slots/home_recs?session_id=a&session_id=b", 400, "session_id given more than once"),
        ("/v1/slots/home_recs?session_id=a&n=2&n=5", 400, "n given more than once"),
    ],
)
async def test_bad_queries_get_a_clear_4xx(
    settings: Settings, url: str, status: int, says: str
) -> None:
    async with client_for(settings) as client:
        response = await client.get(url)
    assert response.status_code == status
    assert says in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "body is not JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"session_id": "s"}', 400, "slots must be a list of 1 to 10"),
        (b'{"session_id": "s", "slots": ["home_recs", "home_recs"]}', 400, "asked for twice"),
        (b'{"slots": ["home_recs"]}', 400, "session_id is required"),
        (b'{"session_id": "s", "slots": [{"slot": "x"}]}', 404, "unknown slot"),
        # JSON integers only: not text, not a fraction cut down, not true taken for 1
        (b'{"session_id": "s", "slots": [{"slot": "home_recs", "n": "3"}]}', 400,
         "n must be an integer"),
        (b'{"session_id": "s", "slots": [{"slot": "home_recs", "n": 3.5}]}', 400,
         "n must be an integer"),
        (b'{"session_id": "s", "slots": [{"slot": "home_recs", "n": true}]}', 400,
         "n must be an integer"),
        (b'{"session_id": "s", "slots": [{"slot": "home_recs", "n": ""}]}', 400,
         "n must be an integer"),
        (b'{"session_id": "s", "slots": ["home_recs"], "sensitive_ok": 1}', 400,
         "sensitive_ok must be true or false"),
        (b'{"session_id": "s", "slots": ["home_recs"], "pad": "' + b"x" * 70_000 + b'"}', 413,
         "body over 65536 bytes"),
    ],
)  # fmt: skip
async def test_bad_bodies_get_a_clear_4xx(
    settings: Settings, body: bytes, status: int, says: str
) -> None:
    async with client_for(settings) as client:
        response = await client.post("/v1/decisions", content=body)
    assert response.status_code == status
    assert says in response.json()["error"]


async def test_a_whole_number_as_json_and_blank_or_null_optionals_are_taken(
    settings: Settings,
) -> None:
    """What the OpenAPI document allows: n as 3.0 (an integer to JSON Schema), a blank
    user_id (a template's anonymous visitor), null for the defaults."""
    async with client_for(settings) as client:
        page = await client.post("/v1/decisions", json={
            "session_id": "s", "user_id": "", "sensitive_ok": None,
            "slots": [{"slot": "home_recs", "n": 3.0}, {"slot": "recommendations", "n": None}],
        })  # fmt: skip
        one = await client.get("/v1/slots/home_recs?session_id=s&user_id=&sensitive_ok=0&n=")
    assert page.status_code == one.status_code == 200
    recs, more = page.json()["decisions"]
    assert len(recs["items"]) == 3
    assert len(more["items"]) == 10  # recommendations' default n
    assert len(one.json()["items"]) == 8  # the slot's default n


async def _consume(stack: Stack, topic: str, n: int) -> list[tuple[bytes, dict[str, Any]]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(20):
            while len(out) < n:
                for msgs in (await consumer.getmany(timeout_ms=200)).values():
                    out += [(m.key, orjson.loads(m.value)) for m in msgs]
    finally:
        await consumer.stop()
    return out


@pytest.mark.usefixtures("topics")
async def test_beacons_reach_the_clickstream_and_bad_ones_are_refused_with_reasons(
    settings: Settings, stack: Stack
) -> None:
    now = int(time.time() * 1000)
    events = [
        {"type": "view", "session_id": "b1", "item_id": "sku-000001"},  # id and ts filled in
        {"type": "click", "session_id": "b1", "item_id": "sku-000002", "ts": now,
         "event_id": "e-2"},
        {"type": "fly", "session_id": "b1"},
        {"type": "view", "session_id": "b1"},
    ]  # fmt: skip
    async with client_for(with_(settings, cors_origins="https://shop.example")) as client:
        response = await client.post("/v1/events", json={"events": events})
        nothing = await client.post("/v1/events", json=[{"type": "view"}])
        preflight = await client.options(
            "/v1/events",
            headers={"origin": "https://shop.example", "access-control-request-method": "POST"},
        )
        foreign = await client.post(
            "/v1/events", json=events[:1], headers={"origin": "https://evil.example"}
        )
        got = await _consume(stack, settings.clickstream_topic, 3)
    assert response.status_code == 202
    assert response.json() == {
        "accepted": 2,
        "rejected": [
            {"index": 2, "reason": "unknown_type", "detail": "'fly'"},
            {"index": 3, "reason": "missing_item", "detail": "view events need item_id"},
        ],
    }
    assert nothing.status_code == 400
    assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
    assert "access-control-allow-origin" not in foreign.headers
    assert [k for k, _ in got] == [b"b1"] * 3
    assert got[1][1]["event_id"] == "e-2"
    assert got[0][1]["event_id"]
    assert got[0][1]["ts"] >= now - 1000


@pytest.mark.usefixtures("topics")
async def test_every_decision_is_exposed_on_the_decisions_topic(
    settings: Settings, stack: Stack
) -> None:
    async with client_for(settings) as client:
        body = {"session_id": "exp1", "user_id": "u-9", "slots": ["home_hero", "home_recs"]}
        decisions = (await client.post("/v1/decisions", json=body)).json()["decisions"]
        got = await _consume(stack, settings.decisions_topic, 2)
    by_id = {v["decision_id"]: v for _, v in got}
    for d in decisions:
        exposure = by_id[d["decision_id"]]
        assert exposure["session_id"] == "exp1"
        assert exposure["user_id"] == "u-9"
        assert exposure["group"] == d["group"]
        assert exposure["strategy"] == d["strategy"]
        assert exposure["config_version"] == "demo-2026-11-22.1"
    assert by_id[decisions[1]["decision_id"]]["items"] == [
        i["item_id"] for i in decisions[1]["items"]
    ]
    assert by_id[decisions[0]["decision_id"]]["banner"] == decisions[0]["banner"]["banner_id"]


async def test_admin_needs_the_token(settings: Settings) -> None:
    async with client_for(settings) as client:
        missing = await client.get("/admin/status")
        wrong = await client.get("/admin/status", headers={"authorization": "Bearer nope"})
        ok = await client.get("/admin/status", headers=AUTH)
    async with client_for(with_(settings, admin_token="")) as client:
        disabled = await client.get("/admin/status", headers=AUTH)
    assert missing.status_code == wrong.status_code == 401
    assert ok.status_code == 200
    assert ok.json()["config"]["version"] == "demo-2026-11-22.1"
    assert disabled.status_code == 403


@pytest.mark.parametrize(
    ("method", "url", "body", "says"),
    [
        # a list is no slot, and no key to look one up by (it answered 500)
        ("POST", "/admin/pause", {"slot": ["home_recs"]}, "slot must be a slot's name"),
        ("POST", "/admin/pause", {"slot": {"name": "home_recs"}}, "slot must be a slot's name"),
        ("POST", "/admin/pause", {"paused": "yes"}, "paused must be true or false"),
        ("GET", "/admin/report?minutes=%D9%A6%D9%A0", None, "minutes must be an integer"),
        ("GET", "/admin/report?minutes=+60", None, "minutes must be an integer"),
        ("POST", "/admin/erase", {"session_id": "a", "user_id": "b"}, "exactly one"),
    ],
)
async def test_bad_admin_input_gets_a_clear_400(
    settings: Settings, method: str, url: str, body: dict[str, Any] | None, says: str
) -> None:
    async with client_for(settings) as client:
        response = await client.request(method, url, json=body, headers=AUTH)
        status = (await client.get("/admin/status", headers=AUTH)).json()
    assert response.status_code == 400
    assert says in response.json()["error"]
    assert status["pauses"] == {"all": False, "slots": []}  # nothing paused on the way


async def test_a_broken_config_is_refused_and_a_fixed_one_takes_over_without_restart(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "kairos.yaml"
    path.write_text(DEMO_CONFIG.read_text())
    async with client_for(with_(settings, config_path=str(path))) as client:
        path.write_text(DEMO_CONFIG.read_text().replace("kind: banner", "kind: billboard", 1))
        refused = await client.post("/admin/reload", headers=AUTH)
        still = (await client.get("/v1/slots/home_recs?session_id=s")).json()
        path.write_text(DEMO_CONFIG.read_text().replace("demo-2026-11-22.1", "v2"))
        await asyncio.sleep(settings.refresh_interval_s * 3)  # picked up by the refresher
        after = await client.get("/v1/slots/home_recs?session_id=s")
        ready = (await client.get("/readyz")).json()
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert str(path) in error
    assert "slot home_hero: kind must be one of banner, items, got 'billboard'" in error
    assert refused.json()["in_force"] == "demo-2026-11-22.1"
    assert still["config_version"] == "demo-2026-11-22.1"
    assert after.json()["config_version"] == "v2"
    assert after.headers["x-kairos-config-version"] == "v2"
    assert ready["config"] == {"version": "v2", "reload_error": None}


async def test_erasing_a_session_removes_its_state_now(
    settings: Settings, clicks: Clicks, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await clicks("gone", (EventType.CLICK, "sku-000001"))
    async with client_for(settings) as client:
        assert (await client.get("/v1/slots/home_recs?session_id=gone")).json()["strategy"] == (
            "personalized"
        )
        erased = await client.post("/admin/erase", json={"session_id": "gone"}, headers=AUTH)
        after = (await client.get("/v1/slots/home_recs?session_id=gone")).json()
        both = await client.post("/admin/erase", json={"session_id": "a", "user_id": "b"},
                                 headers=AUTH)  # fmt: skip
    assert erased.json() == {"erased": {"session_id": "gone"}}
    assert after["fallback_reason"] == "consent"
    assert await redis_client.hget(Keys(key_prefix).session("gone"), "v") is None
    assert both.status_code == 400


async def test_openapi_and_metrics(settings: Settings) -> None:
    async with client_for(settings) as client:
        await client.get("/v1/slots/home_recs?session_id=m1")
        await client.get("/v1/slots/home_recs?session_id=m2")
        await client.post("/v1/decisions", json={"session_id": "m1", "slots": ["home_recs"]})
        spec = (await client.get("/openapi.json")).json()
        metrics = (await client.get("/metrics")).text
    assert {"/v1/slots/home_recs", "/v1/decisions", "/v1/events"} <= set(spec["paths"])
    assert 'kairos_api_decisions_total{fallback_reason="no_signal",slot="home_recs"' in metrics
    # the handler-time histogram counts each decision request under its endpoint
    assert 'kairos_api_request_seconds_count{endpoint="slots"} 2.0' in metrics
    assert 'kairos_api_request_seconds_count{endpoint="decisions"} 1.0' in metrics
    # each of them read the session's state once (unknown sessions are read too)
    assert "kairos_api_state_read_seconds_count 3.0" in metrics
    assert 'kairos_api_config_info{version="demo-2026-11-22.1"} 1.0' in metrics


async def test_a_head_over_the_limit_is_refused_and_counted(settings: Settings) -> None:
    """The served app (api/server.py's protocol): a cookie jar past the head's limit gets a
    431 that says why, and /metrics counts it by reason."""
    async with served(settings) as client:
        url = httpx.URL(str(client.base_url))
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(b"GET /v1/slots/home_recs?session_id=c1 HTTP/1.1\r\nhost: t\r\n"
                         + b"cookie: " + b"k=v; " * 4000 + b"\r\n\r\n")  # fmt: skip
            answer = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
        finally:
            writer.close()
        metrics = (await client.get("/metrics")).text
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert orjson.loads(body) == {"error": "request headers over 16384 bytes", "status": 431}
    assert 'kairos_api_refused_total{reason="head_too_large"} 1.0' in metrics


async def test_a_body_that_does_not_come_in_time_gets_408_and_the_connection_closes(
    settings: Settings,
) -> None:
    """A beacon that promises 100 bytes and sends 10: answered 408 when the body's time is
    up (api/limits.py, KAIROS_BODY_TIMEOUT_S), not held for ever; a whole one on a new
    connection goes through."""
    async with served(with_(settings, body_timeout_s=0.5)) as client:
        url = httpx.URL(str(client.base_url))
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(b"POST /v1/events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json"
                         b"\r\ncontent-length: 100\r\n\r\n[{\"type\": ")  # fmt: skip
            answer = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
        finally:
            writer.close()
        ok = await client.post("/v1/events", json=[{"type": "view", "session_id": "b1",
                                                    "item_id": "sku-000001"}])  # fmt: skip
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in head.lower()
    assert orjson.loads(body) == {"error": "body not complete within 0.5 s", "status": 408}
    assert ok.status_code == 202


@pytest.mark.parametrize(
    "query",
    [
        "session_id=fast-1",
        "session_id=fast-1&n=3",
        "session_id=fast-1&n=2&n=5",  # repeated: 400
        "session_id=fast-1&session_id=fast-2",  # repeated: 400
        "session_id=fast-1&utm=a&utm=b",  # a name the slot doesn't take, repeated: ignored
        "session_id=fast-1&n=",  # blank: the slot's default n
        "session_id=fast%201",  # decoded before validation: 400
        "n=3",  # no session: 400
    ],
)
async def test_the_slot_fast_paths_answer_like_the_starlette_route(
    settings: Settings, query: str
) -> None:
    """GET /v1/slots is answered ahead of Starlette twice over: by the server's protocol
    without ASGI (api/server.py, the served app) and by FastSlots (api/fastpath.py, what
    an in-process client reaches). The route they bypass must give the same status,
    headers and body (decision ids and timings aside)."""
    async with (
        served(settings) as server,
        client_for(settings) as client,
        client_for(settings, fast_path=False) as direct,
    ):
        counting = CountingRoute()
        server.app.state.slot_route = counting  # type: ignore[attr-defined]
        protocol = await server.get(f"/v1/slots/home_recs?{query}")
        fast = await client.get(f"/v1/slots/home_recs?{query}")
        routed = await direct.get(f"/v1/slots/home_recs?{query}")
    assert counting.answers == 1  # the served one went the protocol's way
    a, b, c = (_comparable(r) for r in (protocol, fast, routed))
    assert a == c
    assert b == c


class CountingRoute(SlotRoute):
    __slots__ = ("answers",)

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    async def answer(self, rt: Runtime, target: str, query: bytes, started: float) -> Answer:
        self.answers += 1
        return await super().answer(rt, target, query, started)


def _comparable(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    # content-length aside: served_in_ms is a number of varying width
    headers = {**response.headers, "content-length": ""}
    body = response.json()
    for volatile in ("decision_id", "served_in_ms"):
        body.pop(volatile, None)
    return response.status_code, headers, body


async def test_paths_the_fast_path_does_not_know_go_on_to_starlette(settings: Settings) -> None:
    async with client_for(settings) as client:
        nested = await client.get("/v1/slots/home_recs/extra?session_id=s")
        head = await client.head("/v1/slots/home_recs?session_id=s")
        static = await client.get("/bench/static")  # only with KAIROS_BENCH_STATIC
    assert nested.status_code == 404
    assert head.status_code == 200
    assert head.headers["x-kairos-config-version"]
    assert static.status_code == 404
