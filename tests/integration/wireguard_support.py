"""Helpers for the wireguard tests: a Cluster with unique device names, ``wg show``,
ping timelines (restart gaps) and packet captures."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

from loden.backend.base import BackendContext
from loden.backend.wireguard import WireguardNetwork
from loden.model.config import NetworkConfig
from tests.fixtures.topology import Host, Namespace, Topology
from tests.integration.dataplane_support import Cluster, Node


class WgCluster(Cluster):
    """:class:`Cluster` for wireguard: per-run device names and per-host key files.

    wireguard-go's UAPI sockets share /var/run/wireguard across namespaces, so every
    host's device gets a name unique to this run (``wg<token><i>``)."""

    def __init__(self, topo: Topology, **options: Any) -> None:
        super().__init__(topo, "wireguard")
        backend = json.dumps({"Type": "wireguard", **options})
        self.config = NetworkConfig.parse(
            f'{{"Network":"{self.network}","SubnetLen":24,"Backend":{backend}}}'
        )

    def device(self, host: Host) -> str:
        return f"wg{self.topo.token}{host.index}"

    async def context(self, host: Host) -> BackendContext:
        ctx = await super().context(host)
        settings = replace(
            ctx.settings,
            wireguard_device=self.device(host),
            wireguard_device_v6=f"{self.device(host)}v6",
            wireguard_key_file=host.state_dir / "wg" / "wgkey",
        )
        return replace(ctx, settings=settings)


def wg_network(node: Node) -> WireguardNetwork:
    assert isinstance(node.network, WireguardNetwork)
    return node.network


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    endpoint: str
    allowed_ips: str
    keepalive: str


def wg_show(ns: Namespace | None, dev: str, *, pid: int | None = None) -> dict[str, WgPeer]:
    """``wg show <dev> dump`` peers by public key (``pid``: enter that process's mount
    and network namespaces, where an agent's private /var/run/wireguard lives)."""
    if pid is not None:
        argv = ["nsenter", f"--target={pid}", "--mount", "--net", "wg", "show", dev, "dump"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
    else:
        assert ns is not None
        out = ns.out("wg", "show", dev, "dump")
    peers = {}
    for line in out.splitlines()[1:]:
        fields = line.split("\t")
        peers[fields[0]] = WgPeer(fields[0], fields[2], fields[3], fields[7])
    return peers


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


def start_ping(ns: Namespace, dst: IPv4Address, *, interval: float, seconds: float) -> Any:
    """A timestamped ping (``-D``) running in the background for ``seconds``."""
    return subprocess.Popen(
        ns.argv(["ping", "-n", "-D", "-i", str(interval), "-w", str(seconds), str(dst)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_ping(proc: Any, timeout: float = 10.0) -> str:
    """End a :func:`start_ping` run (SIGINT: ping prints its summary) and return its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return str(out)


def longest_gap(output: str, *, until: float | None = None) -> tuple[float, int]:
    """(longest time between two consecutive replies, replies) of a ``ping -D`` run;
    ``until`` (``time.time()`` at the end) also counts a stall that never ended."""
    stamps = [float(m.group(1)) for line in output.splitlines() if (m := _REPLY.match(line))]
    if until is not None:
        stamps.append(until)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return (max(gaps) if gaps else float("inf")), len(stamps)
