"""The kept-open probe connection against a real loopback HTTP server that misbehaves
on demand: reuse, servers that close idle connections, hangs, garbage, and the headers
EtcdHTTP sends (the same as its httpx client sends)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
import pytest

from loden.subnet.etcd_http import EtcdHTTP
from loden.subnet.quick_http import Answer, QuickHTTP


@dataclass
class Server:
    """HTTP/1.1 on 127.0.0.1; ``mode`` picks the behaviour for the next requests."""

    mode: str = "ok"
    port: int = 0
    connections: int = 0
    requests: list[h11.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self._stop.set()  # hanging handlers return
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._handlers)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    self.requests.append(event)
                elif isinstance(event, h11.Data):
                    self.bodies.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    if self.mode == "hang":
                        await self._stop.wait()
                        return
                    if self.mode == "drop-once":  # an idle timeout racing our request
                        self.mode = "ok"
                        return
                    if self.mode == "garbage":
                        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                        await writer.drain()
                        return
                    body = b'{"ok": true}'
                    headers = [("Content-Length", str(len(body)))]
                    if self.mode == "close":
                        headers.append(("Connection", "close"))
                    writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    if self.mode in ("close", "drop-idle"):
                        return  # "drop-idle": closes without saying so, as idle timeouts do
                    conn.start_next_cycle()
                else:
                    return
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    started = await Server().start()
    try:
        yield started
    finally:
        await started.close()


async def test_one_connection_for_many_requests(server: Server) -> None:
    quick = QuickHTTP(context=None, timeout=5)
    try:
        for _ in range(10):
            answer = await quick.send("POST", server.url + "/v3/kv/range", body=b'{"key":"eA=="}')
            assert answer == Answer(200, b'{"ok": true}')
        assert server.connections == 1 and quick.connects == 1
        assert len(server.requests) == 10 and server.bodies[-1] == b'{"key":"eA=="}'
        assert (b"host", f"127.0.0.1:{server.port}".encode()) in server.requests[0].headers
    finally:
        await quick.aclose()


@pytest.mark.parametrize("mode", ["close", "drop-idle"])
async def test_a_server_closing_the_connection_is_no_failure(server: Server, mode: str) -> None:
    server.mode = mode
    quick = QuickHTTP(context=None, timeout=5)
    try:
        for _ in range(3):
            assert await quick.send("GET", server.url + "/x") == Answer(200, b'{"ok": true}')
            await asyncio.sleep(0.05)  # let the close arrive (or not: the retry covers it)
        assert server.connections == 3
    finally:
        await quick.aclose()


async def test_a_reused_connection_closed_unanswered_is_retried_once(server: Server) -> None:
    quick = QuickHTTP(context=None, timeout=5)
    try:
        assert await quick.send("GET", server.url + "/x") == Answer(200, b'{"ok": true}')
        server.mode = "drop-once"
        assert await quick.send("GET", server.url + "/x") == Answer(200, b'{"ok": true}')
        assert quick.connects == 2 and len(server.requests) == 3
        # A fresh connection closed unanswered is a failure, not retried.
        server.mode = "drop-once"
        quick.reset()
        assert await quick.send("GET", server.url + "/x") is None
        assert quick.connects == 3
    finally:
        await quick.aclose()


async def test_a_second_caller_meanwhile_gets_none(server: Server) -> None:
    quick = QuickHTTP(context=None, timeout=5)
    try:
        first, second = await asyncio.gather(
            quick.send("GET", server.url + "/x"), quick.send("GET", server.url + "/y")
        )
        assert first == Answer(200, b'{"ok": true}') and second is None
        assert await quick.send("GET", server.url + "/y") == first
        assert quick.connects == 1  # the first request's connection was left intact
    finally:
        await quick.aclose()


async def test_hang_refused_and_garbage_are_none(server: Server) -> None:
    quick = QuickHTTP(context=None, timeout=0.5)
    try:
        server.mode = "hang"
        assert await quick.send("GET", server.url + "/x") is None
        server.mode = "garbage"
        assert await quick.send("GET", server.url + "/x") is None
        server.mode = "ok"
        assert await quick.send("GET", server.url + "/x") == Answer(200, b'{"ok": true}')
        assert quick.connects == 3  # every failure closed the connection
        assert await quick.send("GET", "http://127.0.0.1:1/x") is None
        assert await quick.send("GET", "https://127.0.0.1:1/x") is None  # no TLS context
    finally:
        await quick.aclose()


async def test_etcd_http_sends_its_credentials_and_follows_the_endpoint() -> None:
    first, second = await Server().start(), await Server().start()
    http = EtcdHTTP([first.url, second.url], auth=("root", "pässword"))
    try:
        http.headers["X-Token"] = "t0ken"
        await http.request("GET", "/v2/keys/a")  # through httpx: the reference
        assert await http.quick("GET", "/v2/keys/a", accept=lambda a: a.status == 200)
        by_httpx, by_quick = (dict(r.headers) for r in first.requests)
        for name in (b"authorization", b"x-token", b"host"):
            assert by_quick[name] == by_httpx[name]
        # A refused answer closes the connection; the endpoint change is followed.
        assert not await http.quick("GET", "/v2/keys/a", accept=lambda a: a.status == 404)
        http._use(1)
        assert await http.quick("GET", "/v2/keys/a", accept=lambda a: a.status == 200)
        assert len(second.requests) == 1 and first.connections == 2  # httpx's, ours
        assert http._quick.connects == 2
    finally:
        await http.aclose()
        await first.close()
        await second.close()
