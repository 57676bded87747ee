"""The agent's ``/status`` document: its lease, its peers and its data plane.

Built on request from the live objects (no copy kept in the agent), so it costs nothing
until someone asks. Field names are the JSON contract of ``loden status --json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from loden import __version__
from loden.model.lease import Lease

if TYPE_CHECKING:
    from loden.agent_loops import AgentLoops


def lease_json(lease: Lease, now: float | None = None) -> dict[str, object]:
    """One lease as ``/status`` and ``loden status --json`` show it."""
    data = lease.attrs.data()
    detail: dict[str, object] = data if isinstance(data, dict) else {}
    ttl = lease.ttl_remaining(time.time() if now is None else now)
    return {
        "key": lease.key,
        "subnet": str(lease.subnet),
        "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
        "public_ip": str(lease.attrs.public_ip),
        "public_ipv6": str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else None,
        "backend_type": lease.attrs.backend_type,
        "vtep_mac": detail.get("VtepMAC"),
        "vni": detail.get("VNI"),
        "wireguard_key": detail.get("PublicKey"),
        "reserved": lease.reserved,
        "expires_at": lease.expiration,
        "ttl_seconds": None if ttl is None else round(ttl),
    }


def peers_json(peers: Mapping[str, Lease]) -> list[dict[str, object]]:
    now = time.time()
    return [lease_json(peers[key], now) for key in sorted(peers)]


def describer(loops: AgentLoops, started_wall: float) -> Callable[[], dict[str, object]]:
    """The ``HealthState.describe`` callback for a running agent."""

    def describe() -> dict[str, object]:
        config = loops.config
        return {
            "agent": {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": started_wall,
                "subnet_file": str(loops.settings.subnet_file),
                "state_dir": str(loops.settings.state_dir),
            },
            "config": {
                "network": str(config.network) if config.network else None,
                "ipv6_network": str(config.ipv6_network) if config.ipv6_network else None,
                "subnet_len": config.subnet_len,
                "backend_type": config.backend_type,
                "backend": config.backend.raw,
                "raw": config.raw,
            },
            "lease": lease_json(loops.lease),
            "mtu": loops.network.mtu,
            "peers": peers_json(loops.watcher.peers),
            "watch_restarts": loops.manager.watch_restarts,
        }

    return describe
