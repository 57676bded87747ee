"""Which address families each backend serves, and the refusal for the rest.

flannel serves IPv6 (dual-stack since v0.15, IPv6-only since v0.18) on vxlan, host-gw
and wireguard; udp and ipip stay IPv4-only. A config that asks a backend for a family
it cannot carry is refused at validation with a message that says why and what to use,
instead of publishing an IPv6 subnet that no route ever reaches (issue 12: the data
plane used to ignore IPv6 silently).
"""

from __future__ import annotations

from typing import Final

from loden.errors import NetworkConfigError

#: Backends whose IPv6 data plane Loden builds (alloc programs nothing for any family).
IPV6_BACKENDS: Final = frozenset({"vxlan", "host-gw", "wireguard", "alloc"})
#: Backends that can run without IPv4 (flannel v0.18+ IPv6-only).
IPV6_ONLY_BACKENDS: Final = frozenset({"vxlan", "host-gw", "wireguard", "alloc"})

_IPV4_ONLY: Final = {
    "udp": "the udp backend is IPv4-only, as in flannel",
    "ipip": "the ipip backend is IPv4-only, as in flannel",
}


def check_families(backend_type: str, *, enable_ipv4: bool, enable_ipv6: bool) -> None:
    """Refuse a family the backend does not serve.

    :raises NetworkConfigError: ``EnableIPv6`` with an IPv4-only backend (or one whose
        IPv6 data plane is not built), or IPv6-only with a backend that needs IPv4.
    """
    kind = backend_type.lower()
    if enable_ipv6 and kind not in IPV6_BACKENDS:
        why = _IPV4_ONLY.get(kind, f"Loden has no IPv6 data plane for the {kind} backend")
        raise NetworkConfigError(
            f"EnableIPv6 is not supported with Backend.Type {kind!r}: {why}; use "
            f"{' or '.join(sorted(IPV6_BACKENDS - {'alloc'}))} for IPv6, or set EnableIPv6 "
            "to false",
            field="EnableIPv6",
            value=True,
        )
    if enable_ipv6 and not enable_ipv4 and kind not in IPV6_ONLY_BACKENDS:
        raise NetworkConfigError(
            f"IPv6-only (EnableIPv4 false) is not supported with Backend.Type {kind!r}: "
            f"use {' or '.join(sorted(IPV6_ONLY_BACKENDS - {'alloc'}))}, or enable IPv4",
            field="EnableIPv4",
            value=False,
        )


__all__ = ["IPV6_BACKENDS", "IPV6_ONLY_BACKENDS", "check_families"]
