"""The notification socket's kernel filter and the filtered dump (issue 14).

Own writes are echoed by the kernel to every listener; the monitor's socket filter drops
the echoes of routes and neighbours (the sockets that wrote them) inside the kernel, while
everybody else's changes, and every deletion of our entries by somebody else, still
arrive. The filtered dump leaves out the entries a no-change resync expects.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.kernel.netlink import (
    Change,
    Entry,
    EntryChange,
    FdbEntry,
    KernelMonitor,
    Neighbour,
    Netlink,
    Route,
)
from loden.kernel.rtnl import echo_filter


@pytest.fixture
def netns() -> Iterator[tuple[str, int]]:
    """A namespace with an underlay veth and a vxlan device: (name, vxlan ifindex)."""
    name = f"ldef{os.urandom(3).hex()}"

    def ip(*args: str) -> str:
        return subprocess.run(
            ["ip", "-n", name, *args], check=True, capture_output=True, text=True, timeout=20
        ).stdout

    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ip("link", "set", "eth0", "up")
        ip("addr", "add", "172.20.0.1/16", "dev", "eth0")
        ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "nolearning")
        ip("link", "set", "flannel.1", "up")
        yield name, int(ip("-o", "link", "show", "flannel.1").split(":")[0])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


def peer_entries(index: int, n: int) -> list[Entry]:
    subnet = IPv4Network(f"10.9.{n}.0/24")
    mac = f"02:00:00:00:09:{n:02x}"
    return [
        Neighbour(index, subnet.network_address, mac),
        FdbEntry(index, mac, IPv4Address(f"172.20.9.{n}")),
        Route(subnet, gateway=subnet.network_address, oif=index, onlink=True),
    ]


async def drain(monitor: KernelMonitor, seconds: float) -> list[EntryChange]:
    """Every entry notification that arrives within ``seconds``."""
    seen: list[EntryChange] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                seen += [c for c in await monitor.read() if isinstance(c, EntryChange)]
    except TimeoutError:
        return seen


def test_filter_program_shape() -> None:
    """One load, one compare per port id, the protocol test, the FDB test, accept, drop."""
    program = echo_filter([7, 9], 76)
    assert len(program) == 8 * (1 + 2 + 4 + 6 + 2)
    assert len(echo_filter([], None)) == 8 * (1 + 6 + 2)


async def test_own_echoes_are_dropped_in_the_kernel_others_arrive(
    netns: tuple[str, int],
) -> None:
    name, index = netns
    nl = await Netlink.open(name)
    try:
        monitor = await nl.monitor()
        try:
            entries = [e for n in range(1, 11) for e in peer_entries(index, n)]
            await nl.apply([Change(e) for e in entries])
            echoes = await drain(monitor, 0.5)
            # FDB notifications carry no sender port id; permanent ones written are
            # dropped all the same (only their deletion can be drift worth repairing).
            assert echoes == []
            fdb = next(e for e in entries if isinstance(e, FdbEntry))
            subprocess.run(
                ["bridge", "-n", name, "fdb", "del", fdb.lladdr, "dev", "flannel.1",
                 "dst", str(fdb.dst)],
                check=True,
            )  # fmt: skip
            deleted = await drain(monitor, 0.5)
            assert [
                (c.entry.lladdr, c.deleted) for c in deleted if isinstance(c.entry, FdbEntry)
            ] == [(fdb.lladdr, True)]
            # Somebody else deletes one of our routes and adds a route of its own.
            ours = entries[2]
            assert isinstance(ours, Route)
            subprocess.run(["ip", "-n", name, "route", "del", str(ours.dst)], check=True)
            subprocess.run(
                ["ip", "-n", name, "route", "add", "10.99.0.0/24", "dev", "eth0"], check=True
            )
            foreign = await drain(monitor, 0.5)
            routes = [(c.entry.dst, c.deleted) for c in foreign if isinstance(c.entry, Route)]
            assert (ours.dst, True) in routes
            assert (IPv4Network("10.99.0.0/24"), False) in routes
        finally:
            monitor.close()
    finally:
        await nl.aclose()


async def test_filtered_dump_leaves_out_what_is_expected(netns: tuple[str, int]) -> None:
    name, index = netns
    nl = await Netlink.open(name)
    try:
        entries = [e for n in range(1, 6) for e in peer_entries(index, n)]
        await nl.apply([Change(e) for e in entries])
        gone = entries[3]  # a neighbour we expect but the kernel lacks
        await nl.delete(gone)
        absent = Route(IPv4Network("10.9.200.0/24"), oif=index)
        expected = {hash(e) for e in [*entries, absent]}
        found: list[Entry] = list(await nl.routes(skip=expected))
        found += await nl.neighbours(index, skip=expected)
        found += await nl.fdb(index, skip=expected)
        # What is left of ``expected`` is what the kernel lacks ...
        assert expected == {hash(gone), hash(absent)}
        # ... and nothing that matched was returned (only the kernel's own routes).
        assert not set(found) & set(entries)
        assert any(isinstance(e, Route) and e.dst == IPv4Network("172.20.0.0/16") for e in found)
    finally:
        await nl.aclose()
