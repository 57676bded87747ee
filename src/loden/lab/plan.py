"""What a lab is made of: its name, options, addresses and the names of its parts.

A lab is identified by its name alone. Everything it creates is derived from the name,
so that several labs coexist and ``loden lab down`` can find every part of a lab even
when ``up`` was killed half-way:

* network namespaces ``loden-<name>-underlay``, ``loden-<name>-node<i>`` and
  ``loden-<name>-node<i>-pod<j>``; interface names never contain the lab name (they
  live inside the lab's own namespaces: ``br0``, ``node<i>``, ``eth0``, so they are
  short and cannot collide with another lab's);
* the work directory ``/run/loden-lab/<name>/`` (state.json, logs, etcd data, per-node
  private file trees, mount-namespace files, docker roots);
* ``LODEN_LAB=<name>`` in the environment of every process the lab starts.

The underlay /24 and the overlay Network are picked from a hash of the name, skipping
any that another lab already uses (``taken``), so two labs never share addresses even
though their namespaces would keep them apart anyway.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

from loden.errors import ConfigError, UsageError

LAB_ROOT = Path("/run/loden-lab")
BACKENDS = ("vxlan", "host-gw", "udp", "wireguard", "aws-vpc", "gce")
RUNTIMES = ("cni", "docker")
ETCD_MODES = ("single", "cluster")
ETCD_APIS = ("v3", "v2")
#: ``--ipv6``: ``dual`` adds IPv6 next to IPv4; ``only`` runs the overlay on IPv6 alone.
#: Either way the underlay is dual-stack (etcd, the control plane, stays on IPv4).
IPV6_MODES = ("off", "dual", "only")
#: Backends with an IPv6 data plane (udp is IPv4-only, as in flannel).
IPV6_BACKENDS = ("vxlan", "host-gw", "wireguard")
STORES = ("etcd", "kube")
HEALTHZ_PORT = 8471
ENV_MARKER = "LODEN_LAB"
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,19}")


def check_name(name: str) -> str:
    """Validate a lab name (``[a-z][a-z0-9-]{0,19}``); returns it.

    :raises UsageError: the name is unusable.
    """
    if not _NAME_RE.fullmatch(name) or name.endswith("-") or "--" in name:
        raise UsageError(
            f"invalid lab name {name!r}: use 1-20 characters a-z, 0-9 and '-', "
            "starting with a letter"
        )
    return name


def netns_prefix(name: str) -> str:
    """Every network namespace of lab ``name`` starts with this."""
    return f"loden-{name}-"


def pick_addresses(name: str, taken: Collection[IPv4Network]) -> tuple[IPv4Network, IPv4Network]:
    """(underlay /24, overlay /16) for ``name``: hash-derived, clear of ``taken``.

    :raises ConfigError: every candidate is taken (thousands of labs).
    """
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    for attempt in range(4096):
        h = digest + attempt * 7919
        underlay = IPv4Network(f"172.{16 + h % 16}.{(h >> 8) % 256}.0/24")
        overlay = IPv4Network(f"10.{64 + (h >> 16) % 64}.0.0/16")
        if not any(underlay.overlaps(t) or overlay.overlaps(t) for t in taken):
            return underlay, overlay
    raise ConfigError("no free lab address range left: run `loden lab down` on unused labs")


@dataclass(frozen=True, slots=True)
class LabPlan:
    """The options of ``loden lab up`` plus everything derived from them."""

    name: str
    nodes: int
    backend: str
    runtime: str
    etcd: str
    tls: bool
    etcd_api: str
    pods_per_node: int
    underlay: IPv4Network
    network: IPv4Network
    with_agent: bool = True
    ipv6: str = "off"
    store: str = "etcd"

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.nodes <= 50:
            raise UsageError(f"--nodes {self.nodes}: use 1 to 50 nodes")
        for value, allowed, flag in (
            (self.backend, BACKENDS, "--backend"),
            (self.runtime, RUNTIMES, "--runtime"),
            (self.etcd, ETCD_MODES, "--etcd"),
            (self.etcd_api, ETCD_APIS, "--etcd-api"),
            (self.store, STORES, "--store"),
        ):
            if value not in allowed:
                raise UsageError(f"{flag} {value!r}: use one of {', '.join(allowed)}")
        if self.store == "kube" and (
            self.runtime != "cni" or self.etcd != "single" or self.etcd_api != "v3" or self.tls
        ):
            raise UsageError(
                "--store kube runs an API server instead of etcd, with the CNI runtime: "
                "drop --runtime docker, --etcd, --etcd-api and --tls"
            )
        if not 0 <= self.pods_per_node <= 20:
            raise UsageError(f"--pods {self.pods_per_node}: use 0 to 20 pods per node")
        if self.ipv6 not in IPV6_MODES:
            raise UsageError(f"--ipv6 {self.ipv6!r}: use dual or only")
        if self.ipv6 != "off" and self.backend not in IPV6_BACKENDS:
            raise UsageError(
                f"--ipv6 {self.ipv6} with --backend {self.backend}: the {self.backend} "
                f"backend is IPv4-only, as in flannel; use {', '.join(IPV6_BACKENDS)}"
            )
        if self.ipv6 == "only" and self.runtime != "cni":
            raise UsageError(
                f"--ipv6 only with --runtime {self.runtime}: Docker's default bridge always "
                "needs an IPv4 subnet (--bip); use --ipv6 dual or --runtime cni"
            )
        if self.ipv6 != "off" and not self.with_agent:
            raise UsageError("--ipv6 needs the agent (no --no-agent)")
        if self.ipv6 != "off" and self.store == "kube":
            raise UsageError(
                "--ipv6 with --store kube is not implemented by the lab yet (the API server "
                "double would need dual-stack podCIDRs); use --store etcd"
            )

    # -- directories --------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return LAB_ROOT / self.name

    def node_dir(self, node: str) -> Path:
        return self.workdir / "nodes" / node

    def node_root(self, node: str) -> Path:
        """The node's private file tree: ``<root>/opt/kubernetes`` is its /opt/kubernetes."""
        return self.node_dir(node) / "fs"

    # -- names --------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return netns_prefix(self.name)

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}underlay"

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def pod_name(self, node: str, index: int) -> str:
        return f"{node}-pod{index}"

    def pod_ns(self, pod: str) -> str:
        return f"{self.prefix}{pod}"

    # -- addresses ----------------------------------------------------------------------

    @property
    def gateway(self) -> IPv4Interface:
        """The underlay bridge's own address (the nodes' default gateway)."""
        return IPv4Interface(f"{self.underlay.network_address + 1}/{self.underlay.prefixlen}")

    def node_address(self, node: str) -> IPv4Interface:
        index = int(node.removeprefix("node"))
        return IPv4Interface(
            f"{self.underlay.network_address + 10 + index}/{self.underlay.prefixlen}"
        )

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions of the overlay: (4,), (4, 6) or (6,)."""
        return {"off": (4,), "dual": (4, 6), "only": (6,)}[self.ipv6]

    @property
    def underlay6(self) -> IPv6Network:
        """The IPv6 underlay /64, derived from the IPv4 one (``172.b.c.0/24``)."""
        b, c = self.underlay.network_address.packed[1:3]
        return IPv6Network(f"fd6c:{b:x}:{c:x}::/64")

    @property
    def network6(self) -> IPv6Network:
        """The IPv6 overlay /56 (``IPv6Network``), derived from the IPv4 ``Network``."""
        return IPv6Network(f"fd6e:{self.network.network_address.packed[1]:x}::/56")

    @property
    def gateway6(self) -> IPv6Interface:
        return IPv6Interface((self.underlay6.network_address + 1, 64))

    def node_address6(self, node: str) -> IPv6Interface:
        index = int(node.removeprefix("node"))
        return IPv6Interface((self.underlay6.network_address + 10 + index, 64))

    def etcd_addresses(self) -> list[IPv4Address]:
        count = 3 if self.etcd == "cluster" else 1
        return [self.underlay.network_address + 2 + i for i in range(count)]

    @property
    def etcd_scheme(self) -> str:
        return "https" if self.tls else "http"

    def etcd_endpoints(self) -> str:
        """The comma-separated client URLs, as the seed passes them to flannel.sh."""
        return ",".join(f"{self.etcd_scheme}://{ip}:2379" for ip in self.etcd_addresses())

    def network_config(self) -> str:
        """The JSON the lab writes at ``/coreos.com/network/config`` (the seed's shape;
        with ``--ipv6``, flannel's dual-stack or IPv6-only keys)."""
        backend = f'"Backend": {{"Type": "{self.backend}"}}'
        v6 = f'"EnableIPv6": true, "IPv6Network": "{self.network6}"'
        if self.ipv6 == "dual":
            return f'{{"Network": "{self.network}", {v6}, {backend}}}'
        if self.ipv6 == "only":
            return f'{{"EnableIPv4": false, {v6}, {backend}}}'
        return f'{{"Network": "{self.network}", {backend}}}'

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "backend": self.backend,
            "runtime": self.runtime,
            "etcd": self.etcd,
            "tls": self.tls,
            "etcd_api": self.etcd_api,
            "pods_per_node": self.pods_per_node,
            "underlay": str(self.underlay),
            "network": str(self.network),
            "with_agent": self.with_agent,
            "ipv6": self.ipv6,
            "store": self.store,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LabPlan:
        """:raises ConfigError: the recorded plan is not readable."""
        try:
            return cls(
                name=str(data["name"]),
                nodes=int(str(data["nodes"])),
                backend=str(data["backend"]),
                runtime=str(data["runtime"]),
                etcd=str(data["etcd"]),
                tls=bool(data["tls"]),
                etcd_api=str(data["etcd_api"]),
                pods_per_node=int(str(data["pods_per_node"])),
                underlay=IPv4Network(str(data["underlay"])),
                network=IPv4Network(str(data["network"])),
                with_agent=bool(data.get("with_agent", True)),
                ipv6=str(data.get("ipv6", "off")),
                store=str(data.get("store", "etcd")),
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"unreadable lab plan in state.json: {exc}") from exc
