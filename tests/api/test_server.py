"""api/server.py: one write per response (the bytes and their order are uvicorn's; only the
number of writes changes), and the slot endpoint answered from the protocol's callbacks
without ASGI. No services involved: a stub transport, then a real uvicorn on loopback
serving a small Starlette app through the protocol, with a stub in place of the decision
(tests/api/test_endpoints.py compares the real decision's answers)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.fastpath import Answer, SlotRoute
from api.limits import MAX_HEADER_BYTES
from api.server import (
    MAX_PENDING_BYTES,
    MAX_TARGET_BYTES,
    KairosHttpProtocol,
    OneWrite,
    server_options,
)
from api.settings import Settings
from stream_engine.exceptions import ConfigError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed


async def test_a_head_and_body_written_in_one_turn_go_out_as_one_write() -> None:
    inner = Recorder()
    t = OneWrite(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert t.get_write_buffer_size() > 0  # held, and counted as buffered
    t.write(b"{}")
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    assert len(inner.writes) == 1  # the scheduled flush found nothing left


async def test_a_lone_write_goes_out_on_the_next_turn_and_close_flushes_first() -> None:
    inner = Recorder()
    t = OneWrite(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # nothing follows a 204
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    t.write(b"a")
    t.write(b"b")
    t.write(b"c")  # a third write of the same turn: held after the first two went out
    t.close()
    assert inner.writes[1:] == [b"ab", b"c"]
    assert inner.closed
    assert t.is_closing()  # delegated to the real transport


async def _stream() -> AsyncIterator[bytes]:
    for part in (b"one,", b"two,", b"three"):
        yield part
        await asyncio.sleep(0.01)


async def _json(request: Request) -> Response:
    return JSONResponse({"n": int(request.query_params.get("n", "0"))})


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


async def _streamed(request: Request) -> Response:
    return StreamingResponse(_stream(), media_type="text/plain")


APP = Starlette(
    routes=[
        Route("/json", _json, methods=["GET", "HEAD"]),
        Route("/empty", _empty),
        Route("/stream", _streamed),
    ]
)


@contextlib.asynccontextmanager
async def _server(
    app: Starlette = APP, protocol: type[KairosHttpProtocol] = KairosHttpProtocol
) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # as api/__main__.py runs it: no proxy-headers middleware around the app
    config = uvicorn.Config(app, http=protocol, log_level="warning",
                            lifespan="off", proxy_headers=False)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    else:
        raise RuntimeError("uvicorn did not start")
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def _read_response(reader: asyncio.StreamReader, head_only: bool = False) -> dict[str, Any]:
    status = (await reader.readline()).decode()
    headers: dict[str, str] = {}
    while (line := (await reader.readline()).decode()) != "\r\n":
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = b""
    if head_only:
        pass
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while (size := int((await reader.readline()).strip(), 16)) > 0:
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    return {"status": status.split()[1], "headers": headers, "body": body}


async def test_a_real_server_answers_every_kind_of_response_on_one_connection() -> None:
    """GET, HEAD (a head with no body after it), 204, a streamed (chunked) body, and two
    pipelined requests, in that order on one keep-alive connection."""
    async with _server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /json?n=1 HTTP/1.1\r\nhost: t\r\n\r\n")
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert (r["status"], r["body"]) == ("200", b'{"n":1}')

            writer.write(b"HEAD /json HTTP/1.1\r\nhost: t\r\n\r\n")
            r = await asyncio.wait_for(_read_response(reader, head_only=True), 5)
            assert r["status"] == "200"

            writer.write(b"GET /empty HTTP/1.1\r\nhost: t\r\n\r\n")
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert (r["status"], r["body"]) == ("204", b"")

            writer.write(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert (r["status"], r["body"]) == ("200", b"one,two,three")

            writer.write(b"GET /json?n=2 HTTP/1.1\r\nhost: t\r\n\r\n"
                         b"GET /json?n=3 HTTP/1.1\r\nhost: t\r\n\r\n")  # fmt: skip
            first = await asyncio.wait_for(_read_response(reader), 5)
            second = await asyncio.wait_for(_read_response(reader), 5)
            assert (first["body"], second["body"]) == (b'{"n":2}', b'{"n":3}')
        finally:
            writer.close()


class StubRoute(SlotRoute):
    """SlotRoute with a stub decision: echoes the slot and query, after `delay_s`; the slot
    `boom` raises."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(static=False)
        self.delay_s = delay_s
        self.answered: list[str] = []

    async def answer(self, rt: Any, target: str, query: bytes, started: float) -> Answer:
        assert rt == "runtime"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if target == "boom":
            raise RuntimeError("the decision failed")
        self.answered.append(target)
        body = orjson.dumps({"slot": target, "query": query.decode()})
        return 200, body, {"x-kairos-config-version": "v7"}


