"""Live migration (docs/migrate.md): a node left as Go flanneld leaves it is taken over by
Loden, then handed back, while pods ping each other and a TCP connection stays open.

Node B runs Loden throughout (the rest of the cluster: peers change nothing). Node A
carries Go flanneld's footprint (tests/integration/goflannel.py). The switch is Go
stopped, Loden started; the way back is Loden stopped (SIGTERM), its state left for Go.
Lost pings are counted by sequence number (ping every 20 ms both ways) and printed;
vxlan and host-gw must lose none. udp cannot: flannel0 is a single-queue TUN owned by
the running agent and vanishes with it (spec §8.6), so there the gap is measured and
bounded. Go flanneld itself cannot run here: for udp the departing "Go" agent is a
Loden udp agent, which speaks Go's wire format and leaves Go's kind of state.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.chaos.support import ContinuousPing
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.topology import (
    Host,
    Namespace,
    Process,
    Topology,
    TopologyError,
    TopologyFactory,
    subnet_from_env,
    wait_until,
)
from tests.integration.agent_support import FLANNELD, LODEN
from tests.integration.goflannel import (
    GO_TTL,
    GoNode,
    chain_lines,
    go_chains,
    go_lease_value,
    go_start_ready,
    go_subnet_env,
    install_go_chains,
    link_mac_index,
    normalise,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "/coreos.com/network"
MTU = {"vxlan": 1450, "host-gw": 1500, "udp": 1472}
#: udp: the TUN goes with the old process; Loden is ready ~0.4-0.5 s after (spec §8.6).
UDP_MAX_LOST_SECONDS = 3.0
PING_INTERVAL = 0.02

TCP_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5555)); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(30)
while (d := c.recv(65536)):
    c.sendall(d)
"""

TCP_CLIENT = """
import os, socket, sys, time
stop, deadline, n = sys.argv[2], time.monotonic() + 90, 0
c = socket.create_connection((sys.argv[1], 5555), timeout=30)
while not os.path.exists(stop) and time.monotonic() < deadline:
    c.sendall(b"x" * 100)
    got = b""
    while len(got) < 100:
        chunk = c.recv(100 - len(got))
        if not chunk:
            print("closed after", n); sys.exit(1)
        got += chunk
    n += 1
    time.sleep(0.02)
print("ok", n)
"""


@dataclass
class Flows:
    """Pings both ways and one TCP connection between a pod on A and a pod on B."""

    forward: ContinuousPing
    backward: ContinuousPing
    client: Process
    stop_file: Path

    def stop(self) -> tuple[int, int, str]:
        self.stop_file.touch()
        lost_fw, lost_bw = self.forward.stop().lost, self.backward.stop().lost
        try:
            self.client.wait(5)
        except TopologyError:  # blocked in recv: no data path (udp after its agent left)
            self.client.stop()
            return lost_fw, lost_bw, "stalled"
        return lost_fw, lost_bw, self.client.output().strip()


