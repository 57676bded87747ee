"""``loden doctor``: each check sees its fault injected on a real node, and a clean
cluster reports nothing. Nodes are network namespaces running real agents against a
real etcd (tests/integration/agent_support.py); doctor runs inside the node's namespace
with the node's own agent flags, as an operator would run it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.etcd import make_pki
from tests.fixtures.topology import Topology, TopologyFactory
from tests.integration.agent_support import LODEN, AgentCluster, AgentNode, wait_for_peer_routes

pytestmark = pytest.mark.root


@pytest.fixture
def vxlan(make_topology: TopologyFactory) -> Iterator[AgentCluster]:
    cluster = AgentCluster(make_topology(2), {"Type": "vxlan"})
    try:
        cluster.start_all()
        wait_for_peer_routes(cluster)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def hostgw(make_topology: TopologyFactory) -> Iterator[AgentCluster]:
    cluster = AgentCluster(make_topology(2), {"Type": "host-gw"})
    try:
        cluster.start_all()
        wait_for_peer_routes(cluster)
        yield cluster
    finally:
        cluster.close()


def doctor(node: AgentNode, *extra: str) -> subprocess.CompletedProcess[str]:
    docker_config = node.dir / "daemon.json"
    return node.host.ns.run(
        LODEN,
        "doctor",
        "-sample-seconds=1",
        f"-docker-config={docker_config}",
        *node.args,
        *extra,
        check=False,
        timeout=60,
    )


def checks(node: AgentNode, *extra: str) -> dict[str, dict[str, str]]:
    proc = doctor(node, "-json", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    found = {f["check"]: f for f in json.loads(proc.stdout)}
    assert proc.returncode == (1 if found else 0)
    return found


def stop(node: AgentNode) -> None:
    assert node.proc is not None
    node.proc.stop()


def etcdctl(cluster: AgentCluster, *args: str) -> str:
    return cluster.topo.underlay.run(
        "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={cluster.etcd.client_url}", *args
    ).stdout


def lease_key(cluster: AgentCluster, node: AgentNode) -> str:
    s = node.subnet
    return f"/coreos.com/network/subnets/{s.network_address}-{s.prefixlen}"


def fake_subnet(cluster: AgentCluster, index: int) -> str:
    return f"{cluster.network.network_address + (200 + index) * 256}-24"


def test_clean_cluster_reports_nothing(vxlan: AgentCluster) -> None:
    for node in vxlan.nodes:
        proc = doctor(node)
        assert proc.returncode == 0, proc.stdout
        assert proc.stdout == "no problems found\n"


def test_clean_hostgw_cluster_reports_nothing(hostgw: AgentCluster) -> None:
    assert checks(hostgw.nodes[0]) == {}


def test_missing_subnet_env_and_why(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    node.subnet_file.unlink()
    found = checks(node)
    finding = found["subnet-env/missing"]
    assert "agent is not answering" in finding["evidence"]
    assert "agent/down" in found
    text = doctor(node).stdout
    assert f"[subnet-env/missing] {node.subnet_file} does not exist" in text
    assert "    evidence: why: the agent is not answering" in text
    assert "    fix:      start the agent" in text


def test_stale_subnet_env_without_lease(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    etcdctl(vxlan, "del", lease_key(vxlan, node))
    found = checks(node)
    assert str(node.subnet) in found["subnet-env/stale-lease"]["what"]


def test_stale_subnet_env_of_another_node(vxlan: AgentCluster) -> None:
    node, other = vxlan.nodes
    stop(node)
    node.subnet_file.write_text(other.subnet_file.read_text())
    found = checks(node)
    assert str(other.host.ip) in found["subnet-env/other-node"]["evidence"]


@pytest.mark.parametrize(
    ("key", "value", "check"),
    [
        ("net.ipv4.ip_forward", "0", "sysctl/ip-forward"),
        ("net.bridge.bridge-nf-call-iptables", "0", "sysctl/br-netfilter"),
        ("net.ipv4.conf.flannel/1.rp_filter", "1", "sysctl/rp-filter"),
    ],
)
def test_sysctls(vxlan: AgentCluster, key: str, value: str, check: str) -> None:
    node = vxlan.nodes[0]
    node.host.ns.sysctl(key, value)
    found = checks(node)
    assert list(found) == [check]
    assert value in found[check]["evidence"]


def test_forward_policy_drop_without_rules(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    ns = node.host.ns
    ns.run("iptables", "-F", "FLANNEL-FWD")
    ns.run("iptables", "-P", "FORWARD", "DROP")
    found = checks(node)
    assert "':FORWARD DROP'" in found["forward/policy-drop"]["evidence"]


def test_pod_mtu_above_the_overlay(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    vxlan.topo.add_pod(node.host, node.subnet_file, mtu=1500)
    (node.dir / "daemon.json").write_text('{"mtu": 1500}')
    found = checks(node)
    evidence = found["mtu/pods"]["evidence"]
    assert "veth0 (on cni0) mtu 1500" in evidence and '"mtu": 1500' in evidence
    assert "FLANNEL_MTU=1450" in evidence


def test_flannel_device_mtu(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    node.host.ns.ip("link", "set", "flannel.1", "mtu", "1400")
    assert "mtu/flannel-device" in checks(node)


BAD_CSUM = """
import socket, struct, sys, time
src, dst, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
payload = b"x" * 64
udp = struct.pack("!HHHH", 40000, 8472, 8 + len(payload), 0x1234) + payload  # wrong sum
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for _ in range(5):
        s.sendto(udp, (dst, 0))
    time.sleep(0.05)
