"""uvicorn's HTTP protocol: a response's head and body sent in one write, and the slot
endpoint answered without ASGI.

uvicorn writes a response's status line and headers, then its body, each straight to the
socket: two send() calls and two TCP segments per answer, where each send on loopback runs
the whole TCP path of both ends. On the slot endpoint at 2,000 requests/s that second write
was ~3% of the API's CPU (loadtest/README.md, session 14). `OneWrite` holds each write until
the next one (and sends both together) or until the event loop's next turn, whichever comes
first: the order of the bytes never changes, and nothing waits longer than one turn of the
loop. Everything else about the transport is the real one's.

`KairosHttpProtocol` also answers a plain `GET /v1/slots/{slot}` (api/fastpath.py's
`SlotRoute`) straight from the parser's callbacks: no ASGI scope, no RequestResponseCycle
with its Event, no two send() messages checked header by header, no Starlette; one task
that decides and writes the whole response at once. Only when nothing else is in flight on
the connection (a request pipelined behind another takes uvicorn's path, which keeps them
in order), for GET without `Expect:` or an upgrade, and only once the app has started.
Everything else is uvicorn's, byte for byte.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.fastpath import SlotRoute


class OneWrite:
    """A transport wrapper that joins consecutive writes of one loop turn."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write_all(self, data: bytes) -> None:
        """A whole response: out now (after anything held), no turn of the loop waited."""
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        self._transport.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._held = None
            self._transport.write(held + data)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


class _Message:
    """What the protocol's callbacks set on a cycle's message event: nothing waits on it."""

    __slots__ = ()

    def set(self) -> None:
        pass


_MESSAGE = _Message()


class FastCycle:
    """The part of uvicorn's RequestResponseCycle that its protocol touches, for a request
    the fast path answers (pipelining, disconnects, shutdown, the request's own body)."""

    __slots__ = ("body", "disconnected", "keep_alive", "more_body", "response_complete")

    message_event = _MESSAGE

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.more_body = True
        self.body = bytearray()


_JSON_HEAD = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"


class KairosHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a OneWrite transport (`uvicorn.run(http=...)`), with
    the slot endpoint answered from the parser's callbacks."""

    transport: OneWrite  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWrite(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        if not self._answer_fast():
            super().on_headers_complete()

    def _answer_fast(self) -> bool:
        """Start the fast answer of this request if it can have one; False leaves it to
        uvicorn."""
        cycle = self.cycle
        if (
            (cycle is not None and not cycle.response_complete)
            or self.pipeline
            or self.expect_100_continue
            or self.limit_concurrency is not None
            or self.parser.get_method() != b"GET"
            or self.parser.should_upgrade()
        ):
            return False
        # The app as uvicorn calls it: wrapped by uvicorn (proxy headers, say), it is not
        # ours to bypass.
        state = getattr(self.app, "state", None)
        route: SlotRoute | None = getattr(state, "slot_route", None)
        runtime = getattr(state, "runtime", None)
        if route is None or runtime is None:  # not our app, or not started
            return False
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        target = route.match(path)
        if target is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        fast = FastCycle(keep_alive)
        self.cycle = fast  # type: ignore[assignment]
        started = time.perf_counter()
        task = self.loop.create_task(
            self._respond(fast, route, runtime, target, url.query or b"", started)
        )
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        return True

    async def _respond(
        self, cycle: FastCycle, route: SlotRoute, runtime: Any, target: str, query: bytes,
        started: float,
    ) -> None:  # fmt: skip
        try:
            status, body, headers = await route.answer(runtime, target, query, started)
        except Exception as exc:
            # as uvicorn does for an app that raises before it answers
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            status, body, headers = 500, b"Internal Server Error", {}
            cycle.keep_alive = False
            kind = b"content-type: text/plain; charset=utf-8\r\n"
        else:
            kind = _JSON_HEAD
        if self.flow.write_paused:
            await self.flow.drain()
        if cycle.disconnected:  # the client went away meanwhile: nothing to answer
            return
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % nv for nv in self.server_state.default_headers]
        head += [b"content-length: %d\r\n" % len(body), kind]
        for name, value in headers.items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        if not cycle.keep_alive:
            head.append(_CLOSE)
        head += [b"\r\n", body]
        self.transport.write_all(b"".join(head))
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


# How `python -m api` runs uvicorn (tests serve the app the same way).
SERVER_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": KairosHttpProtocol,  # httptools, one write per response, the slot fast path
    "access_log": False,
    "log_level": "warning",
    # Work per request that nobody here reads: X-Forwarded-* rewriting (no proxy in front
    # by default; its middleware would also keep the slot endpoint on the ASGI path) and
    # the Server and Date headers.
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,
}
