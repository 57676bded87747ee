"""A real idle agent checks its rules without starting iptables-save (nf_tables
generation id), and still repairs a hand edit within one ``--iptables-resync``."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fixtures.topology import TopologyFactory, wait_until
from tests.integration.agent_support import AgentCluster

pytestmark = pytest.mark.root


@pytest.fixture
def cluster(make_topology: TopologyFactory) -> Iterator[AgentCluster]:
    made = AgentCluster(make_topology(hosts=1), {"Type": "host-gw"}, extra_args=("-v=2",))
    try:
        yield made
    finally:
        made.close()


def test_idle_agent_starts_no_dump_and_still_repairs(cluster: AgentCluster) -> None:
    node = cluster.nodes[0]
    cluster.start(node)
    assert node.proc is not None
    ns = node.host.ns

    def saves() -> int:
        assert node.proc is not None
        return node.proc.output().count("running iptables-nft-save -t ")

    # --iptables-resync=1: settled once both chains were dumped after the install
    assert wait_until(lambda: saves() >= 4, timeout=10)
    before = saves()
    time.sleep(3.5)  # three more resyncs
    assert saves() == before
    assert "rules check: nf_tables generation id (dump only after a change)" in node.proc.output()
    ns.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert wait_until(
        lambda: "MASQUERADE" in ns.out("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"), timeout=5
    )
    assert saves() > before
