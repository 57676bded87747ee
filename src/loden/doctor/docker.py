"""Docker's bridge outside FLANNEL_SUBNET: containers get addresses no peer routes to."""

from __future__ import annotations

import json
from ipaddress import IPv4Interface

from loden.doctor.base import Context, Finding


async def check_docker_bip(ctx: Context) -> list[Finding]:
    subnet = ctx.subnet
    if subnet is None:
        return []
    found: list[str] = []
    docker0 = ctx.link("docker0")
    if docker0 is not None:
        for address in await ctx.nl.addresses(docker0.index):
            iface = address.interface
            if isinstance(iface, IPv4Interface) and iface.ip not in subnet:
                found.append(f"docker0 has {iface}")
    try:
        data = json.loads(ctx.docker_config.read_text())
    except (OSError, ValueError):
        data = None
    bip = data.get("bip") if isinstance(data, dict) else None
    if isinstance(bip, str):
        try:
            if IPv4Interface(bip).ip not in subnet:
                found.append(f'{ctx.docker_config} has "bip": "{bip}"')
        except ValueError:
            found.append(f'{ctx.docker_config} has an invalid "bip": "{bip}"')
    if not found:
        return []
    return [
        Finding(
            "docker/bip",
            f"Docker's bridge is outside this node's subnet {subnet}: containers get "
            "addresses that no other node routes here",
            "; ".join(found) + f"; FLANNEL_SUBNET={ctx.env_values.get('FLANNEL_SUBNET')}",
            "start dockerd with the options from subnet.env: `loden mk-docker-opts` "
            "(--bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU), then restart Docker",
        )
    ]
