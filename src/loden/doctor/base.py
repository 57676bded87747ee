"""What every check gets (:class:`Context`) and gives back (:class:`Finding`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from loden.kernel.netlink import Link, Netlink
from loden.model.config import NetworkConfig
from loden.model.lease import Lease
from loden.settings import AgentSettings
from loden.status.collect import StoreView, env_subnet


@dataclass(frozen=True, slots=True)
class Finding:
    #: Stable identifier (``area/what``), for scripts and tests.
    check: str
    what: str
    evidence: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "what": self.what, "evidence": self.evidence, "fix": self.fix}


@dataclass
class Context:
    """What the checks look at, gathered once."""

    settings: AgentSettings
    nl: Netlink
    store: StoreView
    #: subnet.env as read by :func:`loden.status.collect.read_subnet_env`.
    env: dict[str, Any]
    agent: dict[str, Any] | None
    agent_error: str
    #: Path of Docker's daemon.json (``-docker-config``).
    docker_config: Path
    #: Seconds over which counters are sampled (checksum errors).
    sample_seconds: float
    links: list[Link] = field(default_factory=list)

    @property
    def config(self) -> NetworkConfig | None:
        return self.store.config

    @property
    def env_values(self) -> dict[str, str]:
        values = self.env.get("values")
        return values if isinstance(values, dict) else {}

    @property
    def subnet(self) -> IPv4Network | None:
        return env_subnet(self.env)

    @property
    def own(self) -> Lease | None:
        subnet = self.subnet
        return next((le for le in self.store.leases if le.subnet == subnet), None)

    @property
    def peers(self) -> list[Lease]:
        own = self.own
        return [le for le in self.store.leases if own is None or le.key != own.key]

    def link(self, name: str) -> Link | None:
        return next((link for link in self.links if link.name == name), None)

    def flannel_mtu(self) -> int | None:
        try:
            return int(self.env_values.get("FLANNEL_MTU", ""))
        except ValueError:
            return None


Check = Callable[[Context], Awaitable[list[Finding]]]


def read_sysctl(key: str) -> str | None:
    """``key`` with slashes (``net/ipv4/conf/flannel.1/rp_filter``): device names have dots."""
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None
