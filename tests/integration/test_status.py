"""``loden status`` on a real node: the agent's /status, etcd, subnet.env and the kernel."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.topology import Topology, TopologyFactory
from tests.integration.agent_support import LODEN, AgentCluster, AgentNode, wait_for_peer_routes

pytestmark = pytest.mark.root


@pytest.fixture
def vxlan_pair(make_topology: TopologyFactory) -> Iterator[AgentCluster]:
    topo: Topology = make_topology(2)
    cluster = AgentCluster(topo, {"Type": "vxlan"})
    try:
        cluster.start_all()
        wait_for_peer_routes(cluster)
        yield cluster
    finally:
        cluster.close()


def status(node: AgentNode, *extra: str) -> subprocess.CompletedProcess[str]:
    return node.host.ns.run(LODEN, "status", *extra, *node.args, check=False, timeout=30)


def status_json(node: AgentNode) -> tuple[int, dict[str, Any]]:
    proc = status(node, "-json")
    return proc.returncode, json.loads(proc.stdout)


def test_status_of_a_healthy_vxlan_node(vxlan_pair: AgentCluster) -> None:
    node, peer = vxlan_pair.nodes
    code = 1
    report: dict[str, Any] = {}
    for _ in range(20):  # the first reconcile after the peer's lease may still run
        code, report = status_json(node)
        if code == 0:
            break
    assert code == 0, json.dumps(report, indent=1)
    agent = report["agent"]["status"]
    assert report["agent"]["up"] and agent["problems"] == [] and agent["ready"]
    assert report["lease"]["subnet"] == str(node.subnet)
    assert report["lease"]["public_ip"] == str(node.host.ip)
    assert report["lease"]["vtep_mac"] == report["kernel"]["device_mac"]
    assert report["lease"]["ttl_seconds"] > 3600
    assert report["store"]["reachable"]
    assert [p["subnet"] for p in report["peers"]] == [str(peer.subnet)]
    kernel = report["kernel"]
    assert kernel["device"] == "flannel.1" and kernel["expected"] == 3
    assert kernel["missing"] == [] and kernel["extra"] == []
    assert {r["chain"] for r in kernel["rules"]} == {"FLANNEL-POSTRTG", "FLANNEL-FWD"}
    assert all(r["ok"] for r in kernel["rules"])
    assert agent["reconcile"]["last_at"] and agent["reconcile"]["errors"] == []
    text = status(node, "-v")
    assert text.returncode == 0
    assert text.stdout.startswith("agent:     up")
    assert "kernel:    in sync (3 entries on flannel.1)" in text.stdout
    assert str(peer.host.ip) in text.stdout  # the -v peer table


def test_status_with_the_agent_down_reports_it_first_and_the_drift(
    vxlan_pair: AgentCluster,
) -> None:
    node, peer = vxlan_pair.nodes
    assert node.proc is not None
    node.proc.stop()
    ns = node.host.ns
    ns.ip("route", "del", str(peer.subnet))
    assert vxlan_pair.network is not None
    stray = f"{vxlan_pair.network.network_address + 250 * 256}/24"
    ns.ip("route", "add", stray, "via", str(peer.host.ip), "proto", "76")
    ns.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    proc = status(node)
    assert proc.returncode == 1
    first = proc.stdout.splitlines()[0]
    assert first.startswith("agent:     DOWN"), proc.stdout
    assert "1 MISSING, 1 EXTRA" in proc.stdout
    assert f"missing  route {peer.subnet} via {peer.subnet.network_address} dev flannel.1" in (
        proc.stdout
    )
    assert f"extra    route {stray} via {peer.host.ip} dev eth0 proto loden" in proc.stdout
    assert "FLANNEL-POSTRTG (nat): 6 RULE(S) MISSING" in proc.stdout
    # Still answers from etcd and subnet.env while the agent is down.
    assert f"subnet:    {node.subnet.network_address + 1}/" in proc.stdout
    assert "store:     reachable" in proc.stdout