async def _routed(request: Request) -> Response:
    return JSONResponse({"routed": request.method, "slot": request.path_params["slot"]})


def _fast_app(route: SlotRoute, started: bool = True) -> Starlette:
    app = Starlette(routes=[Route("/v1/slots/{slot}", _routed, methods=["GET", "HEAD", "POST"])])
    app.state.slot_route = route
    if started:
        app.state.runtime = "runtime"
    return app


def _get(path: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "host: t", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def _one(port: int, request: bytes) -> dict[str, Any]:
    """One request on a connection of its own: its response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(_read_response(reader), 5)
    finally:
        writer.close()


async def test_a_slot_get_is_answered_by_the_route_and_everything_else_by_the_app() -> None:
    route = StubRoute()
    async with _server(_fast_app(route)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/v1/slots/home_recs?session_id=s1&n=3"))
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert r["status"] == "200"
            assert orjson.loads(r["body"]) == {"slot": "home_recs", "query": "session_id=s1&n=3"}
            assert r["headers"].pop("server") == "uvicorn"  # uvicorn's default headers too
            assert r["headers"].pop("date")
            assert r["headers"] == {
                "content-length": str(len(r["body"])),
                "content-type": "application/json",
                "x-kairos-config-version": "v7",
            }
            writer.write(_get("/v1/slots/home%5Frecs"))  # decoded first, as uvicorn does
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert orjson.loads(r["body"]) == {"slot": "home_recs", "query": ""}

            writer.write(b"POST /v1/slots/home_recs HTTP/1.1\r\nhost: t\r\n"
                         b"content-length: 2\r\n\r\n{}")  # fmt: skip
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert orjson.loads(r["body"]) == {"routed": "POST", "slot": "home_recs"}
            writer.write(b"HEAD /v1/slots/home_recs HTTP/1.1\r\nhost: t\r\n\r\n")
            r = await asyncio.wait_for(_read_response(reader, head_only=True), 5)
            assert r["status"] == "200"
            writer.write(_get("/v1/slots/home_recs", "expect: 100-continue"))
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert orjson.loads(r["body"])["routed"] == "GET"
            writer.write(_get("/v1/slots/a/b"))  # not a slot path: the app's 404
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert r["status"] == "404"
        finally:
            writer.close()
    assert route.answered == ["home_recs", "home_recs"]


async def test_requests_pipelined_behind_a_slow_answer_come_back_in_order() -> None:
    """The second and third requests arrive while the first is being decided: they wait
    their turn (uvicorn's pipeline), whichever path answers them."""
    route = StubRoute(delay_s=0.05)
    async with _server(_fast_app(route)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/v1/slots/first") + _get("/v1/slots/second")
                         + b"POST /v1/slots/third HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"
                         + _get("/v1/slots/fourth"))  # fmt: skip
            bodies = [
                orjson.loads((await asyncio.wait_for(_read_response(reader), 5))["body"])
                for _ in range(4)
            ]
        finally:
            writer.close()
    assert [b["slot"] for b in bodies] == ["first", "second", "third", "fourth"]
    assert "routed" in bodies[2]


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (_get("/v1/slots/s", "connection: close"), "the client asked to close"),
        (_get("/v1/slots/s", version="1.0"), "HTTP/1.0"),
    ],
)
async def test_a_connection_that_should_not_be_kept_is_closed_after_the_answer(
    request_bytes: bytes, why: str
) -> None:
    async with _server(_fast_app(StubRoute())) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request_bytes)
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert r["status"] == "200", why
            assert r["headers"]["connection"] == "close", why
            assert await asyncio.wait_for(reader.read(), 5) == b"", why
        finally:
            writer.close()


