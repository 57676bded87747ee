"""Data-plane throughput pod to pod across two hosts: every backend, hand-made twins.

Run by hand as root (not part of the test suite)::

    .venv/bin/python bench/dataplane.py [--rounds 3] [--seconds 5] [--tests tcp1 tcp4 udp64]
        [--configs underlay hand-host-gw loden-host-gw hand-vxlan loden-vxlan ...]
        [--agent-arg=--ip-masq ...]

Tests: iperf3 TCP with 1 and 4 streams (Gbit/s), and 64-byte UDP at an unlimited rate
(packets/s received); each as a ratio to the underlay measured in the same round, and
for the agents their CPU seconds per GB moved (for udp that is its data path).

Every configuration gets its own two-host :class:`tests.fixtures.topology.Topology`
(namespaces only; nothing outside them receives traffic) and one pod per host. All of
them are built first, then the measurement sequence is repeated ``--rounds`` times,
interleaved (the order is rotated each round so no configuration is always first), and
the median per configuration is reported with its ratio to the underlay and to its
hand-configured twin.

* ``underlay``: host to host over ``eth0`` (MTU 1500), no overlay at all;
* ``hand-host-gw``: ``ip route add <peer subnet> via <peer eth0 IP>`` on each host;
  ``hand-host-gw-fwd`` adds the FORWARD accept rules flanneld installs by default;
* ``hand-vxlan``: ``flannel.1`` made with ``ip``/``bridge`` exactly as Go flanneld makes
  it (VNI 1, port 8472, nolearning, txqueuelen 0, MTU 1450, /32 address, permanent
  neighbour + FDB entry + onlink route) and with Go flanneld's default offloads (all on);
  ``-fwd`` variants add the FORWARD accept rules flanneld installs by default (Loden's
  agents install them too, and they cost a few % here);
  ``hand-vxlan-txoff`` is the same plus ``ethtool -K flannel.1 tx off`` (the checksum
  workaround, which also turns TSO off);
* ``loden-vxlan`` is the default config (``TxChecksumOffload`` auto: on kernels >= 5.7
  the offloads stay on and its twin is ``hand-vxlan``; before 5.7 they go off and its
  twin is ``hand-vxlan-txoff``); ``loden-vxlan-txoff`` forces ``"TxChecksumOffload":
  false`` (twin ``hand-vxlan-txoff``);
* ``loden-<backend>``: real ``flanneld`` agents (one per host) against a real etcd in the
  underlay namespace; pods get their MTU from ``subnet.env`` (FLANNEL_MTU). ``loden-udp``
  is the udp backend (user-space data path), ``loden-wireguard`` runs over wireguard-go;
* IPv6 (``-v6`` names): the same comparisons for IPv6 pod-to-pod traffic over an IPv6
  underlay (``underlay-v6``): ``hand-host-gw-v6`` (``ip -6 route ... via <peer eth0
  IPv6>``), ``hand-vxlan-v6[-txoff]`` (``flannel-v6.1`` made by ip/bridge: local = the
  host's IPv6, MTU as the kernel gives an IPv6 VTEP, permanent neighbour + FDB entry +
  onlink route) against dual-stack ``flanneld`` agents ``loden-host-gw-v6`` and
  ``loden-vxlan-v6`` (pods get both families, iperf3 runs over IPv6);
* ``naive-udp``: flannel's udp wire format forwarded by the naive single-thread Python
  loop of bench/dataplane_udp.py (one packet per system call, no offloads);
  ``cproxy-udp``: the same design in C (bench/c_proxy.c, flannel's C proxy's design,
  compiled with gcc at start): the two references the udp backend is measured against.

A configuration is one row of :data:`CONFIGS`; a new backend (wireguard, ...) is one
more ``loden_config(...)`` line there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.topology import (
    Host,
    Namespace,
    Process,
    Topology,
    TopologyError,
    subnet_from_env,
    wait_until,
)

from loden.backend.vxlan import tx_checksum_decision
from loden.lab.etcd import EtcdServer

#: What ``"TxChecksumOffload"`` absent (auto) means on the kernel running the bench.
AUTO_TX_CHECKSUM, AUTO_TX_CHECKSUM_WHY = tx_checksum_decision(None, platform.release())
BIN = Path(sys.executable).parent
FLANNELD = str(BIN / "flanneld")
LODEN = str(BIN / "loden")
IPERF_PORT = 5201
VXLAN_MTU = 1450  # flannel: external MTU 1500 - 50 bytes of VXLAN encapsulation


# -- what a configuration builds --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where to run the iperf3 client and server, and what the path looks like."""

    client: Namespace
    server: Namespace
    server_ip: IPv4Address | IPv6Address
    mtu: int
    note: str = ""