"""


def test_vxlan_checksum_errors_while_traffic_flows(vxlan: AgentCluster) -> None:
    node, peer = vxlan.nodes
    # Both run for the whole doctor run (bounded: 60 s), however slow its start.
    ping = peer.host.ns.spawn(
        "ping", "-q", "-i", "0.05", "-w", "60", str(node.subnet.network_address)
    )
    blaster = peer.host.ns.spawn(
        "python3", "-c", BAD_CSUM, str(peer.host.ip), str(node.host.ip), "60"
    )
    time.sleep(0.5)
    try:
        found = checks(node)
    finally:
        ping.stop()
        blaster.stop()
    finding = found["checksum/vxlan"]
    assert "InCsumErrors +" in finding["evidence"]
    # On: the fix is to turn it off here; off: the fix points at the sending peer.
    assert "tx checksum offload on flannel.1: o" in finding["evidence"]
    assert '"TxChecksumOffload": false' in finding["fix"]


def test_duplicate_public_ip_and_vtep_mac(vxlan: AgentCluster) -> None:
    node, peer = vxlan.nodes
    own = json.loads(etcdctl(vxlan, "get", "--print-value-only", lease_key(vxlan, node)))
    mac = own["BackendData"]["VtepMAC"]
    prefix = "/coreos.com/network/subnets/"
    same_ip = {"PublicIP": str(node.host.ip), "BackendType": "vxlan",
               "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:01"}}  # fmt: skip
    same_mac = {"PublicIP": "192.0.2.77", "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": mac}}  # fmt: skip
    etcdctl(vxlan, "put", prefix + fake_subnet(vxlan, 1), json.dumps(same_ip))
    etcdctl(vxlan, "put", prefix + fake_subnet(vxlan, 2), json.dumps(same_mac))
    found: dict[str, dict[str, str]] = {}
    for _ in range(10):  # the agent notices the twin of its MAC at its next reconcile
        found = checks(node)
        if "agent/unhealthy" in found:
            break
    assert str(node.host.ip) in found["leases/duplicate-ip"]["evidence"]
    assert mac in found["leases/duplicate-mac"]["evidence"]
    assert "this node's" in found["leases/duplicate-mac"]["what"]
    assert mac in found["agent/unhealthy"]["evidence"]  # the agent's own /healthz says so


def test_duplicate_wireguard_key(vxlan: AgentCluster) -> None:
    prefix = "/coreos.com/network/subnets/"
    key = "dGhpcyBpcyBub3QgYSByZWFsIGtleSwganVzdCAzMmI="
    for i, ip in ((3, "192.0.2.31"), (4, "192.0.2.32")):
        lease = {"PublicIP": ip, "BackendType": "wireguard", "BackendData": {"PublicKey": key}}
        etcdctl(vxlan, "put", prefix + fake_subnet(vxlan, i), json.dumps(lease))
    found = checks(vxlan.nodes[0])
    assert key in found["leases/duplicate-key"]["evidence"]
    assert "192.0.2.31" in found["leases/duplicate-key"]["evidence"]


def test_overlapping_leases(vxlan: AgentCluster) -> None:
    """Another key on part of this node's subnet (the same IPv4 subnet under another
    dual-stack key would do the same): both nodes hand out those addresses."""
    node = vxlan.nodes[0]
    half = f"{node.subnet.network_address + 128}-25"
    lease = {"PublicIP": "192.0.2.41", "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:41"}}  # fmt: skip
    etcdctl(vxlan, "put", f"/coreos.com/network/subnets/{half}", json.dumps(lease))
    found = checks(node)["leases/overlap"]
    assert "(one is this node's)" in found["what"]
    own = f"{node.subnet.network_address}-{node.subnet.prefixlen}"
    assert own in found["evidence"] and half in found["evidence"]
    assert "loden leases -delete" in found["fix"]


def test_unreadable_subnet_env(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    node.subnet_file.write_text("this is not KEY=VALUE\n")
    found = checks(node)
    assert "malformed" in found["subnet-env/unreadable"]["evidence"]


def test_etcd_tls_expired_certificate(vxlan: AgentCluster, tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    found = checks(vxlan.nodes[0], f"-etcd-certfile={cert_file}", f"-etcd-keyfile={key_file}")
    assert "CN=old-client" in found["tls/expired"]["evidence"]
    assert str(cert_file) in found["tls/expired"]["what"]


def test_lease_close_to_expiry(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    key = lease_key(vxlan, node)
    value = etcdctl(vxlan, "get", "--print-value-only", key).strip()
    grant = etcdctl(vxlan, "lease", "grant", "120")  # "lease 694d... granted with TTL(120s)"
    lease_id = grant.split()[1]
    etcdctl(vxlan, "put", f"--lease={lease_id}", key, value)
    found = checks(node)
    assert "renew margin 3600s" in found["leases/expiring"]["evidence"]


def test_vxlan_device_with_another_port(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    stop(node)
    ns = node.host.ns
    ns.ip("link", "del", "flannel.1")
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "4789",
          "local", str(node.host.ip), "dev", "eth0", "nolearning")  # fmt: skip
    found = checks(node)
    assert "port 4789, config 8472" in found["vxlan/device-mismatch"]["evidence"]
    assert "kernel/drift" in found  # the peer's entries went with the old device


def test_kernel_drift(vxlan: AgentCluster) -> None:
    node, peer = vxlan.nodes
    stop(node)
    node.host.ns.ip("route", "del", str(peer.subnet))
    found = checks(node)
    assert f"missing route {peer.subnet}" in found["kernel/drift"]["evidence"]


def test_hostgw_peer_not_on_link(hostgw: AgentCluster) -> None:
    node = hostgw.nodes[0]
    far = {"PublicIP": "192.0.2.9", "BackendType": "host-gw"}
    etcdctl(hostgw, "put", f"/coreos.com/network/subnets/{fake_subnet(hostgw, 1)}",
            json.dumps(far))  # fmt: skip
    found = checks(node)
    assert "192.0.2.9" in found["host-gw/not-on-link"]["evidence"]


def test_docker_bridge_outside_the_subnet(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    ns = node.host.ns
    ns.ip("link", "add", "docker0", "type", "bridge")
    ns.ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
    (node.dir / "daemon.json").write_text('{"bip": "172.18.0.1/16"}')
    evidence = checks(node)["docker/bip"]["evidence"]
    assert "docker0 has 172.17.0.1/16" in evidence and '"bip": "172.18.0.1/16"' in evidence


def test_etcd_tls_file_missing(vxlan: AgentCluster) -> None:
    node = vxlan.nodes[0]
    found = checks(node, "-etcd-cafile=/nonexistent/ca.pem")
    assert found["tls/file"]["evidence"] == "-etcd-cafile=/nonexistent/ca.pem: no such file"


def test_etcd_tls_server_name(make_topology: TopologyFactory, tmp_path: Path) -> None:
    """A server certificate without the endpoint's address in its SANs: doctor names it."""
    from tests.fixtures.etcd import EtcdServer

    topo: Topology = make_topology(1)
    assert topo.underlay_address is not None
    real = str(topo.underlay_address.ip)
    other = str(topo.underlay_address.ip + 1)  # DNATed to etcd: same server, another name
    pki = make_pki(tmp_path / "pki", [real])
    etcd = EtcdServer(netns=topo.underlay.name, host=real, pki=pki)
    etcd.start()
    host = topo.hosts[0].ns
    host.run("iptables", "-t", "nat", "-A", "OUTPUT", "-d", other, "-p", "tcp",
             "-j", "DNAT", "--to-destination", real)  # fmt: skip
    try:
        proc = host.run(
            LODEN, "doctor", "-json", "-etcd-endpoints=" + etcd.client_url.replace(real, other),
            f"-etcd-cafile={pki.ca_cert}", f"-etcd-certfile={pki.client_cert}",
            f"-etcd-keyfile={pki.client_key}", f"-subnet-file={tmp_path / 'subnet.env'}",
            check=False, timeout=60,
        )  # fmt: skip
    finally:
        etcd.close()
    found = {f["check"]: f for f in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert "IP address mismatch" in found["tls/server"]["evidence"], found
    assert other in found["tls/server"]["what"]


def test_etcd_tls_key_of_another_certificate(
    make_topology: TopologyFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    host = make_topology(1).hosts[0]
    proc = host.ns.run(
        LODEN, "doctor", "-json", "-etcd-endpoints=https://127.0.0.1:1",
        f"-etcd-cafile={pki.ca_cert}", f"-etcd-certfile={pki.client_cert}",
        f"-etcd-keyfile={pki.server_key}", f"-subnet-file={tmp_path / 'subnet.env'}",
        check=False, timeout=60,
    )  # fmt: skip
    found = {f["check"]: f for f in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert str(pki.server_key) in found["tls/load"]["evidence"], found
