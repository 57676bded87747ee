"""``loden lab`` end to end: the real CLI, real namespaces, etcd, agents, CNI and Docker.

Every test drives ``.venv/bin/loden lab ...`` as a user would, with a lab name unique
to the run, and always runs ``loden lab down`` at the end, then asserts that nothing of
the lab is left: no namespace, process, mount, file or mount-point directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

LODEN = str(Path(sys.prefix) / "bin" / "loden")
LAB_ROOT = Path("/run/loden-lab")
BACKEND_MODULES = {
    "vxlan": "loden.backend.vxlan",
    "host-gw": "loden.backend.hostgw",
    "udp": "loden.backend.udp",
    "wireguard": "loden.backend.wireguard",
}

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]


def loden(
    *args: str, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [LODEN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"loden {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def lab_netns(name: str) -> list[str]:
    pattern = re.compile(rf"loden-{re.escape(name)}-(underlay|node\d+(-pod\d+)?)")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [
        line.split()[0] for line in out.stdout.splitlines() if pattern.fullmatch(line.split()[0])
    ]


def lab_pids(name: str) -> list[int]:
    marker = f"LODEN_LAB={name}".encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
    return found


def lab_mounts(name: str) -> list[str]:
    prefix = f"{LAB_ROOT}/{name}"
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(prefix)]


_MOUNTPOINTS = ("/run/flannel", "/opt/kubernetes", "/var/lib/cni", "/var/lib/loden")
_EXISTED_BEFORE = {p for p in _MOUNTPOINTS if Path(p).exists()}


def assert_gone(name: str) -> None:
    assert lab_netns(name) == []
    assert lab_pids(name) == []
    assert lab_mounts(name) == []
    assert not (LAB_ROOT / name).exists()
    if not LAB_ROOT.exists():  # the last lab also removes the mount points labs created
        for path in _MOUNTPOINTS:
            assert path in _EXISTED_BEFORE or not Path(path).exists(), path


def state(name: str) -> dict[str, Any]:
    data = json.loads((LAB_ROOT / name / "state.json").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def lab() -> Iterator[Callable[[], str]]:
    """Factory of unique lab names; each lab is torn down (and checked gone) afterwards."""
    names: list[str] = []

    def make() -> str:
        name = f"t{secrets.token_hex(3)}"
        names.append(name)
        return name

    try:
        yield make
    finally:
        for name in names:
            loden("lab", "down", "--name", name, check=False, timeout=60)
        for name in names:
            assert_gone(name)


def up(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return loden("lab", "up", "--name", name, *args, timeout=180)


def node_exec(name: str, node: str, *argv: str) -> str:
    return loden("lab", "exec", "--name", name, node, "--", *argv, timeout=30).stdout


def skip_without(backend: str) -> None:
    if importlib.util.find_spec(BACKEND_MODULES[backend]) is None:
        pytest.skip(f"backend {backend} is not implemented yet ({BACKEND_MODULES[backend]})")


# -- infrastructure (no agent) --------------------------------------------------------------


def test_lab_infrastructure_without_agent(lab: Callable[[], str]) -> None:
    """Namespaces, private mounts, TLS etcd cluster, v2 config, rendering, CNI pods."""
    name = lab()
    up(name, "--no-agent", "--nodes", "2", "--tls", "--etcd", "cluster", "--etcd-api", "v2")
    doc = state(name)
    plan = doc["plan"]
    assert isinstance(plan, dict)
    underlay = IPv4Network(str(plan["underlay"]))
    assert sorted(lab_netns(name)) == sorted(
        [f"loden-{name}-underlay"]
        + [f"loden-{name}-node{i}" for i in (1, 2)]
        + [f"loden-{name}-node{i}-pod{j}" for i in (1, 2) for j in (0, 1)]
    )
    # The seed's files, rendered inside the node, private to it.
    flanneld = node_exec(name, "node1", "cat", "/opt/kubernetes/cfg/flanneld")
    assert "-etcd-cafile=/opt/etcd/ssl/ca.pem" in flanneld
    assert f"https://{underlay.network_address + 3}:2379" in flanneld
    assert not Path("/opt/kubernetes/cfg/flanneld").exists()
    env1 = node_exec(name, "node1", "cat", "/run/flannel/subnet.env")
    env2 = node_exec(name, "node2", "cat", "/run/flannel/subnet.env")
    assert env1 != env2 and "FLANNEL_SUBNET" in env1
    assert not Path("/run/flannel/subnet.env").exists()
    # A TLS etcd cluster of three, reachable from a node with the seed's client files; the
    # config was written with ETCDCTL_API=2 etcdctl set.
    tls = [
        "--ca-file=/opt/etcd/ssl/ca.pem",
        "--cert-file=/opt/etcd/ssl/server.pem",
        "--key-file=/opt/etcd/ssl/server-key.pem",
    ]
    endpoints = ",".join(f"https://{underlay.network_address + i}:2379" for i in (2, 3, 4))
    health = node_exec(
        name,
        "node1",
        "env",
        "ETCDCTL_API=2",
        "etcdctl",
        *tls,
        f"--endpoints={endpoints}",
        "cluster-health",
    )
    assert "cluster is healthy" in health and health.count("is healthy") == 4
    config = node_exec(
        name,
        "node1",
        "env",
        "ETCDCTL_API=2",
        "etcdctl",
        *tls,
        f"--endpoints={endpoints}",
        "get",
        "/coreos.com/network/config",
    )
    assert json.loads(config)["Network"] == plan["network"]
    # Pods got addresses from their node's subnet and reach each other on the node.
    pods = doc["pods"]
    assert isinstance(pods, list) and len(pods) == 4
    node1_pods = [p for p in pods if p["node"] == "node1"]
    ping = loden(
        "lab",
        "exec",
        "--name",
        name,
        node1_pods[0]["name"],
        "--",
        "ping",
        "-c1",
        "-W1",
        node1_pods[1]["ip"],
        check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # down is safe to run twice.
    loden("lab", "down", "--name", name)
    assert_gone(name)
    again = loden("lab", "down", "--name", name)
    assert "0 processes" in again.stdout


def test_lab_exec_and_errors(lab: Callable[[], str]) -> None:
    name = lab()
    up(name, "--no-agent", "--nodes", "1", "--pods", "1")
    routes = node_exec(name, "node1", "ip", "route")
    assert "default via" in routes and "cni0" in routes
    assert "br0" in node_exec(name, "underlay", "ip", "-br", "link")
    bad = loden("lab", "exec", "--name", name, "node9", "--", "true", check=False)
    assert bad.returncode == 2 and "unknown target" in bad.stderr
    status = loden("lab", "exec", "--name", name, "node1", "--", "false", check=False)
    assert status.returncode == 1
    again = loden("lab", "up", "--name", name, "--no-agent", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr


# -- with the agent ----------------------------------------------------------------------------


def check_ok(name: str) -> str:
    result = loden("lab", "check", "--name", name, timeout=120)
    for rule in (
        "1. every pod has its own IP",
        "2. containers of one pod share its IP",
        "3. every pod reaches every other pod",
        "4. every node reaches every pod",
    ):
        assert f"✓ {rule}" in result.stdout, result.stdout
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "extra"),
    [
        ("vxlan", ["--nodes", "3"]),
        ("host-gw", ["--tls", "--etcd", "cluster", "--etcd-api", "v2"]),
        ("udp", []),
        ("wireguard", []),
    ],
)
def test_lab_backend_up_check_down(lab: Callable[[], str], backend: str, extra: list[str]) -> None:
    skip_without(backend)
    name = lab()
    began = time.monotonic()
    up(name, "--backend", backend, *extra)
    took_up = time.monotonic() - began
    check_ok(name)
    status = loden("lab", "status", "--name", name).stdout
    nodes = 3 if "--nodes" in extra else 2
    assert status.count("flanneld is running") == nodes, status
    doc = state(name)
    nodes_doc = doc["nodes"]
    assert isinstance(nodes_doc, dict)
    subnets = [IPv4Network(str(n["subnet"])) for n in nodes_doc.values()]
    assert len(set(subnets)) == nodes
    for subnet in subnets:
        assert str(subnet) in status
    # CNI node: the seed's ExecStartPost ran, but into its own file (see node.py).
    env = node_exec(name, "node1", "cat", "/run/flannel/subnet.env")
    assert "FLANNEL_NETWORK=" in env
    opts = node_exec(name, "node1", "cat", "/run/flannel/docker_opts.env")
    assert "DOCKER_NETWORK_OPTIONS=" in opts and "--bip=" in opts
    if backend == "vxlan":
        assert "flannel.1" in node_exec(name, "node1", "ip", "-br", "link")
    began = time.monotonic()
    loden("lab", "down", "--name", name)
    print(f"{backend}: up {took_up:.1f}s, down {time.monotonic() - began:.1f}s")
    assert_gone(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "backend", "runtime"),
    [
        ("dual", "vxlan", "cni"),
        ("only", "host-gw", "cni"),
        ("dual", "wireguard", "cni"),
        ("dual", "vxlan", "docker"),
    ],
)
def test_lab_ipv6(lab: Callable[[], str], mode: str, backend: str, runtime: str) -> None:
    """``--ipv6 dual|only``: the four rules per family (ping and ping6), both subnets in
    status, nothing left after down. Docker nodes: dockerd with ipv6 + fixed-cidr-v6."""
    skip_without(backend)
    name = lab()
    up(name, "--ipv6", mode, "--backend", backend, "--runtime", runtime)
    result = loden("lab", "check", "--name", name, timeout=120).stdout
    families = ("IPv4", "IPv6") if mode == "dual" else ("IPv6",)
    for family in families:
        for rule in (
            "every pod has its own IP",
            "every pod reaches every other pod",
            "every node reaches every pod",
        ):
            assert re.search(rf"✓ \d\. {rule} \({family}\)", result), result
    assert "✓" in result and "✗" not in result, result
    if mode == "only":
        assert "(IPv4)" not in result
    doc = state(name)
    status = loden("lab", "status", "--name", name).stdout
    for node in doc["nodes"].values():
        subnet6 = IPv6Network(str(node["subnet6"]))
        assert subnet6.subnet_of(
            IPv6Network(f"fd6e:{int(doc['plan']['network'].split('.')[1]):x}::/56")
        )
        assert str(subnet6) in status
        if mode == "dual":
            assert str(node["subnet"]) in status
        else:
            assert node["subnet"] == ""
    for pod in doc["pods"]:
        assert IPv6Address(str(pod["ip6"]))
        assert bool(pod["ip"]) is (mode == "dual")
    env = node_exec(name, "node1", "cat", "/run/flannel/subnet.env")
    if runtime == "docker":  # the seed's mk-docker-opts rewrote it (no IPv6 option)
        assert "DOCKER_NETWORK_OPTIONS=" in env and "FLANNEL_IPV6_SUBNET" not in env
        daemon = json.loads(node_exec(name, "node1", "cat", "/etc/docker/daemon.json"))
        assert daemon["ipv6"] is True
        assert daemon["fixed-cidr-v6"] == doc["nodes"]["node1"]["subnet6"]
    else:
        assert "FLANNEL_IPV6_SUBNET=" in env
        assert ("FLANNEL_SUBNET=" in env) is (mode == "dual")
    loden("lab", "down", "--name", name)
    assert_gone(name)


def test_lab_ipv6_refusals(lab: Callable[[], str]) -> None:
    name = lab()
    udp = loden("lab", "up", "--name", name, "--ipv6", "dual", "--backend", "udp", check=False)
    assert udp.returncode == 2 and "IPv4-only" in udp.stderr
    docker = loden(
        "lab", "up", "--name", name, "--ipv6", "only", "--runtime", "docker", check=False
    )
    assert docker.returncode == 2 and "needs an IPv4 subnet" in docker.stderr


@pytest.mark.slow
def test_lab_docker_runtime(lab: Callable[[], str]) -> None:
    name = lab()
    up(name, "--runtime", "docker", "--backend", "vxlan")
    check_ok(name)
    env = node_exec(name, "node1", "cat", "/run/flannel/subnet.env")
    bip = re.search(r'DOCKER_NETWORK_OPTIONS=" --bip=(\S+) --ip-masq=false --mtu=(\d+)"', env)
    assert bip, env
    dockerd = [
        Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for pid in lab_pids(name)
        if Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    ]
    assert [
        b"--bip=" + bip.group(1).encode(),
        b"--ip-masq=false",
        b"--mtu=" + bip.group(2).encode(),
    ] in [argv[1:4] for argv in dockerd]
    doc = state(name)
    pods = doc["pods"]
    assert isinstance(pods, list)
    node1 = doc["nodes"]
    assert isinstance(node1, dict)
    subnet = IPv4Network(str(node1["node1"]["subnet"]))
    assert all(IPv4Address(p["ip"]) in subnet for p in pods if p["node"] == "node1")
    ids = [c["docker_id"] for p in pods for c in p["containers"]]
    assert len(ids) == 5 and all(ids)  # 2 nodes x 2 pods + node1-pod0's sidecar
    loden("lab", "down", "--name", name)
    assert_gone(name)
    assert not [d for i in ids for d in Path("/sys/fs/cgroup").glob(f"*/docker/{i}")]


@pytest.mark.slow
def test_lab_down_after_killed_up(lab: Callable[[], str]) -> None:
    """SIGKILL `loden lab up` while agents start; `down` still removes everything."""
    name = lab()
    proc = subprocess.Popen(
        [LODEN, "lab", "up", "--name", name, "--nodes", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                roles = [p["role"] for p in state(name)["processes"]]
            except (OSError, ValueError, KeyError):
                roles = []
            if "agent" in roles:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no agent was started within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert lab_netns(name) and lab_pids(name) and lab_mounts(name)
    loden("lab", "down", "--name", name)
    assert_gone(name)


@pytest.mark.slow
def test_lab_two_labs_side_by_side(lab: Callable[[], str]) -> None:
    first, second = lab(), lab()
    up(first, "--backend", "vxlan")
    up(second, "--backend", "host-gw")
    plans = [state(n)["plan"] for n in (first, second)]
    networks = [IPv4Network(str(p["network"])) for p in plans]
    underlays = [IPv4Network(str(p["underlay"])) for p in plans]
    assert not networks[0].overlaps(networks[1]) and not underlays[0].overlaps(underlays[1])
    check_ok(first)
    check_ok(second)
    ambiguous = loden("lab", "check", check=False)
    assert ambiguous.returncode == 2 and "several labs exist" in ambiguous.stderr
    loden("lab", "down", "--name", first)
    assert_gone(first)
    check_ok(second)


@pytest.mark.slow
def test_lab_demo(lab: Callable[[], str]) -> None:
    name = lab()
    result = loden("demo", "--name", name, timeout=180)
    assert "lab exec node1 -- ip route" in result.stdout
    assert f"lab down --name {name}" in result.stdout
    assert "✓ 3. every pod reaches every other pod" in result.stdout
    assert len(lab_netns(name)) == 1 + 3 + 6  # the lab stays up
