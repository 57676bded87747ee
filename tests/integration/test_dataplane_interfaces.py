"""Interface selection against a real namespace: each flag form, read from the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from loden.errors import InterfaceError
from loden.kernel.interfaces import InterfaceOptions, select
from loden.kernel.netlink import Netlink
from tests.fixtures.topology import TopologyFactory

pytestmark = pytest.mark.root


async def test_selection_flag_forms(make_topology: TopologyFactory) -> None:
    topo = make_topology(1)
    host = topo.hosts[0]
    ns = host.ns
    # A second NIC, as on a Vagrant box: eth1 with 172.31.250.11/24 (and a peer end up).
    ns.ip("link", "add", "eth1", "mtu", "9000", "type", "veth", "peer", "name", "eth1p")
    ns.ip("addr", "add", "172.31.250.11/24", "dev", "eth1")
    ns.ip("link", "set", "eth1", "up")
    ns.ip("link", "set", "eth1p", "up")
    nl = await Netlink.open(host.name)
    try:
        sel = await select(nl, InterfaceOptions())
        assert (sel.ext.name, sel.ext.iface_addr) == ("eth0", host.ip)
        assert sel.reason == f"chose eth0 ({host.ip}): default route interface"

        sel = await select(nl, InterfaceOptions(ifaces=("eth1",)))
        assert (sel.ext.name, sel.ext.mtu) == ("eth1", 9000)
        assert sel.ext.iface_addr == IPv4Address("172.31.250.11")

        sel = await select(nl, InterfaceOptions(ifaces=("172.31.250.11",)))
        assert sel.ext.name == "eth1"

        sel = await select(nl, InterfaceOptions(regexes=(r"^172\.31\.250\.",)))
        assert sel.ext.name == "eth1"
        sel = await select(nl, InterfaceOptions(regexes=("^eth1$",)))
        assert sel.ext.name == "eth1"

        sel = await select(nl, InterfaceOptions(can_reach=IPv4Address("172.31.250.77")))
        assert (sel.ext.name, sel.ext.iface_addr) == ("eth1", IPv4Address("172.31.250.11"))
        sel = await select(nl, InterfaceOptions(can_reach=IPv4Address("198.51.100.1")))
        assert sel.ext.name == "eth0"  # via the default route

        sel = await select(nl, InterfaceOptions(public_ip=IPv4Address("172.31.250.11")))
        assert sel.ext.name == "eth1" and sel.ext.ext_addr == IPv4Address("172.31.250.11")

        with pytest.raises(InterfaceError) as err:
            await select(nl, InterfaceOptions(ifaces=("eth7",), regexes=("^nope$",)))
        assert f"eth0:[{host.ip}" in str(err.value) and "eth1:[172.31.250.11" in str(err.value)
    finally:
        await nl.aclose()
