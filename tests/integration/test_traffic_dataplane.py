"""Real packets: masquerading seen in conntrack, and forwarding under policy DROP.

Topology (all inside namespaces made here, see tests/fixtures/topology.py)::

    pod 10.244.1.2 --cni0 10.244.1.1-- node (eth0 U.11) --br0-- outside (U.1 and 10.244.2.1)

The outside namespace also plays a peer node owning 10.244.2.0/24 (host-gw style
routes), so the same ping setup shows pod -> outside (NATed to the node address) and
pod -> overlay (not NATed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.traffic import Networks
from loden.traffic.iptables import IptablesManager
from tests.fixtures.topology import Pod, Topology
from tests.fixtures.traffic import require_root_and_tools, runner_in

pytestmark = pytest.mark.root

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
PEER = IPv4Address("10.244.2.1")
CUR = Networks(N, S)


@pytest.fixture
def lab() -> Iterator[tuple[Topology, Pod]]:
    require_root_and_tools()
    underlay = IPv4Network(f"172.{random.randint(16, 31)}.{random.randint(0, 255)}.0/24")
    topo = Topology(1, underlay=underlay)
    try:
        host = topo.hosts[0]
        pod = topo.add_pod(host, S)
        topo.underlay.ip("addr", "add", f"{PEER}/24", "dev", "br0")
        topo.underlay.ip("route", "add", str(S), "via", str(host.ip))
        yield topo, pod
    finally:
        topo.close()


def icmp_flows(topo: Topology, dst: IPv4Address) -> list[tuple[str, str, str, str]]:
    """(orig src, orig dst, reply src, reply dst) of the node's ICMP conntrack entries."""
    out = topo.hosts[0].ns.out("conntrack", "-L", "-p", "icmp", "-d", str(dst))
    flows = []
    for line in out.splitlines():
        pairs = re.findall(r"src=(\S+) dst=(\S+)", line)
        if len(pairs) >= 2:
            flows.append((*pairs[0], *pairs[1]))
    return flows


async def test_masquerade_to_outside_but_not_within_overlay(lab: tuple[Topology, Pod]) -> None:
    topo, pod = lab
    host = topo.hosts[0]
    outside = topo.underlay_address
    assert outside is not None
    mgr = IptablesManager(runner_in(host.ns))
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)

    assert pod.ns.ping(outside.ip)
    ((osrc, odst, rsrc, rdst),) = icmp_flows(topo, outside.ip)
    assert (osrc, odst) == (str(pod.ip), str(outside.ip))
    assert (rsrc, rdst) == (str(outside.ip), str(host.ip))  # source NATed to the node

    assert pod.ns.ping(PEER)
    ((osrc, odst, rsrc, rdst),) = icmp_flows(topo, PEER)
    assert (osrc, odst) == (str(pod.ip), str(PEER))
    assert (rsrc, rdst) == (str(PEER), str(pod.ip))  # pod -> overlay keeps the pod address


async def test_forward_policy_drop_like_docker(lab: tuple[Topology, Pod]) -> None:
    """Docker >= 1.13: FORWARD policy DROP and its chains inserted at the top (returning
    for non-Docker traffic). The appended FLANNEL-FWD jump is still reached."""
    topo, pod = lab
    ns = topo.hosts[0].ns
    for chain in ("DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"):
        ns.run("iptables", "-N", chain)
        ns.run("iptables", "-A", chain, "-j", "RETURN")
    ns.run("iptables", "-I", "FORWARD", "1", "-j", "DOCKER-USER")
    ns.run("iptables", "-I", "FORWARD", "2", "-j", "DOCKER-ISOLATION-STAGE-1")
    ns.run("iptables", "-P", "FORWARD", "DROP")
    assert not pod.ns.ping(PEER, wait=0.5)

    mgr = IptablesManager(runner_in(ns))
    assert await mgr.ensure_forward_rules(CUR) is True
    assert pod.ns.ping(PEER)
    assert ns.out("iptables", "-S", "FORWARD").splitlines() == [
        "-P FORWARD DROP",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    ]
    # Loden never changes the policy (flannel's log line notwithstanding, §11 item 16)
    assert await mgr.ensure_forward_rules(CUR) is False
    assert ns.out("iptables", "-S", "FORWARD").startswith("-P FORWARD DROP\n")
