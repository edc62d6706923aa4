"""GET /v1/slots/{slot} as plain ASGI, ahead of Starlette's router.

The slot endpoint is what a storefront calls on every page view; at 2,000 requests/s the
layers around it (exception middlewares, body limit, route matching, Request and
QueryParams objects, Response) cost about a tenth of the API's CPU. FastSlots answers it
from the ASGI scope with the same code (endpoints.slot_body), the same body, headers and
errors; everything else, and any path it doesn't recognise exactly, goes on to Starlette.
The benchmark's static baseline (`/bench/static`) takes the same path, so the baseline
still measures the server under the decision and nothing more.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from api.endpoints import STATIC, slot_body
from api.exceptions import BadRequest
from api.runtime import Runtime

PREFIX = "/v1/slots/"
_JSON = (b"content-type", b"application/json")


class FastSlots:
    def __init__(self, app: ASGIApp, static: bool = False) -> None:
        self.app = app
        self.static = static

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX) :]:
            await self._slot(scope, path[len(PREFIX) :], send)
        elif self.static and path == "/bench/static":
            await _send(send, 200, orjson.dumps(STATIC), {})
        else:
            await self.app(scope, receive, send)

    async def _slot(self, scope: Scope, slot: str, send: Send) -> None:
        started = time.perf_counter()
        rt: Runtime = scope["app"].state.runtime
        # Like Starlette's QueryParams: blank values kept, the last of a repeated name wins.
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        try:
            body, headers = await slot_body(rt, slot, query, started)
        except BadRequest as exc:
            body = orjson.dumps({"error": exc.detail, "status": exc.status})
            await _send(send, exc.status, body, {})
            return
        await _send(send, 200, body, headers)


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-length", str(len(body)).encode()), _JSON]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