class Migration:
    def __init__(self, topo: Topology, backend: str) -> None:
        self.topo, self.backend = topo, backend
        assert topo.underlay_address is not None
        self.etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
        self.etcd.start()
        self.network = IPv4Network(f"10.{random.randint(1, 99)}.0.0/16")
        config = json.dumps({"Network": str(self.network), "Backend": {"Type": backend}})
        self.etcdctl("put", f"{PREFIX}/config", config)
        self.a, self.b = topo.hosts
        self.procs: list[Process] = []

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.etcd.close()

    def etcdctl(self, *args: str) -> str:
        return self.topo.underlay.run(
            "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={self.etcd.client_url}", *args
        ).stdout

    def dir(self, host: Host) -> Path:
        path = host.ns.workdir / "node"
        path.mkdir(exist_ok=True)
        return path

    def agent(self, host: Host) -> Process:
        d = self.dir(host)
        proc = host.ns.spawn(
            FLANNELD,
            f"--etcd-endpoints={self.etcd.client_url}",
            f"--subnet-file={d / 'subnet.env'}",
            f"--state-dir={d / 'state'}",
            "--ip-masq",
            "--iptables-resync=1",
            "--resync-period=1",
            f"--healthz-ip={host.ip}",
            "--healthz-port=8471",
        )
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: Process, since: int = 0) -> None:
        ok = wait_until(lambda: "flanneld is ready" in proc.output()[since:], timeout=30)
        assert ok, proc.output()[-3000:]

    def lease_value(self, subnet: IPv4Network) -> str:
        key = f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"
        return self.etcdctl("get", "--print-value-only", key).strip()

    # -- Go flanneld's footprint on A ------------------------------------------------

    def go_node(self, peer_subnet: IPv4Network, peer_mac: str | None) -> GoNode:
        ns, a, b = self.a.ns, self.a, self.b
        subnet = IPv4Network(f"{self.network.network_address + 77 * 256}/24")
        mac = None
        if self.backend == "vxlan":
            ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", str(a.ip),
                  "dev", "eth0", "dstport", "8472", "nolearning")  # fmt: skip
            ns.ip("link", "set", "flannel.1", "mtu", str(MTU["vxlan"]))
            ns.ip("addr", "add", f"{subnet.network_address}/32", "dev", "flannel.1")
            ns.ip("link", "set", "flannel.1", "up")
            gw = str(peer_subnet.network_address)
            assert peer_mac is not None
            ns.ip("neigh", "replace", gw, "lladdr", peer_mac, "dev", "flannel.1", "nud",
                  "permanent")  # fmt: skip
            ns.run("bridge", "fdb", "replace", peer_mac, "dev", "flannel.1", "dst", str(b.ip),
                   "self", "permanent")  # fmt: skip
            ns.ip("route", "add", str(peer_subnet), "via", gw, "dev", "flannel.1", "onlink")
            mac, _ = link_mac_index(ns, "flannel.1")
        elif self.backend == "host-gw":
            ns.ip("route", "add", str(peer_subnet), "via", str(b.ip), "dev", "eth0")
        value = go_lease_value(a.ip, self.backend, mac)
        grant = self.etcdctl("lease", "grant", str(GO_TTL))
        key = f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"
        self.etcdctl("put", f"--lease={grant.split()[1]}", key, value)
        subnet_env = self.dir(a) / "subnet.env"
        subnet_env.write_text(go_subnet_env(self.network, subnet, MTU[self.backend]))
        install_go_chains(ns, self.network, subnet)
        node = GoNode(subnet=subnet, public_ip=a.ip, lease_value=value, mac=mac)
        if mac is not None:
            node.ifindex = link_mac_index(ns, "flannel.1")[1]
        return node

    def flows(self, dst_pod: Namespace, dst_ip: str, src_pod: Namespace, src_ip: str) -> Flows:
        work = self.topo.workdir
        stop_file = work / f"stop-{random.randint(0, 10**9)}"
        server = dst_pod.spawn("python3", "-c", TCP_SERVER)
        self.procs.append(server)
        time.sleep(0.3)
        client = src_pod.spawn("python3", "-c", TCP_CLIENT, dst_ip, str(stop_file))
        self.procs.append(client)
        return Flows(
            ContinuousPing(src_pod, dst_ip, PING_INTERVAL),  # type: ignore[arg-type]
            ContinuousPing(dst_pod, src_ip, PING_INTERVAL),  # type: ignore[arg-type]
            client,
            stop_file,
        )


@pytest.fixture
def migration(
    make_topology: TopologyFactory, request: pytest.FixtureRequest
) -> Iterator[Migration]:
    m = Migration(make_topology(2), request.param)
    try:
        yield m
    finally:
        m.close()


def route_of(ns: Namespace, subnet: IPv4Network) -> str:
    return ns.ip("route", "show", str(subnet)).stdout.strip()


