"""uvicorn's HTTP protocol: a response's head and body sent in one write, and the slot
endpoint answered without ASGI.

uvicorn writes a response's status line and headers, then its body, each straight to the
socket: two send() calls and two TCP segments per answer, where each send on loopback runs
the whole TCP path of both ends. On the slot endpoint at 2,000 requests/s that second write
was ~3% of the API's CPU (loadtest/JOURNAL.md, session 14). `OneWrite` holds each write until
the next one (and sends both together) or until the event loop's next turn, whichever comes
first: the order of the bytes never changes, and nothing waits longer than one turn of the
loop. Everything else about the transport is the real one's.

`KairosHttpProtocol` also answers a plain `GET /v1/slots/{slot}` (api/fastpath.py's
`SlotRoute`) straight from the parser's callbacks: no ASGI scope, no RequestResponseCycle
with its Event, no two send() messages checked header by header, no Starlette; one task
that decides and writes the whole response at once. Only when nothing else is in flight on
the connection (a request pipelined behind another takes uvicorn's path, which keeps them
in order), for GET without `Expect:` or an upgrade, and only once the app has started.
Everything else is uvicorn's, byte for byte, but for the limits on a request's head.

**The head's limits.** httptools and uvicorn take a request's head as it comes, for as
long as it takes: a client could send a 100 MB header (held in memory, and put together
by repeated concatenation: it held the event loop, every other request with it, for 3.4 s
on this machine), or keep a connection open with half a head, or with nothing, for ever.
`KairosHttpProtocol` refuses, with a JSON error and `connection: close`:

* a request target (path and query) over `MAX_TARGET_BYTES`: 414;
* header names and values over `MAX_HEADER_BYTES` in all: 431; a head still incomplete
  after `MAX_PENDING_BYTES` on the wire is refused as soon as that much has arrived;
* a head not complete `HEAD_TIMEOUT_S` after the connection opened, or after its first
  bytes: 408 (a connection that sent nothing is just closed);

and a client that stops reading its answers (its buffers full, the next answer waiting
to be written for `SEND_TIMEOUT_S`) has its connection cut, where uvicorn would wait for
ever with the request's task.

The header limit and the timeouts are the deployment's (`KAIROS_MAX_HEADER_BYTES`,
`KAIROS_HEAD_TIMEOUT_S`, `KAIROS_SEND_TIMEOUT_S`: `server_options`), with their defaults
in api/limits.py. Each is counted in `kairos_api_refused_total{reason}`. A request that
arrives whole pays a few counters and two length checks for them; the timer is armed only
when a head is split across reads (and once per connection, for its first).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.fastpath import SlotRoute
from api.limits import HEAD_TIMEOUT_S, MAX_HEADER_BYTES, SEND_TIMEOUT_S
from api.settings import Settings

# A request's head (this module's docstring); the header limit and the timeouts are
# settings, with their defaults in api/limits.py. nginx allows an 8 KiB request line.
MAX_TARGET_BYTES = 8 * 1024


def pending_bound(max_header_bytes: int) -> int:
    """The most of an unfinished head taken before it is refused. Names and values are
    counted as the parser hands them over; this bound is on the wire, where a head within
    both limits takes at most ~4x their sum (with the shortest header lines, "n:\r\n")."""
    return 4 * (MAX_TARGET_BYTES + max_header_bytes)


MAX_PENDING_BYTES = pending_bound(MAX_HEADER_BYTES)
# After a refusal, what the client still sends is read and dropped, up to this long and this
# much, before the connection closes: closed with unread bytes, the kernel would reset it,
# and a reset loses the refusal on its way to the client ("lingering close", as nginx does).
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024


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


class BoundedFlow(FlowControl):
    """uvicorn's flow control with a bound on waiting for the client to read: a drain
    still waiting after `timeout_s` aborts the connection (and calls `on_cut`), which
    ends the wait as any lost connection does, the request's answer marked undeliverable
    by uvicorn's connection_lost."""

    def __init__(self, transport: asyncio.Transport, on_cut: Any, timeout_s: float) -> None:
        super().__init__(transport)
        self._on_cut = on_cut
        self._timeout_s = timeout_s

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await super().drain()
            return
        except TimeoutError:
            self._on_cut()
            self._transport.abort()
        try:  # connection_lost resumes writing; should it not come, stop waiting anyway
            async with asyncio.timeout(1.0):
                await super().drain()
        except TimeoutError:
            self.resume_writing()


class _Refused(Exception):
    """Raised from a parser callback after the refusal is written: stops the parser."""


