"""The WireGuard UAPI text protocol: rendering ``set``, parsing ``get``, the client."""

from __future__ import annotations

import asyncio
import base64
from ipaddress import ip_network
from pathlib import Path

import pytest

from loden.errors import DataplaneError
from loden.kernel.wireguard.uapi import (
    PeerConfig,
    Uapi,
    UapiError,
    parse_get,
    render_set,
)

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(1, 33))).decode()
PSK = base64.b64encode(b"\x07" * 32).decode()
H1 = bytes(range(32)).hex()
H2 = bytes(range(1, 33)).hex()
ZERO = "0" * 64


def test_render_set_device_and_peers_exactly() -> None:
    peer = PeerConfig.make(
        K2,
        "10.0.0.2:51820",
        [ip_network("10.5.2.0/24"), ip_network("10.5.1.0/24")],
        PSK,
        25,
    )
    text = render_set(
        private_key=K1, listen_port=51820, replace_peers=True, peers=[peer], remove=[K1]
    )
    assert text == (
        "set=1\n"
        f"private_key={H1}\n"
        "listen_port=51820\n"
        "replace_peers=true\n"
        f"public_key={H1}\nremove=true\n"
        f"public_key={H2}\n"
        f"preshared_key={'07' * 32}\n"
        "endpoint=10.0.0.2:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.5.1.0/24\n"
        "allowed_ip=10.5.2.0/24\n"
        "\n"
    )


def test_render_set_without_psk_clears_it_and_keeps_nothing_implicit() -> None:
    peer = PeerConfig.make(K2, None, [ip_network("fd00::/64")])
    assert render_set(peers=[peer]) == (
        f"set=1\npublic_key={H2}\npreshared_key={ZERO}\n"
        "persistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=fd00::/64\n\n"
    )
    with pytest.raises(ValueError):
        render_set(remove=["nope"])


GET = f"""private_key={H1}
listen_port=51820
fwmark=0
public_key={H2}
preshared_key={ZERO}
protocol_version=1
endpoint=[fd00::1]:51821
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=10
rx_bytes=20
persistent_keepalive_interval=0
allowed_ip=10.5.2.0/24
allowed_ip=fd00:5:0:2::/64
public_key={H1}
preshared_key={"07" * 32}
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=25
errno=0

"""


def test_parse_get() -> None:
    state = parse_get(GET)
    assert state.private_key == K1 and state.listen_port == 51820
    first, second = state.peers
    assert first.config == PeerConfig.make(
        K2, "[fd00::1]:51821", [ip_network("fd00:5:0:2::/64"), ip_network("10.5.2.0/24")]
    )
    assert (first.last_handshake, first.tx_bytes, first.rx_bytes) == (1700000000.5, 10, 20)
    assert second.config == PeerConfig(K1, None, (), PSK, 25)
    assert state.peer_configs() == {K2: first.config, K1: second.config}


def test_rendered_peer_round_trips_through_parse() -> None:
    peer = PeerConfig.make(K2, "192.0.2.1:1", [ip_network("10.1.0.0/24")], PSK, 5)
    lines = render_set(peers=[peer]).splitlines()[1:]
    answer = "\n".join(
        line for line in lines if not line.startswith(("replace_allowed_ips", "remove"))
    )
    assert parse_get(answer + "\nerrno=0\n\n").peers[0].config == peer


@pytest.mark.parametrize("text", ["errno=-22\n\n", "listen_port\n", "listen_port=x\n"])
def test_parse_get_rejects_errors_and_garbage(text: str) -> None:
    with pytest.raises(UapiError):
        parse_get(text)


async def test_client_get_set_and_errno(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readuntil(b"\n\n")
        seen.append(data)
        if data.startswith(b"get=1"):
            writer.write(GET.encode())
        elif b"listen_port=1\n" in data:
            writer.write(b"errno=-22\n\n")
        else:
            writer.write(b"errno=0\n\n")
        await writer.drain()
        writer.close()

    path = tmp_path / "x.sock"
    server = await asyncio.start_unix_server(handle, str(path))
    try:
        uapi = Uapi("x", timeout=2.0)
        uapi.path = path
        assert await uapi.alive()
        assert (await uapi.get()).listen_port == 51820
        await uapi.set(render_set(listen_port=51820))
        with pytest.raises(DataplaneError, match=r"errno 22") as info:
            await uapi.set(render_set(listen_port=1))
        assert info.value.errno == 22
        assert b"listen_port=51820\n" in seen[-2]
    finally:
        server.close()
        await server.wait_closed()


async def test_client_reports_a_missing_socket(tmp_path: Path) -> None:
    uapi = Uapi("gone", timeout=1.0)
    uapi.path = tmp_path / "gone.sock"
    assert not await uapi.alive()
    with pytest.raises(DataplaneError, match=r"gone\.sock") as info:
        await uapi.get()
    assert info.value.errno is not None
