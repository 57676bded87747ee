"""Dual-stack (or IPv6-only) agent clusters on a Topology: an IPv6 underlay next to the
IPv4 one (etcd stays on IPv4, like a control plane), IPv6 on every pod.

IPv6 in namespaces: duplicate address detection is off everywhere (a tentative address
cannot be used for a second after it is added) and forwarding is on in the hosts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

from tests.fixtures.topology import Namespace, Pod, Topology, TopologyError
from tests.integration.agent_support import AgentCluster, AgentNode

_NO_DAD = (
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
)


def no_dad(ns: Namespace) -> None:
    for key, value in _NO_DAD:
        ns.sysctl(key, value)


def random_ula() -> IPv6Network:
    """A random /64 underlay inside fd00::/8."""
    return IPv6Network(f"fd{random.randint(0, 255):02x}:{random.randint(0, 0xFFFF):x}::/64")


def random_pod_net6() -> IPv6Network:
    return IPv6Network(f"fd{random.randint(0, 255):02x}:{random.randint(1, 0xFFFF):x}::/56")


def add_v6_underlay(topo: Topology, net: IPv6Network) -> dict[str, IPv6Address]:
    """``net::1`` on the underlay bridge, ``net::(11+i)`` on host i, default v6 routes;
    returns each host's IPv6 address by host name."""
    under = topo.underlay
    no_dad(under)
    gw = IPv6Interface((net.network_address + 1, 64))
    under.ip("-6", "addr", "add", str(gw), "dev", "br0", "nodad")
    out: dict[str, IPv6Address] = {}
    for host in topo.hosts:
        ns = host.ns
        no_dad(ns)
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
        addr = IPv6Interface((net.network_address + 11 + host.index, 64))
        ns.ip("-6", "addr", "add", str(addr), "dev", "eth0", "nodad")
        ns.ip("-6", "route", "add", "default", "via", str(gw.ip), "dev", "eth0")
        out[host.name] = addr.ip
    return out


def subnet6_from_env(path: Path) -> IPv6Network:
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "FLANNEL_IPV6_SUBNET":
            return IPv6Interface(value.strip()).network
    raise TopologyError(f"{path} has no FLANNEL_IPV6_SUBNET line")


@dataclass
class Pod6:
    """A pod's IPv6 side (the pod namespace comes from the IPv4 fixture, or is made here
    for IPv6-only)."""

    ns: Namespace
    ip: IPv6Address


def add_v6_to_pod(node: AgentNode, pod: Pod, index: int) -> Pod6:
    """``<v6 subnet>::1`` on cni0 (once), ``::(2+index)`` on the pod's eth0."""
    net6 = subnet6_from_env(node.subnet_file)
    hns = node.host.ns
    gw = IPv6Interface((net6.network_address + 1, net6.prefixlen))
    have = hns.ip("-6", "addr", "show", "dev", "cni0").stdout
    if str(gw) not in have:
        hns.sysctl("net.ipv6.conf.cni0.accept_dad", "0")
        hns.ip("-6", "addr", "add", str(gw), "dev", "cni0", "nodad")
    no_dad(pod.ns)
    pod.ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
    addr = IPv6Interface((net6.network_address + 2 + index, net6.prefixlen))
    pod.ns.ip("-6", "addr", "add", str(addr), "dev", "eth0", "nodad")
    pod.ns.ip("-6", "route", "add", "default", "via", str(gw.ip))
    return Pod6(pod.ns, addr.ip)


def add_v6_only_pod(topo: Topology, node: AgentNode, index: int, mtu: int) -> Pod6:
    """A pod with IPv6 only: cni0 with just ``<v6 subnet>::1``."""
    net6 = subnet6_from_env(node.subnet_file)
    hns = node.host.ns
    if hns.ip("link", "show", "cni0", check=False).returncode != 0:
        hns.ip("link", "add", "cni0", "mtu", str(mtu), "type", "bridge")
        hns.sysctl("net.ipv6.conf.cni0.accept_dad", "0")
        gw = IPv6Interface((net6.network_address + 1, net6.prefixlen))
        hns.ip("-6", "addr", "add", str(gw), "dev", "cni0", "nodad")
        hns.ip("link", "set", "cni0", "up")
    pod_ns = topo._netns(f"{node.host.name}q{index}")  # the fixture builds (and deletes) it
    port = f"vq{index}"
    hns.ip(
        "link", "add", port, "mtu", str(mtu), "type", "veth",
        "peer", "name", "eth0", "mtu", str(mtu), "netns", pod_ns.name,
    )  # fmt: skip
    hns.ip("link", "set", port, "master", "cni0", "up")
    no_dad(pod_ns)
    pod_ns.ip("link", "set", "lo", "up")
    addr = IPv6Interface((net6.network_address + 2 + index, net6.prefixlen))
    pod_ns.ip("-6", "addr", "add", str(addr), "dev", "eth0", "nodad")
    pod_ns.ip("link", "set", "eth0", "up")
    pod_ns.ip("-6", "route", "add", "default", "via", str(net6.network_address + 1))
    return Pod6(pod_ns, addr.ip)


