"""One write per response (api/server.py): the bytes and their order are uvicorn's; only
the number of writes changes. No services involved: a stub transport, then a real uvicorn
on loopback serving a small Starlette app through the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.server import OneWrite, OneWriteHttpToolsProtocol


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
async def _server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(APP, http=OneWriteHttpToolsProtocol, log_level="warning",
                            lifespan="off")  # fmt: skip
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
