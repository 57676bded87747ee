"""Issue 12 end to end: dual-stack and IPv6-only with real agents, real etcd, real kernel.

Every mesh checks ping and ping6 between pods in both directions and from every node to
every pod.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from loden.traffic import iptables_rules, nftables
from tests.fixtures.topology import TopologyFactory, wait_until
from tests.integration.agent_support import AgentCluster, AgentNode
from tests.integration.ipv6_support import (
    DualCluster,
    etcd_leases,
    etcdctl,
    subnet6_from_env,
)
from tests.integration.test_agent_wireguard import WgAgentCluster
from tests.integration.wireguard_support import wg_show

pytestmark = pytest.mark.root

Factory = Callable[..., DualCluster]


@pytest.fixture
def dual_cluster(make_topology: TopologyFactory) -> Iterator[Factory]:
    made: list[AgentCluster] = []

    def factory(
        backend: dict[str, object],
        *,
        ipv4: bool = True,
        wireguard: bool = False,
        nftables: bool = False,
        hosts: int = 3,
        extra_args: tuple[str, ...] = (),
        api: str = "v3",
    ) -> DualCluster:
        topo = make_topology(hosts=hosts)
        kind = WgAgentCluster if wireguard else AgentCluster
        cluster = kind(topo, backend, extra_args=extra_args, api=api)
        made.append(cluster)
        return DualCluster(cluster, ipv4=ipv4, backend=backend, nftables=nftables)

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()


def routes6(node: AgentNode) -> str:
    return node.host.ns.ip("-6", "route", "show").stdout


BACKENDS: dict[str, dict[str, object]] = {
    "vxlan": {"Type": "vxlan"},
    "vxlan-directrouting": {"Type": "vxlan", "DirectRouting": True},
    "host-gw": {"Type": "host-gw"},
    "wireguard": {"Type": "wireguard"},
    # One device, one peer per node, both subnets as AllowedIPs; the endpoint family by Mode.
    "wireguard-ipv6": {"Type": "wireguard", "Mode": "ipv6"},
    "wireguard-ipv4": {"Type": "wireguard", "Mode": "ipv4"},
    "wireguard-auto": {"Type": "wireguard", "Mode": "auto"},
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_dual_stack_mesh(dual_cluster: Factory, name: str) -> None:
    dual = dual_cluster(BACKENDS[name], wireguard=name.startswith("wireguard"))
    dual.cluster.start_all()
    for node in dual.nodes:
        text = node.subnet_file.read_text()
        assert re.fullmatch(
            r"FLANNEL_NETWORK=\S+\nFLANNEL_SUBNET=\S+\nFLANNEL_IPV6_NETWORK=" + str(dual.net6)
            + r"\nFLANNEL_IPV6_SUBNET=\S+::1/64\nFLANNEL_MTU=\d+\nFLANNEL_IPMASQ=true\n",
            text,
        ), text  # fmt: skip
    leases = etcd_leases(dual.cluster)
    assert len(leases) == 3 and all("&" in key for key in leases), leases
    dual.add_pods()
    assert dual.failures() == []
    if name.startswith("vxlan"):
        for node in dual.nodes:
            link = node.host.ns.ip("-d", "link", "show", "flannel-v6.1").stdout
            assert f"local {dual.host_v6[node.host.name]}" in link
            addr = node.host.ns.ip("-6", "addr", "show", "dev", "flannel-v6.1").stdout
            assert f"{subnet6_from_env(node.subnet_file).network_address}/128" in addr
    if name in ("vxlan", "host-gw"):
        for node in dual.nodes:
            table = routes6(node)
            for other in dual.nodes:
                if other is node:
                    continue
                peer6 = subnet6_from_env(other.subnet_file)
                if name == "vxlan":
                    want = f"{peer6} via {peer6.network_address} dev flannel-v6.1 proto 76"
                else:
                    want = f"{peer6} via {dual.host_v6[other.host.name]} dev eth0 proto 76"
                assert want in table, table
    if name in ("wireguard", "wireguard-ipv6", "wireguard-ipv4"):
        cluster = dual.cluster
        assert isinstance(cluster, WgAgentCluster)
        node = dual.nodes[0]
        v6_endpoints = name in ("wireguard-ipv6",)
        devices = ["flannel-wg", "flannel-wg-v6"] if name == "wireguard" else ["flannel-wg"]
        for device in devices:
            assert node.proc is not None
            peers = wg_show(None, device, pid=node.proc.pid)
            assert len(peers) == 2, (device, peers)
            for peer in peers.values():
                v6_here = v6_endpoints or device.endswith("-v6")
                assert peer.endpoint.startswith("[") is v6_here, (device, peer.endpoint)


@pytest.mark.parametrize("name", ["vxlan", "host-gw", "wireguard"])
def test_ipv6_only(dual_cluster: Factory, name: str) -> None:
    dual = dual_cluster(BACKENDS[name], ipv4=False, wireguard=name.startswith("wireguard"))
    dual.cluster.start_all()
    for node in dual.nodes:
        text = node.subnet_file.read_text()
        assert text.startswith(f"FLANNEL_IPV6_NETWORK={dual.net6}\nFLANNEL_IPV6_SUBNET="), text
        assert "FLANNEL_SUBNET" not in text
        assert node.host.ns.ip("link", "show", "flannel.1", check=False).returncode != 0
    leases = etcd_leases(dual.cluster)
    # Three nodes, three leases: flannel gave every IPv6-only node the first one (§3.4).
    assert len(leases) == 3 and all(k.startswith("0.0.0.0-0&") for k in leases), leases
    for value in leases.values():
        attrs = json.loads(value)
        assert attrs["PublicIP"] == "0.0.0.0" and "BackendData" not in attrs
        assert attrs["PublicIPv6"] in {str(ip) for ip in dual.host_v6.values()}
        if name == "vxlan":
            assert attrs["BackendV6Data"]["VNI"] == 1
    dual.add_pods(ipv4=False)
    assert dual.failures() == []


def _vxlan_state(node: AgentNode) -> tuple[str, str, str, str]:
    ns = node.host.ns
    mac4 = ns.ip("link", "show", "flannel.1").stdout.split("link/ether ")[1].split()[0]
    mac6 = ns.ip("link", "show", "flannel-v6.1").stdout.split("link/ether ")[1].split()[0]
    text = node.subnet_file.read_text()
    sub4 = re.search(r"FLANNEL_SUBNET=(\S+)", text)
    sub6 = re.search(r"FLANNEL_IPV6_SUBNET=(\S+)", text)
    assert sub4 is not None and sub6 is not None
    return sub4.group(1), sub6.group(1), mac4, mac6


def test_vxlan_dual_stack_repairs_and_lifecycle(dual_cluster: Factory) -> None:
    dual = dual_cluster({"Type": "vxlan"})
    cluster = dual.cluster
    cluster.start_all()
    dual.add_pods()
    assert dual.failures() == []
    a, b, c = dual.nodes

    # kill -9 and restart: same subnets, same MACs on both devices, traffic keeps flowing.
    before = _vxlan_state(a)
    assert a.proc is not None
    a.proc.signal(signal.SIGKILL)
    a.proc.wait()
    cluster.start(a)
    assert _vxlan_state(a) == before
    assert dual.failures() == []

    # A deleted IPv6 route comes back within one resync (--resync-period=1).
    peer6 = subnet6_from_env(b.subnet_file)
    a.host.ns.ip("-6", "route", "del", str(peer6))
    # One resync is 1 s; the margin is for a loaded machine (2 CPUs shared by many runs).
    assert wait_until(lambda: str(peer6) in routes6(a), timeout=10.0), routes6(a)

    # A malformed BackendV6Data: that peer's IPv6 side is skipped (one warning), IPv4 works.
    c_key = next(k for k in etcd_leases(cluster) if k.startswith(str(c.subnet.network_address)))
    value = json.loads(etcd_leases(cluster)[c_key])
    value["BackendV6Data"] = {"VNI": 1, "VtepMAC": "not-a-mac"}
    lease_id = etcdctl(cluster, "get", f"/coreos.com/network/subnets/{c_key}", "-w", "json")
    lease_hex = format(json.loads(lease_id)["kvs"][0]["lease"], "x")
    etcdctl(
        cluster, "put", f"--lease={lease_hex}", f"/coreos.com/network/subnets/{c_key}",
        json.dumps(value, separators=(",", ":")),
    )  # fmt: skip
    c6 = subnet6_from_env(c.subnet_file)
    assert wait_until(lambda: str(c6) not in routes6(a), timeout=20.0), routes6(a)
    assert wait_until(lambda: a.host.ns.ping(str(c.pods[0].ip), wait=1.0), timeout=10.0)
    time.sleep(2.5)  # a few resyncs: still one warning
    assert a.proc is not None
    warnings = [line for line in a.proc.output().splitlines() if "not-a-mac" in line]
    assert len(warnings) == 1, warnings

    # A peer's IPv6 lease removed: its v6 entries go, its v4 entries stay.
    b6 = subnet6_from_env(b.subnet_file)
    b_key = next(k for k in etcd_leases(cluster) if k.startswith(str(b.subnet.network_address)))
    assert b.proc is not None
    b.proc.signal(signal.SIGKILL)
    b.proc.wait()
    v4_key = b_key.split("&")[0]
    v4_value = json.loads(etcd_leases(cluster)[b_key])
    v4_value.pop("BackendV6Data")
    v4_value["PublicIPv6"] = None
    etcdctl(cluster, "del", f"/coreos.com/network/subnets/{b_key}")
    etcdctl(
        cluster, "put", f"/coreos.com/network/subnets/{v4_key}",
        json.dumps(v4_value, separators=(",", ":")),
    )  # fmt: skip
    ns = a.host.ns

    def v6_gone() -> bool:
        neigh = ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").stdout
        fdb = ns.run("bridge", "fdb", "show", "dev", "flannel-v6.1").stdout
        return (
            str(b6) not in routes6(a)
            and str(b6.network_address) not in neigh
            and (
                dual.host_v6[b.host.name].exploded not in fdb
                and str(dual.host_v6[b.host.name]) not in fdb
            )
        )

    assert wait_until(v6_gone, timeout=20.0), (routes6(a), ns.ip("-6", "neigh").stdout)
    assert (
        f"{b.subnet} via {b.subnet.network_address} dev flannel.1" in ns.ip("route", "show").stdout
    )


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_dual_stack_rules_equal_flannels(dual_cluster: Factory, mode: str) -> None:
    """ip6tables / nft ip6 masquerade and forward rules of a running agent, against the
    goldens, and resynced like IPv4 (iptables mode; flannel has no nft resync)."""
    dual = dual_cluster({"Type": "vxlan"}, hosts=1, nftables=mode == "nftables")
    node = dual.nodes[0]
    dual.cluster.start(node)
    ns = node.host.ns
    net6, sub6 = dual.net6, subnet6_from_env(node.subnet_file)
    if mode == "iptables":

        def listed(table: str) -> list[str]:
            lines = ns.out("ip6tables", "-t", table, "-S").splitlines()
            return [line for line in lines if "flanneld" in line or line.startswith("-N FLANNEL")]

        masq = iptables_rules.masq_chain(net6, sub6, random_fully=True).golden_lines()
        fwd = iptables_rules.forward_chain(net6).golden_lines()
        assert listed("nat") == masq
        assert listed("filter") == fwd
        ns.run("ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        assert wait_until(lambda: listed("nat") == masq, timeout=5.0), listed("nat")
    else:
        chain = ns.out("nft", "list", "chain", "ip6", "flannel-ipv6", "postrtg")
        assert chain == nftables.masq_chain(net6, sub6, random_fully=True).listing()
        fwd_chain = ns.out("nft", "list", "chain", "ip6", "flannel-ipv6", "forward")
        assert fwd_chain == nftables.forward_chain(net6).listing()


def test_blackhole_routes_for_both_families(dual_cluster: Factory) -> None:
    dual = dual_cluster({"Type": "host-gw"}, hosts=1, extra_args=("--ip-blackhole-route",))
    node = dual.nodes[0]
    dual.cluster.start(node)
    ns = node.host.ns
    sub6 = subnet6_from_env(node.subnet_file)

    def present() -> bool:
        v4 = ns.ip("-4", "route", "show", "type", "blackhole").stdout
        v6 = ns.ip("-6", "route", "show", "type", "blackhole").stdout
        return str(node.subnet) in v4 and str(sub6) in v6

    assert wait_until(present, timeout=8.0)
    ns.ip("-6", "route", "del", "blackhole", str(sub6))
    assert wait_until(present, timeout=5.0)  # back within a resync (--iptables-resync=1)


def test_dual_stack_over_etcd_v2(dual_cluster: Factory) -> None:
    """The v2 keys API (flannel <= v0.17): dual-stack keys and the v2-era lease values."""
    dual = dual_cluster({"Type": "vxlan"}, api="v2")
    dual.cluster.start_all()
    out = dual.cluster.etcdctl2("ls", "/coreos.com/network/subnets")
    keys = [line.rsplit("/", 1)[1] for line in out.split()]
    assert len(keys) == 3 and all("&" in k for k in keys), out
    value = json.loads(dual.cluster.etcdctl2("get", f"/coreos.com/network/subnets/{keys[0]}"))
    assert value["PublicIPv6"] and value["BackendV6Data"]["VNI"] == 1
    dual.add_pods()
    assert dual.failures() == []