class DualCluster:
    """An :class:`AgentCluster` whose config enables IPv6 (and optionally disables IPv4)."""

    def __init__(
        self,
        cluster: AgentCluster,
        *,
        ipv4: bool = True,
        backend: dict[str, object],
        nftables: bool = False,
    ) -> None:
        self.cluster = cluster
        self.net6 = random_pod_net6()
        self.underlay6 = random_ula()
        self.host_v6 = add_v6_underlay(cluster.topo, self.underlay6)
        config: dict[str, object] = {
            "EnableIPv6": True,
            "IPv6Network": str(self.net6),
            "Backend": backend,
        }
        if ipv4:
            config["Network"] = str(cluster.network)
        else:
            config["EnableIPv4"] = False
        if nftables:
            config["EnableNFTables"] = True
        self.config_json = json.dumps(config)
        if cluster.api == "v2":
            cluster.etcdctl2("set", "/coreos.com/network/config", self.config_json)
        else:
            cluster.loden("config", "set", self.config_json)
        self.pods4: list[tuple[Namespace, str]] = []
        self.pods6: list[Pod6] = []

    @property
    def nodes(self) -> list[AgentNode]:
        return self.cluster.nodes

    def add_pods(self, *, ipv4: bool = True) -> None:
        """One pod per node, on both families (or IPv6 only)."""
        for node in self.nodes:
            mtu = mtu_of(node)
            if ipv4:
                pod = self.cluster.topo.add_pod(node.host, node.subnet_file, mtu=mtu)
                node.pods.append(pod)
                self.pods4.append((pod.ns, str(pod.ip)))
                self.pods6.append(add_v6_to_pod(node, pod, 0))
            else:
                self.pods6.append(add_v6_only_pod(self.cluster.topo, node, 0, mtu))

    def failures(self, timeout: float = 20.0) -> list[str]:
        """Pod to pod (both ways) and node to pod, ping and ping6; what still fails."""
        pairs: list[tuple[Namespace, str]] = []
        for src, _ in self.pods4:
            pairs += [(src, ip) for ns, ip in self.pods4 if ns is not src]
        for pod in self.pods6:
            pairs += [(pod.ns, str(p.ip)) for p in self.pods6 if p is not pod]
        for node in self.nodes:
            pairs += [(node.host.ns, ip) for _, ip in self.pods4]
            pairs += [(node.host.ns, str(p.ip)) for p in self.pods6]
        failing = pairs
        deadline = time.monotonic() + timeout
        while failing and time.monotonic() < deadline:
            failing = [(ns, ip) for ns, ip in failing if not ns.ping(ip, wait=1.0)]
        return [f"{ns.name} -> {ip}" for ns, ip in failing]


def mtu_of(node: AgentNode) -> int:
    for line in node.subnet_file.read_text().splitlines():
        if line.startswith("FLANNEL_MTU="):
            return int(line.split("=", 1)[1])
    raise TopologyError(f"{node.subnet_file} has no FLANNEL_MTU")


def etcd_leases(cluster: AgentCluster) -> dict[str, str]:
    """Raw lease values by key name (``10.5.1.0-24&fd00::-64``)."""
    out = cluster.topo.underlay.out(
        "etcdctl", f"--endpoints={cluster.etcd.client_url}", "get", "--prefix",
        "/coreos.com/network/subnets/",
    )  # fmt: skip
    lines = out.splitlines()
    return {k.rsplit("/", 1)[1]: v for k, v in zip(lines[::2], lines[1::2], strict=True)}


def etcdctl(cluster: AgentCluster, *args: str) -> str:
    return cluster.topo.underlay.out("etcdctl", f"--endpoints={cluster.etcd.client_url}", *args)