_JSON_HEAD = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"


class KairosHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a OneWrite transport (`uvicorn.run(http=...)`), with
    the slot endpoint answered from the parser's callbacks."""

    transport: OneWrite  # type: ignore[assignment]

    # The limits: the defaults here, a deployment's in the subclass server_options makes
    max_header_bytes = MAX_HEADER_BYTES
    max_pending_bytes = MAX_PENDING_BYTES  # pending_bound(max_header_bytes)
    head_timeout_s = HEAD_TIMEOUT_S
    send_timeout_s = SEND_TIMEOUT_S

    # The head being received: whether one has begun and not ended, the bytes of its
    # headers so far, the bytes on the wire bounding it while it stays incomplete, the
    # messages begun (to tell whether a read began a new one), and its timer.
    _in_head = False
    _header_bytes = 0
    _pending = 0
    _begun = 0
    _head_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWrite(transport, self.loop))  # type: ignore[arg-type]
        self.flow = BoundedFlow(self.transport, lambda: self._count("send_timeout"),  # type: ignore[arg-type]
                                self.send_timeout_s)  # fmt: skip
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered: what follows is dropped until the connection closes
            self._pending += len(data)
            if self._pending > LINGER_BYTES:
                self.transport.close()
            return
        begun, was_in_head = self._begun, self._in_head
        # uvicorn's data_received, but for a refusal's _Refused (not an invalid request)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._refused:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if not self._in_head or self.transport.is_closing():
            return
        if was_in_head and begun == self._begun:  # all of it more of the same head
            self._pending += len(data)
        else:  # the head began in this read: at most this read is held beyond the count
            self._pending = 0
        if len(self.url) > MAX_TARGET_BYTES:
            self._refuse(414, "target_too_long", f"request target over {MAX_TARGET_BYTES} bytes")
        elif self._pending > self.max_pending_bytes:
            self._refuse(431, "head_too_large", f"request head over {self.max_pending_bytes} bytes")
        elif self._head_timer is None:  # split across reads: it has head_timeout_s
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_bytes = 0
        self._begun += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._pending = 0
        if self._head_timer is not None:
            self._cancel_head_timer()
        if len(self.url) > MAX_TARGET_BYTES:
            self._refuse(414, "target_too_long", f"request target over {MAX_TARGET_BYTES} bytes")
            raise _Refused  # stops the parser: nothing after this head is read
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, "head_too_large",
                         f"request headers over {self.max_header_bytes} bytes")  # fmt: skip
            raise _Refused
        if not self._answer_fast():
            super().on_headers_complete()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._answer_due():  # the client is still being answered: another period
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        elif self._in_head:
            self._refuse(408, "head_timeout",
                         f"request head not complete within {self.head_timeout_s:g} s")  # fmt: skip
        elif self._begun == 0:  # nothing came since the connection opened
            self._refused = True
            self._count("head_timeout")
            self.transport.close()

    def _answer_due(self) -> bool:
        """Whether an earlier request of this connection is still to be answered."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` with a JSON error and close the connection. Behind answers still
        due (pipelined requests), the refusal cannot go first: nothing more is read, and
        the connection closes after the last of them (what comes meanwhile is dropped)."""
        self._refused = True
        self._cancel_head_timer()
        self._count(reason)
        if self._answer_due():
            self.cycle.keep_alive = False  # the latest request's cycle is answered last
            return
        body = orjson.dumps({"error": message, "status": status})
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % nv for nv in self.server_state.default_headers]
        head += [b"content-length: %d\r\n" % len(body), _JSON_HEAD, _CLOSE, b"\r\n", body]
        self.transport.write_all(b"".join(head))
        self._pending = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then our end: the client reads both
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _count(self, reason: str) -> None:
        runtime = getattr(getattr(self.app, "state", None), "runtime", None)
        metrics = getattr(runtime, "metrics", None)
        if metrics is not None:
            metrics.refused.labels(reason).inc()

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


def server_options(settings: Settings) -> dict[str, Any]:
    """SERVER_OPTIONS with the protocol made for `settings`' limits on heads and answers."""
    protocol = type("KairosHttpProtocol", (KairosHttpProtocol,), {
        "max_header_bytes": settings.max_header_bytes,
        "max_pending_bytes": pending_bound(settings.max_header_bytes),
        "head_timeout_s": settings.head_timeout_s,
        "send_timeout_s": settings.send_timeout_s,
    })  # fmt: skip
    return {**SERVER_OPTIONS, "http": protocol}


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