@dataclass
class Lab:
    """Owns everything the configurations create; :meth:`close` undoes all of it."""

    args: argparse.Namespace
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    #: Pids of the agents (counted with their children: udp workers, wireguard-go).
    agent_groups: list[int] = field(default_factory=list)

    def topology(self) -> Topology:
        topo = Topology(2, prefix="bd")
        self.stack.callback(topo.close)
        return topo

    def close(self) -> None:
        self.stack.close()


Builder = Callable[[Lab], Endpoints]


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    build: Builder
    #: Hand-configured configurations this one is compared with; the first is its "twin".
    twins: tuple[str, ...] = ()
    #: Minimum ratio to the first twin (the issue's target), if any.
    target: float | None = None


def overlay_network() -> IPv4Network:
    """A random 10.x/16 that cannot overlap the topology's underlay (10.100+ or 172.x)."""
    return IPv4Network(f"10.{random.randint(1, 99)}.0.0/16")


def node_subnets(network: IPv4Network) -> tuple[IPv4Network, IPv4Network]:
    base = network.network_address
    return IPv4Network(f"{base + 256}/24"), IPv4Network(f"{base + 512}/24")


# -- builders ------------------------------------------------------------------------------


def build_underlay(lab: Lab) -> Endpoints:
    topo = lab.topology()
    h0, h1 = topo.hosts
    return Endpoints(h0.ns, h1.ns, h1.ip, topo.mtu, "host to host over eth0")


def hand_hostgw(*, forward_rules: bool) -> Builder:
    def build(lab: Lab) -> Endpoints:
        topo = lab.topology()
        h0, h1 = topo.hosts
        network = overlay_network()
        subnets = node_subnets(network)
        pods = [topo.add_pod(h, s, mtu=topo.mtu) for h, s in zip(topo.hosts, subnets, strict=True)]
        h0.ns.ip("route", "add", str(subnets[1]), "via", str(h1.ip), "dev", "eth0")
        h1.ns.ip("route", "add", str(subnets[0]), "via", str(h0.ip), "dev", "eth0")
        note = "ip route via peer eth0"
        if forward_rules:
            note += add_forward_rules(topo.hosts, network)
        return Endpoints(pods[0].ns, pods[1].ns, pods[1].ip, topo.mtu, note)

    return build


def add_forward_rules(hosts: Sequence[Host], network: IPv4Network) -> str:
    """What flanneld --iptables-forward-rules (default on) installs; the note to show."""
    for host in hosts:
        for rule in (
            ["-N", "FLANNEL-FWD"],
            ["-A", "FLANNEL-FWD", "-s", str(network), "-j", "ACCEPT"],
            ["-A", "FLANNEL-FWD", "-d", str(network), "-j", "ACCEPT"],
            ["-A", "FORWARD", "-j", "FLANNEL-FWD"],
        ):
            host.ns.run("iptables", *rule)
    return " + FLANNEL-FWD accept rules in FORWARD (iptables)"


def offloads(host: Host, dev: str = "flannel.1") -> str:
    """The offloads of ``dev`` that decide VXLAN throughput (checksum -> TSO -> GSO)."""
    out = host.ns.run("ethtool", "-k", dev, check=False).stdout
    wanted = {"tx-checksumming": "tx-csum", "tx-tcp-segmentation": "tso"}
    found = []
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key in wanted:
            found.append(f"{wanted[key]} {value.split()[0] if value.split() else '?'}")
    return f"{dev}: {', '.join(found)}" if found else f"{dev}: offloads unknown"


def _vtep_mac(index: int) -> str:
    return f"0a:58:0a:00:00:{index + 1:02x}"


def hand_vxlan(*, tx_off: bool, forward_rules: bool = False) -> Builder:
    def build(lab: Lab) -> Endpoints:
        topo = lab.topology()
        network = overlay_network()
        subnets = node_subnets(network)
        hosts: list[Host] = topo.hosts
        for i, host in enumerate(hosts):
            ns = host.ns
            ns.ip(
                "link",
                "add",
                "flannel.1",
                "txqueuelen",
                "0",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                str(host.ip),
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            )
            ns.ip("link", "set", "flannel.1", "address", _vtep_mac(i), "mtu", str(VXLAN_MTU))
            ns.ip("addr", "add", f"{subnets[i].network_address}/32", "dev", "flannel.1")
            if tx_off:
                ns.run("ethtool", "-K", "flannel.1", "tx", "off")
            ns.ip("link", "set", "flannel.1", "up")
        for i, host in enumerate(hosts):
            j = 1 - i
            peer_gw, peer_mac = str(subnets[j].network_address), _vtep_mac(j)
            ns = host.ns
            ns.ip(
                "neigh",
                "replace",
                peer_gw,
                "lladdr",
                peer_mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            )
            ns.run(
                "bridge",
                "fdb",
                "append",
                peer_mac,
                "dev",
                "flannel.1",
                "dst",
                str(hosts[j].ip),
                "self",
                "permanent",
            )
            ns.ip("route", "add", str(subnets[j]), "via", peer_gw, "dev", "flannel.1", "onlink")
        pods = [topo.add_pod(h, s, mtu=VXLAN_MTU) for h, s in zip(hosts, subnets, strict=True)]
        note = f"flannel.1 by ip/bridge, {offloads(hosts[0])}"
        if forward_rules:
            note += add_forward_rules(hosts, network)
        return Endpoints(pods[0].ns, pods[1].ns, pods[1].ip, VXLAN_MTU, note)

    return build


