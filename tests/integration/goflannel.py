"""A node left exactly as Go flanneld (v0.20.x, etcd v3) leaves it, built from the spec.

Go flanneld cannot run here, so its footprint is written by hand, from the contract
(spec §3.2 lease JSON and TTL, §5.1 subnet.env, §6.1/§6.2 kernel state, §7.2/§7.3
chains) and independently of Loden's code (the rule text is the spec's golden, not
:mod:`loden.traffic.iptables_rules`):

* the lease ``<prefix>/subnets/A.B.C.D-24`` with Go's compact JSON, on an etcd lease
  of 24 h;
* ``subnet.env`` in Go's order (NETWORK, SUBNET, MTU, IPMASQ);
* vxlan: ``flannel.<VNI>`` with a random MAC (``ip link add`` picks one, as netlink
  does for Go), ``nolearning``, port 8472, the subnet's network address as /32, and per
  peer a permanent neighbour, a permanent FDB entry and
  ``<subnet> via <subnet>.0 dev flannel.1 onlink`` with protocol ``boot`` (what
  vishvananda/netlink uses when none is given);
* host-gw: ``<subnet> via <peer public IP> dev eth0`` protocol ``boot``;
* ``FLANNEL-POSTRTG`` (nat) and ``FLANNEL-FWD`` (filter) with the spec's exact rules.

:func:`go_start_ready` states what Go checks when it starts on such a node, so "the way
back" can be tested against the same contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from tests.fixtures.topology import Namespace

GO_TTL = 86400


def go_chains(network: IPv4Network, subnet: IPv4Network) -> dict[str, list[str]]:
    """``iptables -t T -S`` lines Go flanneld v0.20 leaves (spec §7.2/§7.3 goldens)."""
    n, s = str(network), str(subnet)
    masq = '-m comment --comment "flanneld masq"'
    fwd = '-m comment --comment "flanneld forward"'
    return {
        "nat": [
            f"-A POSTROUTING {masq} -j FLANNEL-POSTRTG",
            "-N FLANNEL-POSTRTG",
            f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {s} -d {n} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {n} -d {s} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG ! -s {n} -d {s} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully",
            f"-A FLANNEL-POSTRTG ! -s {n} -d {n} {masq} -j MASQUERADE --random-fully",
        ],
        "filter": [
            f"-A FORWARD {fwd} -j FLANNEL-FWD",
            "-N FLANNEL-FWD",
            f"-A FLANNEL-FWD -s {n} {fwd} -j ACCEPT",
            f"-A FLANNEL-FWD -d {n} {fwd} -j ACCEPT",
        ],
    }


def install_go_chains(ns: Namespace, network: IPv4Network, subnet: IPv4Network) -> None:
    """The payload Go's bootstrap feeds ``iptables-restore --noflush`` (spec §7.2 step 3)."""
    chains = go_chains(network, subnet)
    payload: list[str] = []
    for table, lines in chains.items():
        payload.append(f"*{table}")
        payload += [f":{line.split()[1]} - [0:0]" for line in lines if line.startswith("-N")]
        payload += [line for line in lines if line.startswith("-A")]
        payload.append("COMMIT")
    ns.run("iptables-restore", "--noflush", input="\n".join(payload) + "\n")


def chain_lines(ns: Namespace) -> dict[str, list[str]]:
    """Flannel's lines as ``iptables -S`` prints them now (jumps, chains, rules)."""
    out: dict[str, list[str]] = {}
    for table in ("nat", "filter"):
        text = ns.out("iptables", "-t", table, "-S")
        out[table] = [line for line in text.splitlines() if "FLANNEL-" in line]
    return out


def normalise(lines: list[str]) -> list[str]:
    """iptables prints ``-N`` lines first; compare as sets of lines in chain order."""
    return sorted(lines)


@dataclass
class GoNode:
    """What was written for one node (to compare with after the switch)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    lease_value: str
    mac: str | None = None
    ifindex: int | None = None


def go_lease_value(public_ip: IPv4Address, backend: str, mac: str | None, vni: int = 1) -> str:
    """Go's LeaseAttrs JSON over etcd v3 (spec §3.2): PublicIPv6 null, compact."""
    attrs: dict[str, object] = {"PublicIP": str(public_ip), "PublicIPv6": None}
    if backend != "udp":
        attrs["BackendType"] = backend
    if backend == "vxlan":
        attrs["BackendData"] = {"VNI": vni, "VtepMAC": mac}
    return json.dumps(attrs, separators=(",", ":"))


def go_subnet_env(network: IPv4Network, subnet: IPv4Network, mtu: int) -> str:
    return (
        f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={subnet.network_address + 1}/"
        f"{subnet.prefixlen}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
    )


def link_mac_index(ns: Namespace, name: str) -> tuple[str, int]:
    info = json.loads(ns.ip("-j", "link", "show", name).stdout)[0]
    return str(info["address"]), int(info["ifindex"])


def go_start_ready(
    ns: Namespace, backend: str, node: GoNode, network: IPv4Network, port: int = 8472
) -> list[str]:
    """Why Go flanneld would not start cleanly on this node (empty: it would).

    Go reuses ``flannel.<VNI>`` only if ``isVxlanCompatible`` (VNI, local, port, no
    learning) holds, otherwise deletes and recreates it with a new random MAC (peers
    then hold a stale MAC); it reuses the lease with its public IP; it reads
    FLANNEL_SUBNET from subnet.env; it rewrites its chains (create-or-flush), so any
    content is fine, but two jumps would double-process packets.
    """
    problems: list[str] = []
    if backend == "vxlan":
        info = json.loads(ns.ip("-d", "-j", "link", "show", "flannel.1").stdout)[0]
        data = info["linkinfo"]["info_data"]
        if data.get("id") != 1 or data.get("port") != port or data.get("learning"):
            problems.append(f"flannel.1 not compatible with Go's config: {data}")
        if data.get("local") != str(node.public_ip):
            problems.append(f"flannel.1 local {data.get('local')} != {node.public_ip}")
        if info["address"] != node.mac:
            problems.append(f"flannel.1 MAC {info['address']} != lease MAC {node.mac}")
    for table, lines in chain_lines(ns).items():
        jumps = [line for line in lines if line.startswith(("-A POSTROUTING", "-A FORWARD"))]
        if len(jumps) != 1:
            problems.append(f"{table}: {len(jumps)} jumps to flannel's chain")
    return problems
