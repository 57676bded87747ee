"""One small HTTP request, sent again and again on a kept-open connection.

Why not httpx: the agent's /healthz probe asks the store one question every 3 s while
nothing else proved it alive. Through httpx that one request cost ~1.1 ms of the
agent's CPU (request and response models, the connection pool, the auth flow, anyio
cancel scopes), ~40 % of an idle agent's CPU. The same request with h11 on an asyncio
stream that stays open costs ~0.25 ms (``bench/probe.py``: v3 1.16 -> 0.27 ms, v2
1.11 -> 0.24 ms, v3 over TLS 1.20 -> 0.29 ms); of that, ~0.1 ms is the socket round
trip itself and ~0.1 ms h11's parsing, which a hand-written parser could save at the
price of owning one. h11 is no new weight: httpcore (under httpx) already loads it.

This is only a fast path. It never explains a failure: :meth:`QuickHTTP.send` returns
``None`` on any (refused, timeout, TLS, protocol, oversized answer), after closing the
connection, and the caller falls back to its full httpx path, which owns endpoint
failover, credential refresh and the precise error messages.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

log = logging.getLogger(__name__)

#: A probe's answer is a few hundred bytes; anything far larger is not what we asked.
MAX_BODY = 1 << 20
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL split once into what opening a connection and a request line need."""

    origin: tuple[str, str, int]  # scheme, host, port: the connection it needs
    authority: str  # the Host header
    path: str  # path and query, as sent


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered."""


class QuickHTTP:
    """A single HTTP/1.1 keep-alive connection, reopened to whichever origin is asked.

    ``context`` is used for https URLs (an https URL without one is never sent: the
    caller's full path decides how to verify). ``timeout`` bounds one whole
    :meth:`send`, connecting included.
    """

    def __init__(self, *, context: ssl.SSLContext | None, timeout: float) -> None:
        self.context = context
        self.timeout = timeout
        self._targets: dict[str, _Target] = {}
        self._requests: dict[tuple[object, ...], h11.Request] = {}
        self._origin: tuple[str, str, int] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11: h11.Connection | None = None
        self._busy = False
        #: Connections opened so far (tests check that the connection is reused).
        self.connects = 0

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Answer | None:
        """The server's answer, or None when there was none (the connection is closed).
        A call while another is in flight gets None at once (one connection, one request)."""
        if self._busy:
            return None
        self._busy = True
        try:
            target = self._target(url)
            async with asyncio.timeout(self.timeout):
                try:
                    return await self._exchange(target, method, headers, body)
                except _StaleConnection:
                    # Idle keep-alive connections get closed by servers; that is no
                    # sign of an outage: one retry on a fresh connection.
                    self.reset()
                    return await self._exchange(target, method, headers, body)
        except Exception as exc:  # any failure: the caller's full path explains it
            log.debug("quick %s %s: %s: %s", method, url, type(exc).__name__, exc)
            self.reset()
            return None
        except BaseException:  # cancelled mid-request: the connection's state is unknown
            self.reset()
            raise
        finally:
            self._busy = False

    def reset(self) -> None:
        """Close the connection (the next :meth:`send` opens a new one)."""
        if self._writer is not None:
            self._writer.transport.abort()
        self._origin = self._reader = self._writer = self._h11 = None

    async def aclose(self) -> None:
        self.reset()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            if parts.scheme == "https" and self.context is None:
                raise ValueError("https without a TLS context")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            authority = parts.netloc.rpartition("@")[2]
            target = _Target((parts.scheme, parts.hostname, port), authority, path)
            if len(self._targets) > 16:  # endpoints are few; never grow without bound
                self._targets.clear()
            self._targets[url] = target
        return target

    def _request(
        self, target: _Target, method: str, headers: Sequence[tuple[str, str]], length: int
    ) -> h11.Request:
        """The request event, built once: h11 validates every header with a regular
        expression, ~20 % of a probe's CPU when done each time."""
        key = (target.authority, target.path, method, tuple(headers), length)
        request = self._requests.get(key)
        if request is None:
            framing = [("Content-Length", str(length))] if length else []
            request = h11.Request(
                method=method,
                target=target.path,
                headers=[("Host", target.authority), *framing, *headers],
            )
            if len(self._requests) > 16:  # a new token or endpoint now and then
                self._requests.clear()
            self._requests[key] = request
        return request

    async def _connect(self, origin: tuple[str, str, int]) -> None:
        scheme, host, port = origin
        tls = self.context if scheme == "https" else None
        self._reader, self._writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls is not None else None
        )
        self._origin = origin
        self._h11 = h11.Connection(h11.CLIENT)
        self.connects += 1

    async def _exchange(
        self, target: _Target, method: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> Answer:
        reused = self._h11 is not None
        if reused and (
            self._origin != target.origin
            or self._reader is None
            or self._reader.at_eof()
            or self._h11 is None
            or self._h11.our_state is not h11.IDLE
        ):
            self.reset()
            reused = False
        if self._h11 is None:
            await self._connect(target.origin)
        conn, reader, writer = self._h11, self._reader, self._writer
        assert conn is not None and reader is not None and writer is not None
        data = conn.send(self._request(target, method, headers, len(body))) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        received = False
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError as exc:
            if reused:
                raise _StaleConnection from exc
            raise
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    chunk = await reader.read(_READ_CHUNK)
                except ConnectionError as exc:
                    if reused and not received:
                        raise _StaleConnection from exc
                    raise
                if not chunk and reused and not received:
                    raise _StaleConnection
                received = True
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise ValueError(f"answer larger than {MAX_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before the answer was complete")
            # InformationalResponse (1xx): the final response follows.
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.reset()  # "Connection: close" or a body we did not frame: reopen next time
        return Answer(status, b"".join(chunks))