#: Run "$@" with this host's own /run/wireguard and /run/flannel (wireguard-go's UAPI
#: sockets and the key file live there; ``ip netns exec`` gives a private mount
#: namespace, as tests/integration/test_agent_wireguard.py does).
PRIVATE_RUN = (
    'mkdir -p /run/wireguard /run/flannel "$1/wireguard" "$1/flannel"'
    ' && mount --bind "$1/wireguard" /run/wireguard'
    ' && mount --bind "$1/flannel" /run/flannel'
    ' && shift && exec "$@"'
)


def _start_agent(lab: Lab, host: Host, etcd_url: str, private: bool) -> tuple[Process, Path]:
    workdir = host.ns.workdir / "agent"
    workdir.mkdir(exist_ok=True)
    subnet_file = workdir / "subnet.env"
    argv = [
        FLANNELD,
        f"--etcd-endpoints={etcd_url}",
        f"--subnet-file={subnet_file}",
        f"--state-dir={workdir / 'state'}",
        *lab.args.agent_arg,
    ]
    if private:
        argv = ["sh", "-c", PRIVATE_RUN, "sh", str(workdir / "run"), *argv]
    proc = host.ns.spawn(*argv)
    lab.stack.callback(proc.stop)
    lab.agent_groups.append(proc.pid)
    return proc, subnet_file


def _flannel_mtu(subnet_file: Path) -> int:
    for line in subnet_file.read_text().splitlines():
        if line.startswith("FLANNEL_MTU="):
            return int(line.split("=", 1)[1])
    raise TopologyError(f"{subnet_file} has no FLANNEL_MTU line")


def loden_config(backend: dict[str, object]) -> Builder:
    """Real ``flanneld`` agents on both hosts with ``backend`` as Backend config."""

    def build(lab: Lab) -> Endpoints:
        topo = lab.topology()
        assert topo.underlay_address is not None
        etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
        lab.stack.callback(etcd.close)
        etcd.start()
        network = overlay_network()
        config = json.dumps({"Network": str(network), "Backend": backend})
        topo.underlay.run(LODEN, "config", "set", config, f"-etcd-endpoints={etcd.client_url}")
        private = backend.get("Type") == "wireguard"
        agents = [_start_agent(lab, host, etcd.client_url, private) for host in topo.hosts]
        for (proc, subnet_file), host in zip(agents, topo.hosts, strict=True):
            if not wait_until(subnet_file.exists, timeout=30):
                raise TopologyError(
                    f"agent on {host.name} wrote no subnet.env within 30 s:\n"
                    f"{proc.output()[-2000:]}"
                )
        pods = []
        mtu = 0
        for (_, subnet_file), host in zip(agents, topo.hosts, strict=True):
            mtu = _flannel_mtu(subnet_file)
            pods.append(topo.add_pod(host, subnet_from_env(subnet_file), mtu=mtu))
        note = f"flanneld x2, {json.dumps(backend, separators=(',', ':'))}"
        if backend.get("Type") == "vxlan":
            note += f", {offloads(topo.hosts[0])}"
        return Endpoints(pods[0].ns, pods[1].ns, pods[1].ip, mtu, note)

    return build


def naive_udp(lab: Lab) -> Endpoints:
    """The naive forwarder of bench/dataplane_udp.py on both hosts (TUN flannel0)."""
    topo = lab.topology()
    network = overlay_network()
    subnets = node_subnets(network)
    forwarder = str(Path(__file__).with_name("dataplane_udp.py"))
    for i, host in enumerate(topo.hosts):
        peer = 1 - i
        proc = host.ns.spawn(
            sys.executable,
            forwarder,
            "--naive-forwarder",
            "flannel0",
            str(host.ip),
            str(subnets[i].network_address),
            str(network),
            f"{subnets[peer]}={topo.hosts[peer].ip}",
        )
        lab.stack.callback(proc.stop)
        lab.agent_groups.append(proc.pid)
    for host in topo.hosts:

        def has_tun(h: Host = host) -> bool:
            return h.ns.ip("link", "show", "flannel0", check=False).returncode == 0

        if not wait_until(has_tun):
            raise TopologyError(f"naive forwarder on {host.name} made no flannel0")
    mtu = topo.mtu - 28
    pods = [topo.add_pod(h, s, mtu=mtu) for h, s in zip(topo.hosts, subnets, strict=True)]
    return Endpoints(pods[0].ns, pods[1].ns, pods[1].ip, mtu, "select loop, 1 packet/call")