@pytest.mark.parametrize("migration", ["vxlan", "host-gw", "udp"], indirect=True)
def test_go_flanneld_to_loden_and_back(migration: Migration) -> None:
    m, backend = migration, migration.backend
    a, b = m.a, m.b
    # The rest of the cluster: node B runs Loden.
    b_agent = m.agent(b)
    m.wait_ready(b_agent)
    b_subnet = subnet_from_env(m.dir(b) / "subnet.env")
    b_mac = json.loads(m.lease_value(b_subnet)).get("BackendData", {}).get("VtepMAC")
    # Node A as Go flanneld left it (udp: a running agent stands in for Go's proxy).
    go = m.go_node(b_subnet, b_mac)
    old: Process | None = None
    if backend == "udp":
        old = m.agent(a)
        m.wait_ready(old)
    pod_a = m.topo.add_pod(a, go.subnet, mtu=MTU[backend])
    pod_b = m.topo.add_pod(b, b_subnet, mtu=MTU[backend])
    works = wait_until(lambda: pod_b.ns.ping(pod_a.ip), timeout=20)
    assert works, "Go's state does not carry traffic"

    # -- Go -> Loden ------------------------------------------------------------------
    flows = m.flows(pod_a.ns, str(pod_a.ip), pod_b.ns, str(pod_b.ip))
    time.sleep(1.0)
    if old is not None:
        old.stop()
    started = time.monotonic()
    loden = m.agent(a)
    m.wait_ready(loden)
    ready = time.monotonic() - started
    time.sleep(3.0)  # several reconciles and rule resyncs
    lost_fw, lost_bw, tcp = flows.stop()
    every = f"every {PING_INTERVAL * 1000:.0f} ms"
    print(f"\nmigrate {backend} Go->Loden: lost {lost_fw}/{lost_bw} pings (B->A/A->B, {every}),"
          f" ready after {ready:.2f}s, tcp {tcp}")  # fmt: skip
    if backend == "udp":
        assert max(lost_fw, lost_bw) * PING_INTERVAL <= UDP_MAX_LOST_SECONDS
    else:
        assert (lost_fw, lost_bw) == (0, 0)
        assert tcp.startswith("ok "), tcp
    # Kept: the subnet, the lease, the device and its MAC, the rules.
    assert subnet_from_env(m.dir(a) / "subnet.env") == go.subnet
    assert m.lease_value(go.subnet) == go.lease_value
    if backend == "vxlan":
        assert link_mac_index(a.ns, "flannel.1") == (go.mac, go.ifindex)
        assert route_of(a.ns, b_subnet) == (
            f"{b_subnet} via {b_subnet.network_address} dev flannel.1 proto 76 onlink"
        )
    if backend == "host-gw":
        assert route_of(a.ns, b_subnet) == f"{b_subnet} via {b.ip} dev eth0 proto 76"
    assert normalise([line for lines in chain_lines(a.ns).values() for line in lines]) == (
        normalise([line for lines in go_chains(m.network, go.subnet).values() for line in lines])
    )
    status = a.ns.run(LODEN, "status", f"-etcd-endpoints={m.etcd.client_url}",
                      f"-subnet-file={m.dir(a) / 'subnet.env'}", "-ip-masq",
                      f"-healthz-ip={a.ip}", "-healthz-port=8471", check=False)  # fmt: skip
    assert status.returncode == 0, status.stdout

    # -- Loden -> Go: stop Loden, leave what Go needs -------------------------------
    flows = m.flows(pod_a.ns, str(pod_a.ip), pod_b.ns, str(pod_b.ip))
    time.sleep(1.0)
    assert loden.stop() == 0
    time.sleep(2.0)
    lost_fw, lost_bw, tcp = flows.stop()
    if backend == "udp":
        print(f"migrate {backend} Loden stopped (way back): no data path until Go starts")
    else:
        print(f"migrate {backend} Loden stopped (way back): lost {lost_fw}/{lost_bw}, tcp {tcp}")
    assert go_start_ready(a.ns, backend, go, m.network) == []
    assert subnet_from_env(m.dir(a) / "subnet.env") == go.subnet
    assert m.lease_value(go.subnet) == go.lease_value  # Go finds its lease by public IP
    if backend == "udp":
        # The TUN went with Loden: Go creates flannel0 afresh, nothing is in its way.
        assert a.ns.ip("link", "show", "flannel0", check=False).returncode != 0
    else:
        assert (lost_fw, lost_bw) == (0, 0)
        assert tcp.startswith("ok "), tcp
        # Go compares destination, gateway and device only: Loden's routes stay valid.
        assert re.match(rf"{b_subnet} via \S+ dev \S+", route_of(a.ns, b_subnet))
