"""Input limits: request body size and time (Starlette has neither) and id validation."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.exceptions import BadRequest
from stream_engine.events import ID_PATTERN


def valid_id(value: Any, name: str, required: bool = True) -> str | None:
    if value is None or value == "":
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest(f"{name} must be 1-128 characters of [A-Za-z0-9._:@-]")
    return value


def json_body(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None


# The defaults of the settings that bound a request and its answer (api/settings.py;
# applied by api/server.py and BodyLimit). Node.js allows 16 KiB of headers; nginx's
# send_timeout is 60 s. Without a bound on the body, a client that trickles it, or promises
# more than it sends, holds a connection and a task for ever.
MAX_HEADER_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413: by Content-Length before reading, or while
    reading (BadRequest, mapped to 413 by the app's error handler); and bodies not complete
    `timeout_s` after the first read with 408, which closes the connection (kept, the rest
    of a late body would be read as the next request)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._refuse(send)
                return
        seen = 0
        deadline: float | None = None
        done = False  # the whole body came: what follows (a disconnect) has no deadline

        async def limited_receive() -> Message:
            nonlocal seen, deadline, done
            if done:
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BadRequest(f"body not complete within {self.timeout_s:g} s", 408) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BadRequest(f"body over {self.max_bytes} bytes", 413)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"error": f"body over {self.max_bytes} bytes", "status": 413})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
