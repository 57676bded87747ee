"""wireguard end to end: three real agents, real etcd, default device names.

The agent passes default ``ctx.settings``, so every node uses flannel's names: ``flannel-wg``,
key file ``/run/flannel/wgkey``. wireguard-go's UAPI socket lives in
``/var/run/wireguard``, shared by all network namespaces on this machine, so each agent
runs with its own /run/wireguard and /run/flannel bind-mounted from the host's work
directory inside its private mount namespace (``ip netns exec`` already gives it one):
exactly what separate machines have. The bind mounts persist across agent restarts,
like a real node's /run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.topology import Topology, TopologyFactory, wait_until
from tests.integration.agent_support import FLANNELD, AgentCluster, AgentNode
from tests.integration.wireguard_support import longest_gap, start_ping, stop_ping, wg_show

pytestmark = pytest.mark.root

DEV = "flannel-wg"
#: Run "$@" with this host's own /run/wireguard and /run/flannel (argv, no quoting).
PRIVATE_RUN = (
    'mkdir -p /run/wireguard /run/flannel "$1/wireguard" "$1/flannel"'
    ' && mount --bind "$1/wireguard" /run/wireguard'
    ' && mount --bind "$1/flannel" /run/flannel'
    ' && shift && exec "$@"'
)


class WgAgentCluster(AgentCluster):
    def start(self, node: AgentNode, *, wait: bool = True) -> None:
        node.subnet_file.unlink(missing_ok=True)
        run = node.dir / "run"
        node.proc = node.host.ns.spawn(
            "sh", "-c", PRIVATE_RUN, "sh", str(run), FLANNELD, *node.args
        )
        if wait:
            self.wait_ready(node)

    def wg(self, node: AgentNode) -> dict[str, tuple[str, str]]:
        assert node.proc is not None
        peers = wg_show(None, DEV, pid=node.proc.pid)
        return {key: (p.endpoint, p.allowed_ips) for key, p in peers.items()}

    def leases(self) -> dict[str, dict[str, object]]:
        """Lease values in etcd by subnet key (``10.5.1.0-24``)."""
        out = self.topo.underlay.out(
            "etcdctl",
            f"--endpoints={self.etcd.client_url}",
            "get",
            "--prefix",
            "/coreos.com/network/subnets/",
        )
        lines = out.splitlines()
        return {
            k.rsplit("/", 1)[1]: json.loads(v) for k, v in zip(lines[::2], lines[1::2], strict=True)
        }


def netns_pids(name: str) -> str:
    """Processes inside netns ``name`` (asked from outside it: ``ip netns exec`` would
    count itself)."""
    argv = ["ip", "netns", "pids", name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.fixture
def wg_cluster(make_topology: TopologyFactory) -> Iterator[Callable[[], WgAgentCluster]]:
    made: list[WgAgentCluster] = []

    def factory() -> WgAgentCluster:
        topo: Topology = make_topology(hosts=3)
        cluster = WgAgentCluster(topo, {"Type": "wireguard"})
        made.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()


def test_agents_full_mesh_restart_and_shutdown(wg_cluster: Callable[[], WgAgentCluster]) -> None:
    cluster = wg_cluster()
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    leases = cluster.leases()
    assert len(leases) == 3
    keys = {}
    for node in cluster.nodes:
        lease = leases[str(node.subnet).replace("/", "-")]
        assert lease["BackendType"] == "wireguard" and lease["PublicIP"] == str(node.host.ip)
        data = lease["BackendData"]
        assert isinstance(data, dict) and list(data) == ["PublicKey", "Port"]
        assert data["Port"] == 51820
        keys[node.host.name] = data["PublicKey"]
        assert "FLANNEL_MTU=1420" in node.subnet_file.read_text()
        routes = node.host.ns.ip("route", "show", str(cluster.network)).stdout
        assert re.search(rf"^{cluster.network} dev {DEV} proto 76 scope link", routes, re.M)
        key_file = node.dir / "run" / "flannel" / "wgkey"
        assert oct(key_file.stat().st_mode & 0o777) == "0o400"
    for node in cluster.nodes:
        want = {
            keys[o.host.name]: (f"{o.host.ip}:51820", str(o.subnet))
            for o in cluster.nodes
            if o is not node
        }
        assert cluster.wg(node) == want
    # Restart node a's agent (SIGTERM: device deleted; start: recreated) while b pings
    # a's pod: the gap covers the whole agent restart, not just the backend.
    a, b = cluster.nodes[0], cluster.nodes[1]
    ping = start_ping(b.pods[0].ns, a.pods[0].ip, interval=0.05, seconds=60)
    try:
        time.sleep(1.0)
        assert a.proc is not None
        down = time.monotonic()
        a.proc.signal(signal.SIGTERM)  # clean exit: the device is deleted
        status = a.proc.wait(20)  # generous: other test runs may load the machine
        assert status == 0, a.proc.output()[-3000:]
        stopped = time.monotonic() - down
        assert a.host.ns.ip("link", "show", DEV, check=False).returncode != 0
        assert netns_pids(a.host.name) == ""
        cluster.start(a)
        ready = time.monotonic() - down
        time.sleep(1.5)
    finally:
        out = stop_ping(ping)
        ended = time.time()
    gap, _ = longest_gap(out, until=ended)
    print(f"\nAGENT RESTART: stop {stopped:.2f}s, ready {ready:.2f}s, b->a gap {gap:.2f}s")
    assert gap < ready + 3.0, out[-2000:]
    data = cluster.leases()[str(a.subnet).replace("/", "-")]["BackendData"]
    assert isinstance(data, dict) and data["PublicKey"] == keys[a.host.name]  # key survived
    assert cluster.mesh_failures() == []
    # kill -9: the parent-death signal takes wireguard-go (and so the device) down too.
    assert a.proc is not None
    a.proc.signal(signal.SIGKILL)
    a.proc.wait(5)
    assert wait_until(
        lambda: a.host.ns.ip("link", "show", DEV, check=False).returncode != 0, timeout=5
    )
    assert wait_until(lambda: netns_pids(a.host.name) == "", timeout=5)


def test_key_file_copied_from_another_node_gets_a_new_key(
    wg_cluster: Callable[[], WgAgentCluster],
) -> None:
    """Issue 10: node b starts with node a's key file (a cloned image, a copied /run):
    b publishes a new key of its own, and every node reaches every other."""
    cluster = wg_cluster()
    a, b, c = cluster.nodes
    cluster.start(a)
    a_key_file = a.dir / "run" / "flannel" / "wgkey"
    b_key_file = b.dir / "run" / "flannel" / "wgkey"
    b_key_file.parent.mkdir(parents=True, exist_ok=True)
    b_key_file.write_bytes(a_key_file.read_bytes())
    cluster.start(b)
    cluster.start(c)
    leases = cluster.leases()
    keys = {}
    for node in cluster.nodes:
        data = leases[str(node.subnet).replace("/", "-")]["BackendData"]
        assert isinstance(data, dict)
        keys[node.host.name] = data["PublicKey"]
    assert len(set(keys.values())) == 3, keys
    assert b_key_file.read_bytes() != a_key_file.read_bytes()
    assert b.proc is not None and "generated a new key" in b.proc.output()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
