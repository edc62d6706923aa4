"""GET /v1/slots/{slot} answered without Starlette's layers, and without ASGI's.

The slot endpoint is what a storefront calls on every page view. Around its decision, at
2,000 requests/s, Starlette's layers (exception middlewares, body limit, route matching,
Request and QueryParams objects, Response) cost about a tenth of the API's CPU, and uvicorn's
ASGI cycle (a scope dict, a RequestResponseCycle and an Event per request, two send()
messages whose headers it checks one by one) a little more.

`SlotRoute` is that endpoint on bare bytes: it knows which paths it answers and answers
them with the same code as the Starlette route (endpoints.slot_body), the same status,
headers and body. Two callers use it:

* `KairosHttpProtocol` (api/server.py), the server's HTTP protocol, for a plain GET on a
  keep-alive connection with nothing else in flight: no ASGI at all;
* `FastSlots`, ahead of Starlette's router, for whatever reaches the app another way (the
  tests' in-process client, another server).

Everything else, and any path it does not recognise exactly, goes on to Starlette. The
benchmark's static baseline (`/bench/static`) takes the same path, so the baseline still
measures the server under the decision and nothing more.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from api.endpoints import STATIC, slot_body, slot_query
from api.exceptions import BadRequest
from api.runtime import Runtime

PREFIX = "/v1/slots/"
STATIC_PATH = "/bench/static"
_JSON = (b"content-type", b"application/json")
_STATIC_TARGET = ""  # match()'s answer for the static baseline (no slot has an empty name)

Answer = tuple[int, bytes, dict[str, str]]  # status, JSON body, extra headers


class SlotRoute:
    """Which GET paths the fast path answers, and their answers."""

    __slots__ = ("static",)

    def __init__(self, static: bool = False) -> None:
        self.static = static  # also answer the benchmark's /bench/static

    def match(self, path: str) -> str | None:
        """The slot a decoded path asks for, _STATIC_TARGET for the baseline, or None."""
        if path.startswith(PREFIX):
            slot = path[len(PREFIX) :]
            return slot if slot and "/" not in slot else None
        if self.static and path == STATIC_PATH:
            return _STATIC_TARGET
        return None

    async def answer(self, rt: Runtime, target: str, query: bytes, started: float) -> Answer:
        """The response to GET {target}?{query}; a BadRequest becomes its 4xx."""
        if target == _STATIC_TARGET:
            return 200, orjson.dumps(STATIC), {}
        # Like Starlette's QueryParams: blank values kept (slot_query: a repeated one, 400).
        try:
            q = slot_query(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
            body, headers = await slot_body(rt, target, q, started)
        except BadRequest as exc:
            return exc.status, orjson.dumps({"error": exc.detail, "status": exc.status}), {}
        return 200, body, headers


class FastSlots:
    """SlotRoute as ASGI middleware, ahead of Starlette's router."""

    def __init__(self, app: ASGIApp, static: bool = False) -> None:
        self.app = app
        self.route = SlotRoute(static)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        target = self.route.match(scope["path"])
        if target is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rt: Runtime = scope["app"].state.runtime
        status, body, headers = await self.route.answer(rt, target, scope["query_string"], started)
        raw = [(b"content-length", str(len(body)).encode()), _JSON]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