async def test_a_failed_decision_is_a_500_that_closes_the_connection(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with _server(_fast_app(StubRoute())) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/v1/slots/boom"))
            r = await asyncio.wait_for(_read_response(reader), 5)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        after = await _one(port, _get("/v1/slots/after"))  # the server goes on
    assert (r["status"], r["body"]) == ("500", b"Internal Server Error")
    assert r["headers"]["connection"] == "close"
    assert "the decision failed" in capsys.readouterr().err  # uvicorn's error log
    assert orjson.loads(after["body"])["slot"] == "after"


async def test_a_client_gone_before_its_answer_costs_nothing_else() -> None:
    route = StubRoute(delay_s=0.1)
    async with _server(_fast_app(route)) as port:
        _, gone = await asyncio.open_connection("127.0.0.1", port)
        gone.write(_get("/v1/slots/never-read"))
        await gone.drain()
        gone.close()
        r = await _one(port, _get("/v1/slots/next"))
        await asyncio.sleep(0.15)  # the first decision finishes after its client left
    assert orjson.loads(r["body"])["slot"] == "next"
    assert sorted(route.answered) == ["never-read", "next"]


async def test_before_the_app_has_started_the_app_answers() -> None:
    route = StubRoute()
    async with _server(_fast_app(route, started=False)) as port:
        r = await _one(port, _get("/v1/slots/home_recs"))
    assert orjson.loads(r["body"]) == {"routed": "GET", "slot": "home_recs"}
    assert route.answered == []


# -- the head's limits ------------------------------------------------------------------


async def _refusal(reader: asyncio.StreamReader) -> tuple[str, dict[str, Any]]:
    """A refusal's status and JSON body, then the connection's end."""
    r = await asyncio.wait_for(_read_response(reader), 5)
    assert r["headers"]["connection"] == "close"
    assert r["headers"]["content-type"] == "application/json"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    return r["status"], orjson.loads(r["body"])


async def _answered(port: int, fast: bool = True) -> bool:
    """The server still answers a plain request on a new connection."""
    if not fast:
        return bool((await _one(port, _get("/json?n=5")))["body"] == b'{"n":5}')
    r = await _one(port, _get("/v1/slots/after"))
    return bool(orjson.loads(r["body"])["slot"] == "after")


@pytest.mark.parametrize("fast", [True, False], ids=["slot path", "app path"])
async def test_headers_over_the_limit_get_431_and_the_connection_closes(fast: bool) -> None:
    path = "/v1/slots/s" if fast else "/json"
    async with _server(_fast_app(StubRoute()) if fast else APP) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:  # one header over the limit, and many that are not, arriving whole
            writer.write(_get(path, "x-big: " + "a" * (MAX_HEADER_BYTES + 1)))
            status, body = await _refusal(reader)
        finally:
            writer.close()
        many = [f"x-h{i}: {'b' * 100}" for i in range(MAX_HEADER_BYTES // 100)]
        r = await _one(port, _get(path, *many))
        assert await _answered(port, fast)
    assert status == "431"
    assert body == {"error": f"request headers over {MAX_HEADER_BYTES} bytes", "status": 431}
    assert r["status"] == "431"
    within = await _limits_hold_at(path, MAX_HEADER_BYTES - len("host") - len("t") - 10, fast)
    assert within == "200"


async def _limits_hold_at(path: str, header_bytes: int, fast: bool) -> str:
    """The status of a request whose headers are just `header_bytes` long."""
    async with _server(_fast_app(StubRoute()) if fast else APP) as port:
        r = await _one(port, _get(path, "x-fill: " + "c" * (header_bytes - len("x-fill"))))
    return str(r["status"])


async def test_a_head_that_never_ends_is_refused_once_it_passes_the_bound() -> None:
    """A header streamed on and on (a client could send 100 MB: uvicorn held it all, and
    put it together by concatenation for seconds of the event loop): refused when the
    bytes of the incomplete head pass MAX_PENDING_BYTES, long before it would end."""
    async with _server(_fast_app(StubRoute())) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refusal = asyncio.create_task(_refusal(reader))
        writer.write(b"GET /v1/slots/s HTTP/1.1\r\nhost: t\r\nx-big: ")
        sent = 0
        try:  # the client goes on sending until it sees the answer
            while sent < 20 * MAX_PENDING_BYTES and not refusal.done():
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
                await asyncio.sleep(0.001)
            status, body = await asyncio.wait_for(refusal, 5)
        finally:
            writer.close()
        assert await _answered(port)
    assert status == "431"
    assert body["error"] == f"request head over {MAX_PENDING_BYTES} bytes"
    assert sent < 2 * MAX_PENDING_BYTES  # refused while it was still coming


@pytest.mark.parametrize("split", [False, True], ids=["whole", "streamed"])
async def test_a_target_over_the_limit_gets_414(split: bool) -> None:
    target = "/v1/slots/s?session_id=" + "q" * MAX_TARGET_BYTES
    async with _server(_fast_app(StubRoute())) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = _get(target)
            if split:  # the request line alone, in pieces, without its end
                for start in range(0, len(target), 1024):
                    writer.write(request[start : start + 1024])
                    await writer.drain()
                    await asyncio.sleep(0.001)
            else:
                writer.write(request)
            status, body = await _refusal(reader)
        finally:
            writer.close()
        ok = await _one(port, _get("/v1/slots/s?session_id=" + "q" * (MAX_TARGET_BYTES - 100)))
    assert status == "414"
    assert body == {"error": f"request target over {MAX_TARGET_BYTES} bytes", "status": 414}
    assert ok["status"] == "200"


@pytest.fixture
def short_head_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(KairosHttpProtocol, "head_timeout_s", 0.3)
    return 0.3


async def test_a_head_not_complete_in_time_gets_408_and_silence_is_closed(
    short_head_timeout: float,
) -> None:
    async with _server(_fast_app(StubRoute())) as port:
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
        try:
            slow_w.write(b"GET /v1/slots/s HTTP/1.1\r\nhost")  # and no more
            status, body = await _refusal(slow_r)
            # a connection that sent nothing is closed without an answer
            assert await asyncio.wait_for(silent_r.read(), 5) == b""
        finally:
            slow_w.close()
            silent_w.close()
        assert await _answered(port)
    assert status == "408"
    assert body == {"error": "request head not complete within 0.3 s", "status": 408}


async def test_a_head_in_pieces_within_the_timeout_and_a_kept_connection_are_answered(
    short_head_timeout: float,
) -> None:
    route = StubRoute()
    async with _server(_fast_app(route)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for piece in (b"GET /v1/slots/pieces", b" HTTP/1.1\r\nho", b"st: t\r\n", b"\r\n"):
                writer.write(piece)
                await asyncio.sleep(short_head_timeout / 8)
            first = await asyncio.wait_for(_read_response(reader), 5)
            # idle on the kept connection for longer than the head timeout: that is
            # uvicorn's keep-alive timeout (5 s), not a head's
            await asyncio.sleep(short_head_timeout * 2)
            writer.write(_get("/v1/slots/kept"))
            second = await asyncio.wait_for(_read_response(reader), 5)
        finally:
            writer.close()
    assert [orjson.loads(r["body"])["slot"] for r in (first, second)] == ["pieces", "kept"]


async def test_a_refused_head_behind_a_pipelined_request_comes_after_its_answer() -> None:
    """The refusal cannot go before the answer still due: that answer closes the
    connection instead, and nothing after it is read."""
    route = StubRoute(delay_s=0.05)
    async with _server(_fast_app(route)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/v1/slots/first")
                         + _get("/v1/slots/second", "x-big: " + "a" * (MAX_HEADER_BYTES + 1))
                         + _get("/v1/slots/third"))  # fmt: skip
            r = await asyncio.wait_for(_read_response(reader), 5)
            rest = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    assert orjson.loads(r["body"])["slot"] == "first"
    assert r["headers"]["connection"] == "close"
    assert rest == b""
    assert route.answered == ["first"]


async def _big(request: Request) -> Response:
    return Response(b"x" * 256 * 1024, media_type="application/octet-stream")


async def test_a_client_that_stops_reading_has_its_connection_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forty 256 KiB answers asked for and none read: once the buffers are full the next
    answer waits send_timeout_s, then the connection is cut (uvicorn waited for ever,
    holding the request's task); the server goes on."""
    monkeypatch.setattr(KairosHttpProtocol, "send_timeout_s", 0.3)
    app = Starlette(routes=[Route("/big", _big), Route("/json", _json)])
    async with _server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get("/big") * 40)  # not drained: the server reads one ahead at most
        await asyncio.sleep(2.0)  # the buffers fill, the wait times out
        got = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                got += len(chunk)
        writer.close()
        after = await _one(port, _get("/json?n=4"))
    assert got < 40 * 256 * 1024  # cut before all of it was written
    assert after["body"] == b'{"n":4}'


async def test_a_deployments_limits_reach_the_protocol() -> None:
    """KAIROS_MAX_HEADER_BYTES and KAIROS_HEAD_TIMEOUT_S, through server_options (how
    `python -m api` and the served tests run uvicorn)."""
    settings = Settings(max_header_bytes=2048, head_timeout_s=0.3, send_timeout_s=5.0)
    protocol = server_options(settings)["http"]
    assert issubclass(protocol, KairosHttpProtocol)
    assert KairosHttpProtocol.max_header_bytes == MAX_HEADER_BYTES  # the default untouched
    async with _server(_fast_app(StubRoute()), protocol) as port:
        big = await _one(port, _get("/v1/slots/s", "x-big: " + "a" * 3000))
        fine = await _one(port, _get("/v1/slots/s", "x-ok: " + "a" * 1500))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /v1/slots/s HTTP/1.1\r\nho")
            status, body = await _refusal(reader)
        finally:
            writer.close()
    assert (big["status"], orjson.loads(big["body"])["error"]) == (
        "431", "request headers over 2048 bytes")  # fmt: skip
    assert fine["status"] == "200"
    assert (status, body["error"]) == ("408", "request head not complete within 0.3 s")


@pytest.mark.parametrize(
    "bad",
    [{"max_header_bytes": 512}, {"head_timeout_s": 0.0}, {"body_timeout_s": -1.0},
     {"send_timeout_s": 0.0}],
)  # fmt: skip
def test_limits_that_are_not_limits_are_refused_at_start(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="KAIROS_MAX_HEADER_BYTES must be >= 1024"):
        Settings(**bad)


async def test_a_slow_head_behind_an_answer_still_due_gets_its_408_after_that_answer() -> None:
    """The head's time runs out while the request before it is still being decided: the
    408 waits for that answer (a refusal never goes first), then comes, then the end."""
    route = StubRoute(delay_s=0.5)
    protocol = server_options(Settings(head_timeout_s=0.2))["http"]
    async with _server(_fast_app(route), protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/v1/slots/first") + b"GET /v1/slots/second HTTP/1.1\r\nho")
            first = await asyncio.wait_for(_read_response(reader), 5)
            status, body = await _refusal(reader)
        finally:
            writer.close()
    assert orjson.loads(first["body"])["slot"] == "first"
    assert (status, body["error"]) == ("408", "request head not complete within 0.2 s")
    assert route.answered == ["first"]
