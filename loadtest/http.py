"""A small keep-alive HTTP/1.1 client for load generation.

httpx spends several hundred microseconds of CPU per request; on a 2-core machine that
makes the generator, not the server, the bottleneck. This client writes a GET or POST on
a pooled connection (retrying once on a fresh one when a reused connection turns out to
have been closed by the server while idle) and reads the status, the headers it is asked for and a
Content-Length body: enough for JSON APIs, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass


class HttpError(Exception):
    """The connection failed or the response was not parseable HTTP/1.1."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


_FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
             HttpError)  # fmt: skip


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, raw: bytes) -> Response:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {lines[0][:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get(b"content-length", b"0"))
        body = await self.reader.readexactly(length) if length else b""
        return Response(int(parts[1]), headers, body)

    def close(self) -> None:
        self.writer.close()


class Client:
    """Connections to one host:port, opened on demand and reused."""

    @classmethod
    def for_url(cls, url: str) -> Client:
        """A client for an http://host:port base URL."""
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        return cls(host, int(port or 80))

    def __init__(self, host: str, port: int, max_connections: int = 512) -> None:
        self.host, self.port = host, port
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self.opened = 0

    def _raw(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    async def request(self, method: str, path: str, body: bytes | None = None) -> Response:
        raw = self._raw(method, path, body)
        async with self._slots:
            if self._idle:
                conn = self._idle.pop()
                try:
                    return self._keep(conn, await conn.request(raw))
                except _FAILURES:
                    conn.close()  # the server closed it while idle (keep-alive timeout)
            try:
                conn = await self._open()
            except OSError as exc:
                raise HttpError(f"connect: {exc}") from None
            try:
                return self._keep(conn, await conn.request(raw))
            except _FAILURES as exc:
                conn.close()
                raise HttpError(str(exc) or type(exc).__name__) from None

    def _keep(self, conn: _Conn, response: Response) -> Response:
        if response.headers.get(b"connection") == b"close":
            conn.close()
        else:
            self._idle.append(conn)
        return response

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        return _Conn(reader, writer)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
        self._idle.clear()


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
