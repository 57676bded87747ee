"""MTU agreement: the flannel device, ``cni0``, pod veths and Docker against FLANNEL_MTU.

A pod MTU above what the overlay carries makes large packets vanish (TCP stalls after
the handshake) while pings pass: pain point 10.
"""

from __future__ import annotations

import json
from pathlib import Path

from loden.doctor.base import Context, Finding
from loden.status.expected import vxlan_device


def _docker_mtu(ctx: Context) -> tuple[int | None, str]:
    try:
        data = json.loads(ctx.docker_config.read_text())
    except (OSError, ValueError):
        return None, ""
    mtu = data.get("mtu") if isinstance(data, dict) else None
    return (mtu if isinstance(mtu, int) else None), str(ctx.docker_config)


async def check_mtu(ctx: Context) -> list[Finding]:
    mtu = ctx.flannel_mtu()
    if mtu is None:
        return []
    findings: list[Finding] = []
    too_big: list[str] = []
    cni0 = ctx.link("cni0")
    backend = ctx.config.backend_type if ctx.config else ""
    device = {"vxlan": None, "udp": "flannel0", "wireguard": "flannel-wg"}.get(backend)
    if backend == "vxlan" and ctx.config is not None:
        device = vxlan_device(ctx.config)
    flannel = ctx.link(device) if device else None
    if flannel is not None and flannel.mtu != mtu:
        findings.append(
            Finding(
                "mtu/flannel-device",
                f"{flannel.name} has MTU {flannel.mtu}, subnet.env says {mtu}",
                f"ip link show {flannel.name}: mtu {flannel.mtu}; FLANNEL_MTU={mtu}",
                "restart the agent (it sets the device MTU) or fix Backend.MTU in the config",
            )
        )
    if cni0 is not None:
        if cni0.mtu > mtu:
            too_big.append(f"cni0 mtu {cni0.mtu}")
        ports = bridge_ports("cni0")
        for link in ctx.links:
            if link.name in ports and link.mtu > mtu:
                too_big.append(f"{link.name} (on cni0) mtu {link.mtu}")
    docker0 = ctx.link("docker0")
    if docker0 is not None and docker0.mtu > mtu:
        too_big.append(f"docker0 mtu {docker0.mtu}")
    docker_mtu, path = _docker_mtu(ctx)
    if docker_mtu is not None and docker_mtu != mtu:
        too_big.append(f'{path} "mtu": {docker_mtu}')
    if too_big:
        findings.append(
            Finding(
                "mtu/pods",
                f"pod-side MTU above the overlay's {mtu}: large packets are dropped "
                "(connections hang after the handshake, ping works)",
                "; ".join(too_big[:10]) + f"; FLANNEL_MTU={mtu}",
                "give the CNI bridge plugin and Docker the MTU from subnet.env (the flannel CNI "
                "plugin does; Docker: --mtu=$FLANNEL_MTU via mk-docker-opts), then recreate "
                "the pods",
            )
        )
    return findings


def bridge_ports(bridge: str) -> set[str]:
    """Names of the ports of ``bridge`` (sysfs of the current network namespace)."""
    try:
        return {p.name for p in Path(f"/sys/class/net/{bridge}/brif").iterdir()}
    except OSError:
        return set()
