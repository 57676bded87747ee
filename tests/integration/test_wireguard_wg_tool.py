"""The kernel WireGuard device's configuration path, against the real ``wg`` tool.

This kernel has no WireGuard, so no kernel ``wireguard`` link can be made here. But
``wg`` talks to user-space devices through the same commands (it falls back to their
UAPI socket), so :class:`KernelWireguard`'s ``wg set`` / ``wg show dump`` translation is
exercised for real against a ``wireguard-go`` device in a namespace, and read back both
through ``wg`` and through the UAPI (two independent readers must agree).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from ipaddress import IPv4Network, IPv6Network

import pytest

from loden.kernel.wireguard.kernel import KernelWireguard
from loden.kernel.wireguard.keys import generate_private_key, public_key_of
from loden.kernel.wireguard.process import WireguardGo
from loden.kernel.wireguard.uapi import PeerConfig, SetRequest
from tests.fixtures.topology import Topology, TopologyFactory

pytestmark = pytest.mark.root


@pytest.fixture
async def served(make_topology: TopologyFactory) -> AsyncIterator[tuple[WireguardGo, str]]:
    topo: Topology = make_topology(1)
    host = topo.hosts[0]
    name = f"wt{topo.token}{os.getpid() % 1000}"[:15]
    proc = WireguardGo(name, netns=host.name)
    await proc.start()
    try:
        yield proc, host.name
    finally:
        await proc.stop()


async def test_wg_set_and_dump_round_trip(served: tuple[WireguardGo, str]) -> None:
    proc, netns = served
    dev = KernelWireguard(proc.name, netns=netns)
    private = generate_private_key()
    psk = generate_private_key()
    keys = [public_key_of(generate_private_key()) for _ in range(3)]
    p1 = PeerConfig.make(
        keys[0],
        "192.0.2.20:51820",
        [IPv4Network("10.5.2.0/24"), IPv4Network("10.5.3.0/24")],
        psk,
        25,
    )
    p2 = PeerConfig.make(keys[1], "[fd00::2]:51821", [IPv6Network("fd00:5:0:2::/64")])
    await dev.set(
        SetRequest(private_key=private, listen_port=51899, replace_peers=True, peers=(p1, p2))
    )
    state = await dev.get()
    assert state.private_key == private and state.listen_port == 51899
    assert state.peer_configs() == {keys[0]: p1, keys[1]: p2}
    assert (await proc.get()).peer_configs() == state.peer_configs()  # the UAPI agrees
    # A changed peer is written in full (allowed IPs replaced, PSK and keepalive gone),
    # a removal removes, replace_peers drops what the request does not name.
    moved = PeerConfig.make(keys[0], "192.0.2.21:51820", [IPv4Network("10.5.9.0/24")])
    await dev.set(SetRequest(peers=(moved,), remove=(keys[1],)))
    assert (await dev.get()).peer_configs() == {keys[0]: moved}
    p3 = PeerConfig.make(keys[2], "192.0.2.30:51820", [IPv4Network("10.5.4.0/24")])
    await dev.set(SetRequest(replace_peers=True, peers=(p3,)))
    assert (await proc.get()).peer_configs() == {keys[2]: p3}
