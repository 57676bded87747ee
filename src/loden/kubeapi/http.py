"""HTTP/1.1 over asyncio streams with h11: keep-alive requests and chunked streams.

Go's net/http and httpx both speak HTTP/1.1 here (ALPN offers only ``http/1.1``). A
handler returns a :class:`Response` (sent with Content-Length) or a
:class:`StreamResponse` whose chunks are flushed one by one (Transfer-Encoding:
chunked, what a watch is). While a stream runs, the connection is read on the side so
a client that goes away ends the stream at once. Every open connection is tracked so
the server can cut watches or drop everything when it "goes down".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from loden.kubeapi.status import internal

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # kube-apiserver's limit for a request body
_INTERNAL_ERROR = json.dumps(internal("the handler failed").status()).encode()


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer_cert: dict[str, Any] | None
    peer: str

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[-1] if values else default

    @property
    def raw_query(self) -> str:
        return urllib.parse.urlencode([(k, v) for k, vs in self.query.items() for v in vs])


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class StreamResponse:
    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    on_close: Callable[[], None] | None = None
    """Called once the stream is over, however it ended (even if it never started)."""


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(eq=False)
class Connection:
    writer: asyncio.StreamWriter
    streaming: bool = False

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


class HttpServer:
    """Serves ``handler`` on ``host:port`` (TLS when ``context`` is given)."""

    def __init__(
        self, handler: Handler, host: str, port: int, context: ssl.SSLContext | None
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.context = context
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.context, reuse_address=True, backlog=1024
        )
        sockets = self._server.sockets
        if self.port == 0 and sockets:
            self.port = int(sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def abort_all(self, *, streams_only: bool = False) -> int:
        victims = [c for c in self.connections if c.streaming or not streams_only]
        for connection in victims:
            connection.abort()
        return len(victims)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(writer)
        self.connections.add(connection)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        ssl_object = writer.get_extra_info("ssl_object")
        peer_cert = ssl_object.getpeercert() if ssl_object is not None else None
        peer = str(writer.get_extra_info("peername"))
        try:
            while True:
                request = await self._read_request(conn, reader, writer, peer_cert, peer)
                if request is None:
                    return
                try:
                    response = await self.handler(request)
                except Exception:  # a bug in a handler must not kill the server
                    log.exception("handler failed for %s %s", request.method, request.path)
                    response = Response(
                        500,
                        _INTERNAL_ERROR,
                    )
                if isinstance(response, StreamResponse):
                    connection.streaming = True
                    try:
                        await self._send_stream(conn, reader, writer, response)
                    finally:
                        if response.on_close is not None:
                            response.on_close()
                    connection.streaming = False
                else:
                    await self._send(conn, writer, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (
            ConnectionError,
            OSError,
            h11.ProtocolError,
            asyncio.IncompleteReadError,
            ssl.SSLError,
        ):
            return
        finally:
            self.connections.discard(connection)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_cert: dict[str, Any] | None,
        peer: str,
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                head = event
                if conn.they_are_waiting_for_100_continue:  # curl does this for bodies > 1 KiB
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                    await writer.drain()
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise ConnectionError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                return Request(
                    method=head.method.decode("ascii"),
                    path=urllib.parse.unquote(path),
                    query=urllib.parse.parse_qs(query, keep_blank_values=True),
                    headers={
                        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                    },
                    body=bytes(body),
                    peer_cert=peer_cert or None,
                    peer=peer,
                )

    @staticmethod
    def _head(
        status: int, content_type: str, extra: list[tuple[str, str]], length: int | None
    ) -> h11.Response:
        headers = [("Content-Type", content_type), ("Cache-Control", "no-cache, private"), *extra]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        return h11.Response(status_code=status, headers=headers)

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        writer.write(
            conn.send(
                self._head(
                    response.status, response.content_type, response.headers, len(response.body)
                )
            )
            or b""
        )
        if response.body:
            writer.write(conn.send(h11.Data(data=response.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def _send_stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: StreamResponse,
    ) -> None:
        writer.write(
            conn.send(self._head(response.status, response.content_type, response.headers, None))
            or b""
        )
        await writer.drain()

        async def pump() -> None:
            async for chunk in response.chunks:
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await writer.drain()

        async def client_gone() -> None:
            # A client sends nothing while it reads a stream; EOF means it went away.
            while await reader.read(65536):
                pass

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(client_gone())
        try:
            done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            for task in (pumping, watching):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            close = getattr(response.chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        if pumping in done and pumping.exception() is None:
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        else:
            raise ConnectionError("stream ended by the client or a broken connection")