def cproxy_udp(lab: Lab) -> Endpoints:
    """bench/c_proxy.c (flannel's C proxy design, one packet per system call) on both
    hosts, compiled here with gcc."""
    topo = lab.topology()
    network = overlay_network()
    subnets = node_subnets(network)
    binary = topo.hosts[0].ns.workdir / "c_proxy"
    source = Path(__file__).with_name("c_proxy.c")
    built = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode:
        raise TopologyError(f"cannot compile {source}: {built.stderr.strip()}")
    mtu = topo.mtu - 28
    for i, host in enumerate(topo.hosts):
        peer = 1 - i
        proc = host.ns.spawn(
            str(binary), "flannel0", str(host.ip), "8285", f"{subnets[peer]}={topo.hosts[peer].ip}"
        )
        lab.stack.callback(proc.stop)
        lab.agent_groups.append(proc.pid)

        def ready(p: Process = proc) -> bool:
            return "ready" in p.output()

        if not wait_until(ready):
            raise TopologyError(f"c_proxy on {host.name} did not start: {proc.output()[-500:]}")
        host.ns.ip("addr", "add", f"{subnets[i].network_address}/32", "dev", "flannel0")
        host.ns.ip("link", "set", "flannel0", "mtu", str(mtu), "up")
        host.ns.ip("route", "add", str(network), "dev", "flannel0")
    pods = [topo.add_pod(h, s, mtu=mtu) for h, s in zip(topo.hosts, subnets, strict=True)]
    return Endpoints(pods[0].ns, pods[1].ns, pods[1].ip, mtu, "C poll loop, 1 packet/call")


# -- IPv6 -------------------------------------------------------------------------------------


def _no_dad(ns: Namespace) -> None:
    for key in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{key}.accept_dad", "0")


