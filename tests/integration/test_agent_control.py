"""Issue 2 end to end: the agent process against a real etcd (control plane only)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.fixtures.etcd import EtcdServer, make_pki
from tests.fixtures.topology import Namespace, Topology, TopologyFactory, wait_until
from tests.integration.agent_support import FLANNELD, LODEN

pytestmark = pytest.mark.root


class Node:
    """One host namespace with etcd in the underlay; agents started by hand."""

    def __init__(self, topo: Topology, etcd: EtcdServer) -> None:
        self.topo, self.etcd = topo, etcd
        self.host = topo.hosts[0]
        self.ns: Namespace = self.host.ns
        self.dir = self.ns.workdir / "agent"
        self.dir.mkdir(exist_ok=True)

    def loden(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.underlay.run(
            LODEN, *args, f"-etcd-endpoints={self.etcd.client_url}", check=check
        )

    def agent_args(self, name: str = "a", *extra: str) -> list[str]:
        return [
            FLANNELD,
            f"--etcd-endpoints={self.etcd.client_url}",
            f"--subnet-file={self.dir / name / 'subnet.env'}",
            f"--state-dir={self.dir / name / 'state'}",
            "--iptables-forward-rules=false",
            "--resync-period=1",
            *extra,
        ]

    def http(self, path: str) -> tuple[int, str]:
        out = self.ns.run(
            "python3",
            "-c",
            (
                "import sys,urllib.request,urllib.error\n"
                f"try:\n r=urllib.request.urlopen('http://{self.host.ip}:8471{path}',timeout=3)\n"
                " print(r.status);print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n print(e.code);print(e.read().decode())\n"
            ),
            check=False,
        )
        status, _, body = out.stdout.partition("\n")
        return int(status or 0), body.strip()


@pytest.fixture
def node(make_topology: TopologyFactory) -> Iterator[Node]:
    topo = make_topology(hosts=1)
    assert topo.underlay_address is not None
    etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip)).start()
    try:
        yield Node(topo, etcd)
    finally:
        topo.close()
        etcd.close()


def test_waits_for_config_then_notifies_ready_after_subnet_env(node: Node) -> None:
    sock_path = node.dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    try:
        proc = node.ns.spawn(
            *node.agent_args("a", "--healthz-port=8471", f"--healthz-ip={node.host.ip}"),
            env={"NOTIFY_SOCKET": str(sock_path)},
        )
        assert wait_until(lambda: "waiting for the network config" in proc.output(), timeout=10)
        assert wait_until(lambda: node.http("/readyz")[0] == 503, timeout=5)
        assert not (node.dir / "a" / "subnet.env").exists()
        node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
        message = sock.recv(100).decode()
        assert message == "READY=1"
        env = (node.dir / "a" / "subnet.env").read_text()  # written before READY
        assert env.startswith("FLANNEL_NETWORK=10.7.0.0/16\nFLANNEL_SUBNET=10.7.")
        assert node.http("/readyz") == (200, "flanneld is ready")
        assert node.http("/healthz") == (200, "flanneld is running")
        status, metrics = node.http("/metrics")
        assert status == 200 and "loden_lease_ttl_seconds" in metrics
        # The store goes away: /healthz turns 503 and says why; back: 200 again.
        node.etcd.kill()
        assert wait_until(lambda: node.http("/healthz")[0] == 503, timeout=15)
        assert "etcd" in node.http("/healthz")[1]
        node.etcd.restart()
        assert wait_until(lambda: node.http("/healthz")[0] == 200, timeout=10)
        proc.signal(15)
        assert proc.wait(10) == 0
        assert "exiting cleanly" in proc.output()
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("config", "args", "fragment"),
    [
        (
            '{"Network": "10.7.0.0/16", "Backend": {"Type": "bogus"}}',
            (),
            "unknown backend type 'bogus': known types are alloc, aws-vpc, gce, host-gw, udp,"
            " vxlan, wireguard",
        ),
        (
            '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}',
            ("--iface=nosuch0",),
            "nosuch0",
        ),
    ],
)
def test_startup_errors_exit_1_with_the_reason(
    node: Node, config: str, args: tuple[str, ...], fragment: str
) -> None:
    node.loden("config", "set", config)
    proc = node.ns.spawn(*node.agent_args("a", *args))
    assert proc.wait(20) == 1
    assert fragment in proc.output()
    assert not (node.dir / "a" / "subnet.env").exists()


def test_invalid_config_is_refused_by_config_set_and_waited_on_by_the_agent(node: Node) -> None:
    bad = node.loden("config", "set", '{"Network": "10.7.0.0/29"}', check=False)
    assert bad.returncode == 1 and "Minimum useful network prefix is /28" in bad.stderr
    node.topo.underlay.run(
        "etcdctl",
        f"--endpoints={node.etcd.client_url}",
        "put",
        "/coreos.com/network/config",
        '{"Network": "bad"}',
    )
    proc = node.ns.spawn(*node.agent_args("a"))
    assert wait_until(lambda: "invalid IPv4 CIDR format 'bad'" in proc.output(), timeout=10)
    node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
    assert wait_until(lambda: (node.dir / "a" / "subnet.env").exists(), timeout=10)
    # A change while running is noticed and the operator is told what to do.
    node.loden(
        "config", "set", '{"Network": "10.7.0.0/16", "SubnetLen": 26, "Backend": {"Type": "alloc"}}'
    )
    assert wait_until(lambda: "network config in etcd changed" in proc.output(), timeout=10)
    assert proc.running()


def test_short_ttl_renewal_and_own_lease_deleted(node: Node) -> None:
    node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
    proc = node.ns.spawn(*node.agent_args("a", "--subnet-lease-ttl=3"))
    env_path = node.dir / "a" / "subnet.env"
    assert wait_until(env_path.exists, timeout=15)
    first = env_path.read_text()
    leases = json.loads(node.loden("leases", "-json").stdout)
    assert len(leases) == 1
    time.sleep(8)  # > 2 TTLs: without renewal the key would be gone
    after = json.loads(node.loden("leases", "-json").stdout)
    assert [x["key"] for x in after] == [leases[0]["key"]]
    node.loden("leases", f"-delete={leases[0]['key']}")
    assert wait_until(lambda: "re-creating it" in proc.output(), timeout=10)
    assert wait_until(
        lambda: len(json.loads(node.loden("leases", "-json").stdout)) == 1, timeout=10
    )
    assert json.loads(node.loden("leases", "-json").stdout)[0]["key"] == leases[0]["key"]
    assert proc.running() and env_path.read_text() == first


def test_restart_reacquires_the_same_subnet_and_skips_garbage(node: Node) -> None:
    node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
    node.topo.underlay.run(
        "etcdctl",
        f"--endpoints={node.etcd.client_url}",
        "put",
        "/coreos.com/network/subnets/10.7.9.0-24",
        "garbage",
    )
    proc = node.ns.spawn(*node.agent_args("a"))
    env_path = node.dir / "a" / "subnet.env"
    assert wait_until(env_path.exists, timeout=15)
    first = env_path.read_text()
    assert "skipping 10.7.9.0-24" in proc.output()
    proc.signal(9)
    proc.wait(5)
    env_path.unlink()  # even without the subnet file, the lease (by public IP) is reused
    proc = node.ns.spawn(*node.agent_args("a"))
    assert wait_until(env_path.exists, timeout=15)
    assert env_path.read_text() == first


def test_32_agents_started_at_once_get_32_subnets(node: Node) -> None:
    node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
    base = int(node.host.ip) + 100
    procs = []
    for i in range(32):
        ip = (
            f"{(base + i) >> 24 & 255}.{(base + i) >> 16 & 255}.{(base + i) >> 8 & 255}."
            f"{(base + i) & 255}"
        )
        procs.append(node.ns.spawn(*node.agent_args(f"n{i}", "--iface=eth0", f"--public-ip={ip}")))
    paths = [node.dir / f"n{i}" / "subnet.env" for i in range(32)]
    assert wait_until(lambda: all(p.exists() for p in paths), timeout=120)
    subnets = {p.read_text().splitlines()[1] for p in paths}
    assert len(subnets) == 32
    assert all(p.running() for p in procs)
    assert len(json.loads(node.loden("leases", "-json").stdout)) == 32


def test_tls_etcd_with_client_certs(make_topology: TopologyFactory, tmp_path: Path) -> None:
    topo = make_topology(hosts=1)
    assert topo.underlay_address is not None
    uip = str(topo.underlay_address.ip)
    pki = make_pki(tmp_path / "pki", [uip])
    etcd = EtcdServer(netns=topo.underlay.name, host=uip, pki=pki).start()
    try:
        tls = [
            f"-etcd-cafile={pki.ca_cert}",
            f"-etcd-certfile={pki.client_cert}",
            f"-etcd-keyfile={pki.client_key}",
        ]
        ns = topo.hosts[0].ns
        ns.run(
            LODEN,
            "config",
            "set",
            '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}',
            f"-etcd-endpoints={etcd.client_url}",
            *tls,
        )
        work = ns.workdir
        args = [
            FLANNELD,
            f"--etcd-endpoints={etcd.client_url}",
            f"--subnet-file={work / 'subnet.env'}",
            f"--state-dir={work / 'st'}",
            "--iptables-forward-rules=false",
        ]
        bare = ns.spawn(*args, f"-etcd-cafile={pki.ca_cert}")
        # TLS 1.3 reports the refusal as an alert (exit 1) or a dropped connection (kept
        # waiting); either way the log names the missing client certificate.
        assert wait_until(lambda: "client certificate" in bare.output(), timeout=30)
        assert not (work / "subnet.env").exists()
        bare.stop()
        good = ns.spawn(*args, *tls)
        assert wait_until((work / "subnet.env").exists, timeout=15), good.output()
    finally:
        topo.close()
        etcd.close()


def test_blackhole_route_for_own_subnet(node: Node) -> None:
    node.loden("config", "set", '{"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}}')
    node.ns.spawn(*node.agent_args("a", "--ip-blackhole-route", "--iptables-resync=1"))
    env_path = node.dir / "a" / "subnet.env"
    assert wait_until(env_path.exists, timeout=15)
    subnet = str(IPv4Network(env_path.read_text().splitlines()[1].split("=")[1], strict=False))
    assert wait_until(
        lambda: subnet in node.ns.ip("route", "show", "type", "blackhole").stdout, timeout=10
    )
    node.ns.ip("route", "del", "blackhole", subnet)
    assert wait_until(
        lambda: subnet in node.ns.ip("route", "show", "type", "blackhole").stdout, timeout=10
    )


def _leases(node: Node) -> list[str]:
    out = node.topo.underlay.run(
        "etcdctl",
        f"--endpoints={node.etcd.client_url}",
        "get",
        "--prefix",
        "--keys-only",
        "/coreos.com/network/subnets/",
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("config", "env", "hold_udp_port", "fragment"),
    [
        (
            '{"Network": "10.7.0.0/16", "EnableNFTables": true, "Backend": {"Type": "vxlan"}}',
            {"PATH": "/nonexistent"},
            None,
            "nft is not installed",
        ),
        (
            '{"Network": "10.7.0.0/16", "Backend": {"Type": "vxlan"}}',
            {"PATH": "/nonexistent"},
            None,
            "iptables",
        ),
        ('{"Network": "10.7.0.0/16", "Backend": {"Type": "udp"}}', None, "host:8285", "8285"),
        (
            '{"Network": "10.7.0.0/16", "Backend": {"Type": "wireguard"}}',
            None,
            "0.0.0.0:51820",
            "ListenPort",
        ),
    ],
    ids=["nft-missing", "iptables-missing", "udp-port-taken", "wireguard-port-taken"],
)
def test_failed_precondition_leaves_no_device_and_no_lease(
    node: Node, config: str, env: dict[str, str] | None, hold_udp_port: str | None, fragment: str
) -> None:
    """Issue 10 §3: every precondition is checked before the first kernel object or
    lease exists (vxlan creates flannel.1 before its lease, to publish the MAC)."""
    node.loden("config", "set", config)
    if hold_udp_port:
        host, _, port = hold_udp_port.partition(":")
        address = str(node.host.ip) if host == "host" else host
        holder = node.ns.spawn(
            "python3",
            "-c",
            "import socket,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(('{address}',{port}))\nprint('bound',flush=True)\ntime.sleep(60)\n",
        )
        assert wait_until(lambda: "bound" in holder.output(), timeout=10)
    setenv = [f"{k}={v}" for k, v in (env or {}).items()]
    proc = node.ns.spawn(
        "/usr/bin/env", *setenv, *node.agent_args("a", "--iptables-forward-rules=true")
    )
    assert proc.wait(30) == 1, proc.output()
    output = proc.output()
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and fragment in errors[0], output
    assert "Traceback" not in output
    links = node.ns.ip("-o", "link", "show").stdout
    assert "flannel" not in links, links
    assert _leases(node) == []
    assert not (node.dir / "a" / "subnet.env").exists()
