"""Kernel devices and entries: ``flannel.<VNI>`` left with another VNI, port or local
IP; host-gw peers that are not on-link; entries missing or extra against the leases."""

from __future__ import annotations

from loden.backend.vxlan import VxlanOptions
from loden.doctor.base import Context, Finding
from loden.status.expected import expected_entries, kernel_diff


async def check_vxlan_device(ctx: Context) -> list[Finding]:
    config, own = ctx.config, ctx.own
    if config is None or config.backend_type != "vxlan":
        return []
    options = VxlanOptions.from_config(config)
    name = f"flannel.{options.vni}"
    findings: list[Finding] = []
    for link in ctx.links:
        if not link.name.startswith("flannel.") or link.vxlan is None:
            continue
        spec = link.vxlan
        wrong: list[str] = []
        if link.name == name:
            if spec.vni != options.vni:
                wrong.append(f"VNI {spec.vni}, config {options.vni}")
            if spec.port and spec.port != options.port:
                wrong.append(f"port {spec.port}, config {options.port}")
            if own is not None and spec.local is not None and spec.local != own.attrs.public_ip:
                wrong.append(f"local {spec.local}, lease PublicIP {own.attrs.public_ip}")
        elif link.name.removeprefix("flannel.") != str(spec.vni):
            wrong.append(f"VNI {spec.vni} does not match its name")
        if wrong:
            findings.append(
                Finding(
                    "vxlan/device-mismatch",
                    f"{link.name} is not the device this config needs: vxlan packets go to "
                    "the wrong port/VNI or leave from the wrong address",
                    f"ip -d link show {link.name}: " + "; ".join(wrong),
                    f"ip link del {link.name} and restart the agent (it recreates the device "
                    "with the MAC kept in its state dir)",
                )
            )
    return findings


async def check_hostgw_onlink(ctx: Context) -> list[Finding]:
    config, own = ctx.config, ctx.own
    if config is None or own is None or config.backend_type != "host-gw":
        return []
    _, skipped = await expected_entries(ctx.nl, config, own, ctx.peers, None)
    if not skipped:
        return []
    return [
        Finding(
            "host-gw/not-on-link",
            f"{len(skipped)} host-gw peer(s) are not on this node's layer-2 segment: no "
            "route can reach their pods",
            "; ".join(skipped[:10]),
            "host-gw needs every node on one L2 segment: use vxlan with "
            '"DirectRouting": true (routes where possible, vxlan elsewhere)',
        )
    ]


async def check_kernel_entries(ctx: Context) -> list[Finding]:
    config, own = ctx.config, ctx.own
    if config is None or own is None:
        return []
    diff = await kernel_diff(ctx.nl, config, own, ctx.peers)
    if diff.in_sync or (diff.problem and ctx.agent is None and not ctx.links):
        return []
    evidence = diff.problem or "; ".join(
        [f"missing {m}" for m in diff.missing[:5]] + [f"extra {e}" for e in diff.extra[:5]]
    )
    return [
        Finding(
            "kernel/drift",
            f"the kernel does not hold what the leases need ({len(diff.missing)} missing, "
            f"{len(diff.extra)} extra{', ' + diff.problem if diff.problem else ''})",
            evidence,
            "a running agent repairs this within -resync-period seconds: check that it runs "
            "(`loden status`) and read its log for errors",
        )
    ]