def v6_underlay(topo: Topology) -> list[IPv6Address]:
    """``fdXX::1`` on the underlay bridge, ``::(11+i)`` on each host's eth0 (no DAD),
    default IPv6 routes and forwarding; the hosts' IPv6 addresses."""
    net = IPv6Network(f"fd{random.randint(0, 255):02x}:{random.randint(0, 0xFFFF):x}::/64")
    _no_dad(topo.underlay)
    topo.underlay.ip("-6", "addr", "add", f"{net.network_address + 1}/64", "dev", "br0", "nodad")
    out = []
    for host in topo.hosts:
        _no_dad(host.ns)
        host.ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
        host.ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        ip = net.network_address + 11 + host.index
        host.ns.ip("-6", "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
        host.ns.ip("-6", "route", "add", "default", "via", str(net.network_address + 1))
        out.append(ip)
    return out


def _pod6(topo: Topology, host: Host, subnet6: IPv6Network, mtu: int) -> IPv6Address:
    """IPv6 on ``host``'s first pod: ``::1`` on cni0, ``::2`` on the pod (no DAD)."""
    pod = host.pods[0]
    gw = IPv6Interface((subnet6.network_address + 1, subnet6.prefixlen))
    host.ns.sysctl("net.ipv6.conf.cni0.accept_dad", "0")
    host.ns.ip("-6", "addr", "add", str(gw), "dev", "cni0", "nodad")
    _no_dad(pod.ns)
    pod.ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
    addr = IPv6Interface((subnet6.network_address + 2, subnet6.prefixlen))
    pod.ns.ip("-6", "addr", "add", str(addr), "dev", "eth0", "nodad")
    pod.ns.ip("-6", "route", "add", "default", "via", str(gw.ip))
    return addr.ip


def _subnets6() -> tuple[IPv6Network, IPv6Network, IPv6Network]:
    net = IPv6Network(f"fd{random.randint(0, 255):02x}:{random.randint(1, 0xFFFF):x}::/56")
    base = int(net.network_address)
    return net, IPv6Network((base + (1 << 64), 64)), IPv6Network((base + (2 << 64), 64))


def build_underlay_v6(lab: Lab) -> Endpoints:
    topo = lab.topology()
    ips = v6_underlay(topo)
    return Endpoints(topo.hosts[0].ns, topo.hosts[1].ns, ips[1], topo.mtu, "host to host, IPv6")


def hand_hostgw_v6(lab: Lab) -> Endpoints:
    topo = lab.topology()
    ips = v6_underlay(topo)
    network = overlay_network()
    _, *subnets6 = _subnets6()
    pods6 = []
    for host, subnet, subnet6 in zip(topo.hosts, node_subnets(network), subnets6, strict=True):
        topo.add_pod(host, subnet, mtu=topo.mtu)
        pods6.append(_pod6(topo, host, subnet6, topo.mtu))
    for i, host in enumerate(topo.hosts):
        j = 1 - i
        host.ns.ip("-6", "route", "add", str(subnets6[j]), "via", str(ips[j]), "dev", "eth0")
    pod_ns = [h.pods[0].ns for h in topo.hosts]
    return Endpoints(pod_ns[0], pod_ns[1], pods6[1], topo.mtu, "ip -6 route via peer eth0")


def hand_vxlan_v6(*, tx_off: bool) -> Builder:
    def build(lab: Lab) -> Endpoints:
        topo = lab.topology()
        ips = v6_underlay(topo)
        network = overlay_network()
        _, *subnets6 = _subnets6()
        hosts: list[Host] = topo.hosts
        dev = "flannel-v6.1"
        for i, host in enumerate(hosts):
            ns = host.ns
            ns.ip(
                "link", "add", dev, "type", "vxlan", "id", "1", "local", str(ips[i]),
                "dev", "eth0", "dstport", "8472", "nolearning",
            )  # fmt: skip
            # flanneld asks for 1450; the kernel caps an IPv6 VTEP at 1500 - 70.
            ns.ip("link", "set", dev, "address", _vtep_mac(i))
            ns.ip("-6", "addr", "add", f"{subnets6[i].network_address}/128", "dev", dev, "nodad")
            if tx_off:
                ns.run("ethtool", "-K", dev, "tx", "off")
            ns.ip("link", "set", dev, "up")
        for i, host in enumerate(hosts):
            j = 1 - i
            gw, mac = str(subnets6[j].network_address), _vtep_mac(j)
            ns = host.ns
            ns.ip("-6", "neigh", "replace", gw, "lladdr", mac, "dev", dev, "nud", "permanent")
            ns.run(
                "bridge", "fdb", "append", mac, "dev", dev, "dst", str(ips[j]), "self",
                "permanent",
            )  # fmt: skip
            ns.ip("-6", "route", "add", str(subnets6[j]), "via", gw, "dev", dev, "onlink")
        pods6 = []
        for host, subnet, subnet6 in zip(hosts, node_subnets(network), subnets6, strict=True):
            topo.add_pod(host, subnet, mtu=VXLAN_MTU)
            pods6.append(_pod6(topo, host, subnet6, VXLAN_MTU))
        pod_ns = [h.pods[0].ns for h in hosts]
        note = f"{dev} by ip/bridge, {offloads(hosts[0], dev)}"
        return Endpoints(pod_ns[0], pod_ns[1], pods6[1], VXLAN_MTU, note)

    return build


def _subnet6_from_env(path: Path) -> IPv6Network:
    for line in path.read_text().splitlines():
        if line.startswith("FLANNEL_IPV6_SUBNET="):
            return IPv6Interface(line.split("=", 1)[1].strip()).network
    raise TopologyError(f"{path} has no FLANNEL_IPV6_SUBNET line")


def loden_config_v6(backend: dict[str, object]) -> Builder:
    """Dual-stack ``flanneld`` agents on both hosts; iperf3 between the pods' IPv6."""

    def build(lab: Lab) -> Endpoints:
        topo = lab.topology()
        assert topo.underlay_address is not None
        v6_underlay(topo)
        etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
        lab.stack.callback(etcd.close)
        etcd.start()
        net6, _, _ = _subnets6()
        config = json.dumps(
            {
                "Network": str(overlay_network()),
                "EnableIPv6": True,
                "IPv6Network": str(net6),
                "Backend": backend,
            }
        )
        topo.underlay.run(LODEN, "config", "set", config, f"-etcd-endpoints={etcd.client_url}")
        agents = [_start_agent(lab, host, etcd.client_url, False) for host in topo.hosts]
        for (proc, subnet_file), host in zip(agents, topo.hosts, strict=True):
            if not wait_until(subnet_file.exists, timeout=30):
                raise TopologyError(
                    f"agent on {host.name} wrote no subnet.env within 30 s:\n"
                    f"{proc.output()[-2000:]}"
                )
        pods6 = []
        mtu = 0
        for (_, subnet_file), host in zip(agents, topo.hosts, strict=True):
            mtu = _flannel_mtu(subnet_file)
            topo.add_pod(host, subnet_from_env(subnet_file), mtu=mtu)
            pods6.append(_pod6(topo, host, _subnet6_from_env(subnet_file), mtu))
        note = f"flanneld x2 dual-stack, {json.dumps(backend, separators=(',', ':'))}"
        if backend.get("Type") == "vxlan":
            note += f", {offloads(topo.hosts[0], 'flannel-v6.1')}"
        pod_ns = [h.pods[0].ns for h in topo.hosts]
        return Endpoints(pod_ns[0], pod_ns[1], pods6[1], mtu, note)

    return build


#: The configurations, in display order. Add a backend here.
CONFIGS: tuple[Config, ...] = (
    Config("underlay", build_underlay),
    Config("hand-host-gw", hand_hostgw(forward_rules=False)),
    Config("hand-host-gw-fwd", hand_hostgw(forward_rules=True)),
    Config(
        "loden-host-gw",
        loden_config({"Type": "host-gw"}),
        ("hand-host-gw", "hand-host-gw-fwd"),
        0.95,
    ),
    Config("hand-vxlan", hand_vxlan(tx_off=False)),
    Config("hand-vxlan-fwd", hand_vxlan(tx_off=False, forward_rules=True)),
    Config("hand-vxlan-txoff", hand_vxlan(tx_off=True)),
    Config("hand-vxlan-txoff-fwd", hand_vxlan(tx_off=True, forward_rules=True)),
    Config(
        "loden-vxlan",  # the default: TxChecksumOffload auto (see the module docstring)
        loden_config({"Type": "vxlan"}),
        ("hand-vxlan", "hand-vxlan-fwd", "hand-vxlan-txoff")
        if AUTO_TX_CHECKSUM
        else ("hand-vxlan-txoff", "hand-vxlan-txoff-fwd", "hand-vxlan"),
        0.95,
    ),
    Config(
        "loden-vxlan-txoff",
        loden_config({"Type": "vxlan", "TxChecksumOffload": False}),
        ("hand-vxlan-txoff", "hand-vxlan-txoff-fwd", "hand-vxlan"),
        0.95,
    ),
    Config("naive-udp", naive_udp),
    Config("cproxy-udp", cproxy_udp),
    Config("loden-udp", loden_config({"Type": "udp"}), ("cproxy-udp", "naive-udp")),
    Config("loden-wireguard", loden_config({"Type": "wireguard"})),
    Config("underlay-v6", build_underlay_v6),
    Config("hand-host-gw-v6", hand_hostgw_v6),
    Config("loden-host-gw-v6", loden_config_v6({"Type": "host-gw"}), ("hand-host-gw-v6",), 0.95),
    Config("hand-vxlan-v6", hand_vxlan_v6(tx_off=False)),
    Config("hand-vxlan-v6-txoff", hand_vxlan_v6(tx_off=True)),
    Config(
        "loden-vxlan-v6",  # TxChecksumOffload auto: on for kernels >= 5.7
        loden_config_v6({"Type": "vxlan"}),
        ("hand-vxlan-v6", "hand-vxlan-v6-txoff"),
        0.95,
    ),
)
BY_NAME = {c.name: c for c in CONFIGS}
DEFAULT_CONFIGS = [
    "underlay",
    "hand-host-gw",
    "hand-host-gw-fwd",
    "loden-host-gw",
    "hand-vxlan",
    "hand-vxlan-fwd",
    "hand-vxlan-txoff",
    "hand-vxlan-txoff-fwd",
    "loden-vxlan",
    "loden-vxlan-txoff",
    "naive-udp",
    "cproxy-udp",
    "loden-udp",
    "loden-wireguard",
]
TESTS = ("tcp1", "tcp4", "udp64")


# -- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    gbps: float
    retransmits: int
    #: Bytes the receiver got, and for udp64 the datagrams per second it got.
    nbytes: int = 0
    pps: float = 0.0

    def value(self, test: str) -> float:
        """What the tables compare: Gbit/s for TCP, packets/s for udp64."""
        return self.pps if test == "udp64" else self.gbps


def _listening(ns: Namespace, port: int) -> bool:
    out = ns.run("ss", "-Hltn", f"sport = :{port}", check=False).stdout
    return bool(out.strip())


def iperf(ends: Endpoints, seconds: float, test: str) -> Sample:
    """One iperf3 run (server in the destination namespace, client in the source):
    ``tcp1``/``tcp4`` TCP with 1/4 streams, ``udp64`` 64-byte UDP at an unlimited rate."""
    server = ends.server.spawn("iperf3", "-s", "-1", "-p", str(IPERF_PORT))
    if test == "udp64":
        mode = ["-u", "-l", "64", "-b", "0"]
    else:
        mode = ["-P", "4" if test == "tcp4" else "1"]
    try:
        if not wait_until(lambda: _listening(ends.server, IPERF_PORT), timeout=5, interval=0.05):
            raise TopologyError(f"iperf3 server in {ends.server.name} not listening after 5 s")
        proc = ends.client.run(
            "iperf3",
            "-J",
            "-c",
            str(ends.server_ip),
            "-p",
            str(IPERF_PORT),
            "-t",
            str(seconds),
            *mode,
            timeout=seconds + 30,
            check=False,
        )
    finally:
        server.stop()
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"iperf3 gave no JSON (exit {proc.returncode}): {proc.stderr}") from exc
    if "error" in report:
        raise TopologyError(f"iperf3 {ends.client.name} -> {ends.server_ip}: {report['error']}")
    end = report["end"]
    if test == "udp64":
        got = end.get("sum_received") or end["sum"]
        packets = got.get("packets", 0) - got.get("lost_packets", 0)
        return Sample(got["bits_per_second"] / 1e9, 0, int(got["bytes"]), packets / got["seconds"])
    got = end["sum_received"]
    return Sample(
        got["bits_per_second"] / 1e9,
        int(end["sum_sent"].get("retransmits", 0)),
        int(got["bytes"]),
    )


