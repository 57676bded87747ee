"""Fuzzing the health server (chaos issue, scenarios 9 and 10).

``--healthz-port`` is reachable by anyone who can reach the node (flannel's default
``--healthz-ip`` is 0.0.0.0), unauthenticated. Whatever bytes arrive, the server
answers with one of its three pages or 404 (or closes the connection), never leaves an
unhandled exception behind, and never serves anything but the fixed pages.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from loden.health import HealthServer, HealthState, Metrics

REQUESTS = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda method, path, tail: f"{method} {path} HTTP/1.1\r\n".encode() + tail,
        st.sampled_from(["GET", "POST", "HEAD", "", "G\x00T"]),
        st.sampled_from(["/healthz", "/metrics", "/readyz", "/", "/../../etc/passwd", "*"])
        | st.text(max_size=40),
        st.binary(max_size=200) | st.just(b"\r\n"),
    ),
)


async def exchange(data: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: problems.append(context))
    server = await HealthServer(HealthState(), Metrics()).serve("127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(5):
                reply = await reader.read()
        except ConnectionError:
            reply = b""
        finally:
            writer.close()
        await asyncio.sleep(0)  # let the handler finish
    finally:
        server.close()
        await server.wait_closed()
    return reply, problems


@settings(max_examples=300, deadline=None)
@given(REQUESTS)
@example(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")  # longer than a stream line
@example(b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n")
def test_any_request_gets_a_fixed_page_or_a_close(data: bytes) -> None:
    reply, problems = asyncio.run(exchange(data))
    assert problems == []
    if reply:
        status = reply.split(b"\r\n", 1)[0]
        assert status in (
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 503 Service Unavailable",
        ), reply[:200]
