"""Kernel switches: ``ip_forward``, ``br_netfilter``, ``rp_filter`` on the flannel devices."""

from __future__ import annotations

from loden.doctor.base import Context, Finding, read_sysctl

FLANNEL_DEVICES = ("flannel.", "flannel0", "flannel-wg", "cni0")


async def check_forwarding(ctx: Context) -> list[Finding]:
    value = read_sysctl("net/ipv4/ip_forward")
    if value == "1" or value is None:
        return []
    return [
        Finding(
            "sysctl/ip-forward",
            "IPv4 forwarding is off: pod traffic does not leave or reach this node",
            f"net.ipv4.ip_forward = {value}",
            "sysctl -w net.ipv4.ip_forward=1 and persist it in /etc/sysctl.d/",
        )
    ]


async def check_br_netfilter(ctx: Context) -> list[Finding]:
    config = ctx.config
    if config is not None and config.enable_nftables:
        return []
    value = read_sysctl("net/bridge/bridge-nf-call-iptables")
    if value == "1":
        return []
    evidence = (
        "/proc/sys/net/bridge/bridge-nf-call-iptables does not exist (br_netfilter not loaded)"
        if value is None
        else f"net.bridge.bridge-nf-call-iptables = {value}"
    )
    return [
        Finding(
            "sysctl/br-netfilter",
            "bridged pod traffic bypasses iptables: Service (kube-proxy) and masquerade "
            "rules do not see pod-to-pod traffic on cni0",
            evidence,
            "modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1 "
            "(persist both in /etc/modules-load.d and /etc/sysctl.d)",
        )
    ]


async def check_rp_filter(ctx: Context) -> list[Finding]:
    base = read_sysctl("net/ipv4/conf/all/rp_filter") or "0"
    findings: list[Finding] = []
    for link in ctx.links:
        if not link.name.startswith(FLANNEL_DEVICES):
            continue
        own = read_sysctl(f"net/ipv4/conf/{link.name}/rp_filter") or "0"
        effective = max(int(base), int(own))  # the kernel uses the larger of the two
        if effective == 1:
            findings.append(
                Finding(
                    "sysctl/rp-filter",
                    f"strict reverse-path filtering on {link.name} drops overlay packets whose "
                    "source is routed elsewhere (asymmetric paths, DirectRouting)",
                    f"net.ipv4.conf.all.rp_filter = {base}, "
                    f"net.ipv4.conf.{link.name}.rp_filter = {own} (effective 1 = strict)",
                    f"sysctl -w net.ipv4.conf.{link.name.replace('.', '/')}.rp_filter=2 "
                    "(loose) and "
                    "net.ipv4.conf.all.rp_filter=2 if that is 1",
                )
            )
    return findings