def cpu_by_group() -> dict[int, float]:
    """CPU time (user + system, s) used so far by each process and its descendants, by
    pid: an agent's total includes children in other sessions (wireguard-go, which is
    the wireguard data path) as well as its udp worker processes."""
    own: dict[int, float] = {}
    parent: dict[int, int] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
        parent[pid] = int(fields[1])  # field 4 of /proc/PID/stat: the parent
        own[pid] = (int(fields[11]) + int(fields[12])) / tick
    out: dict[int, float] = {}
    for pid, used in own.items():
        seen = 0
        node = pid
        while node > 1 and seen < 64:  # every ancestor gets this process's time
            out[node] = out.get(node, 0.0) + used
            node = parent.get(node, 0)
            seen += 1
    return out


@dataclass
class AgentCPU:
    """CPU used by one configuration's agents during its own runs and during the others'."""

    own: float = 0.0
    own_wall: float = 0.0
    other: float = 0.0
    other_wall: float = 0.0
    #: CPU seconds and bytes moved during its own TCP runs (for CPU per GB).
    tcp_cpu: float = 0.0
    tcp_bytes: int = 0


def check_path(ends: Endpoints) -> None:
    """Fail early and clearly when a configuration does not forward at all."""
    if not ends.client.ping(str(ends.server_ip), count=3, wait=2.0):
        raise TopologyError(f"{ends.client.name} cannot ping {ends.server_ip}")


# -- report -----------------------------------------------------------------------------------


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def load() -> str:
    """The machine's load average: other work on a 2-CPU box skews every figure."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(
    chosen: Sequence[Config],
    built: dict[str, Endpoints],
    samples: dict[str, list[Sample]],
    test: str,
) -> list[str]:
    """One table per test. Ratios to a twin are given twice: ratio of the medians, and the
    median of the per-round ratios ("paired": the twin was measured in the same round, so
    slow drifts of the machine's load cancel); the target verdict uses the paired one."""
    unit = "kpps" if test == "udp64" else "Gbit/s"
    scale = 1e-3 if test == "udp64" else 1.0

    def v(sample: Sample) -> float:
        return sample.value(test) * scale

    median = {name: statistics.median(v(s) for s in runs) for name, runs in samples.items()}
    base = median.get("underlay")
    width = max(len(c.name) for c in chosen)
    runs_width = max(len(" ".join(f"{v(s):.2f}" for s in r)) for r in samples.values())
    lines = [
        f"{'configuration':<{width}} {'MTU':>4} {'runs ' + unit:<{runs_width}} {'median':>7} "
        f"{'retr':>6} {'/underlay':>9}  to hand-configured twin: ratio of medians, paired "
        "(target)"
    ]
    for cfg in chosen:
        runs = samples[cfg.name]
        value = median[cfg.name]
        each = " ".join(f"{v(s):.2f}" for s in runs)
        retr = statistics.median(s.retransmits for s in runs)
        # IPv6 configurations compare with the IPv6 underlay when it was measured.
        own_base = median.get("underlay-v6", base) if "-v6" in cfg.name else base
        rel_base = f"{value / own_base:9.3f}" if own_base else f"{'-':>9}"
        versus = []
        for i, twin in enumerate(cfg.twins):
            if twin not in median or not median[twin]:
                continue
            pairs = zip(runs, samples[twin], strict=True)
            paired = statistics.median(v(a) / v(b) for a, b in pairs if v(b))
            text = f"/{twin} {value / median[twin]:.3f}, {paired:.3f}"
            if i == 0 and cfg.target is not None and test != "udp64":
                text += f" (>= {cfg.target:.2f}: {'met' if paired >= cfg.target else 'MISSED'})"
            versus.append(text)
        lines.append(
            f"{cfg.name:<{width}} {built[cfg.name].mtu:>4} {each:<{runs_width}} {value:7.2f} "
            f"{retr:6.0f} {rel_base}  {'; '.join(versus) or '-'}"
        )
    if "naive-udp" in median and "loden-udp" in median and median["naive-udp"]:
        ratio = median["loden-udp"] / median["naive-udp"]
        lines.append(f"loden-udp / naive-udp: {ratio:.2f}x")
    return lines


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="repeat the sequence R times")
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 -t per run")
    parser.add_argument(
        "--tests",
        nargs="+",
        choices=TESTS,
        default=list(TESTS),
        help="tcp1/tcp4: iperf3 TCP with 1/4 streams; udp64: 64-byte UDP, unlimited rate",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(BY_NAME),
        default=DEFAULT_CONFIGS,
        metavar="NAME",
        help=f"configurations to run (default: %(default)s; all: {' '.join(BY_NAME)})",
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flanneld argument for the Loden agents, e.g. --agent-arg=--ip-masq",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds and --seconds must be positive")
    tests = list(dict.fromkeys(args.tests))
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may start out ignored
        signal.signal(signum, _interrupt)
    chosen = [BY_NAME[name] for name in dict.fromkeys(args.configs)]
    iperf_version = subprocess.run(
        ["iperf3", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    print(f"command: {command_line()}; {load()}")
    print(
        f"kernel {platform.release()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"{' '.join(iperf_version)}; tests {' '.join(tests)}, {args.seconds:g} s per run, "
        f"{args.rounds} round(s), agent extra args: {args.agent_arg or 'none'}",
        flush=True,
    )
    print(
        f"vxlan TxChecksumOffload auto: {'on' if AUTO_TX_CHECKSUM else 'off'}"
        f" ({AUTO_TX_CHECKSUM_WHY})"
    )
    lab = Lab(args)
    samples = {t: {c.name: list[Sample]() for c in chosen} for t in tests}
    built: dict[str, Endpoints] = {}
    groups: dict[str, list[int]] = {}
    cpu = {c.name: AgentCPU() for c in chosen}
    began = time.monotonic()
    try:
        for cfg in chosen:
            t0 = time.monotonic()
            first = len(lab.agent_groups)
            built[cfg.name] = ends = cfg.build(lab)
            groups[cfg.name] = lab.agent_groups[first:]
            check_path(ends)
            print(f"  built {cfg.name:<17} in {time.monotonic() - t0:4.1f} s: {ends.note}")
        for rnd in range(args.rounds):
            shift = rnd % len(chosen)
            order = chosen[shift:] + chosen[:shift]
            for cfg in order:
                for test in tests:
                    before, t0 = cpu_by_group(), time.monotonic()
                    sample = iperf(built[cfg.name], args.seconds, test)
                    after, wall = cpu_by_group(), time.monotonic() - t0
                    for name, pgids in groups.items():
                        used = sum(after.get(g, 0.0) - before.get(g, 0.0) for g in pgids)
                        if name == cfg.name:
                            cpu[name].own += used
                            cpu[name].own_wall += wall
                            if test != "udp64":
                                cpu[name].tcp_cpu += used
                                cpu[name].tcp_bytes += sample.nbytes
                        else:
                            cpu[name].other += used
                            cpu[name].other_wall += wall
                    samples[test][cfg.name].append(sample)
                    shown = (
                        f"{sample.pps / 1000:6.1f} kpps"
                        if test == "udp64"
                        else f"{sample.gbps:6.2f} Gbit/s (retransmits {sample.retransmits})"
                    )
                    print(
                        f"  round {rnd + 1}/{args.rounds} {cfg.name:<17} {test:<5} {shown}",
                        flush=True,
                    )
    finally:
        lab.close()
    print()
    titles = {
        "tcp1": "pod -> pod TCP, 1 stream, Gbit/s",
        "tcp4": "pod -> pod TCP, 4 streams, Gbit/s",
        "udp64": "pod -> pod 64-byte UDP at an unlimited rate, thousand packets/s received",
    }
    for test in tests:
        print(f"{titles[test]}, median of {args.rounds} interleaved round(s)")
        for line in report(chosen, built, samples[test], test):
            print(line)
        print()
    print("CPU of each configuration's agents (% of one CPU): during its own runs (its data")
    print("path for udp and naive-udp), while the others were measured (idle agents), and")
    print("CPU seconds per GB moved in its own TCP runs")
    for name, pgids in groups.items():
        if pgids:
            use = cpu[name]
            own = 100 * use.own / use.own_wall if use.own_wall else 0.0
            other = 100 * use.other / use.other_wall if use.other_wall else 0.0
            per_gb = use.tcp_cpu / (use.tcp_bytes / 1e9) if use.tcp_bytes else 0.0
            print(
                f"  {name:<17} {len(pgids)} agents: own runs {own:6.1f} %, others' {other:5.1f} %,"
                f" {per_gb:6.2f} CPU s/GB"
            )
    print(f"total {time.monotonic() - began:.0f} s, {load()}; command: {command_line()}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: everything this run created has been removed", file=sys.stderr)
        raise SystemExit(130) from None
