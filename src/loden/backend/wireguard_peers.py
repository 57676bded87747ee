"""wireguard backend, the part without I/O: options, lease data and the peers they ask for.

Kept apart from :mod:`loden.backend.wireguard` (devices, wireguard-go, netlink) so the
rules that decide who peers with whom, over which endpoint, are tested without a kernel,
and ``reconcile`` and ``apply`` share one computation of the target.

*One peer per key.* Two leases with the same public key (a node that got a new subnet
while its old lease lives on) become one peer whose AllowedIPs hold both subnets, as
WireGuard allows one peer per key.

*Modes.* ``separate``: IPv4 peers on ``flannel-wg``, IPv6 peers on ``flannel-wg-v6``
(port ``ListenPortV6``). ``ipv4``/``ipv6``/``auto``: one device, one peer per node
with both subnets, the endpoint picked by family (``auto``: IPv4 unless the peer's
IPv4 is RFC 1918 and both sides have non-ULA IPv6).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from loden.kernel.wireguard.keys import decode_key
from loden.kernel.wireguard.uapi import PeerConfig, endpoint_text
from loden.model.backend_options import (
    WIREGUARD_DEFAULT_PORT,
    WIREGUARD_DEFAULT_PORT_V6,
    WireguardMode,
    WireguardOptions,
)
from loden.model.gojson import GoJSONError, GoObject, as_int, as_str
from loden.model.lease import Lease

DEFAULT_PORT = WIREGUARD_DEFAULT_PORT
DEFAULT_PORT_V6 = WIREGUARD_DEFAULT_PORT_V6
_RFC1918 = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
_ULA = IPv6Network("fc00::/7")


Mode = WireguardMode


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device: its role (``v4``/``v6`` in separate mode, ``main`` otherwise)."""

    role: str
    name: str
    port: int
    v4: bool
    v6: bool


@dataclass(frozen=True, slots=True)
class PeerRules:
    """Everything :func:`lease_peers` needs besides the lease."""

    mode: Mode
    enable_ipv4: bool
    enable_ipv6: bool
    #: Listen ports of the devices that carry IPv4 / IPv6 (the "Port 0" fallback).
    port4: int
    port6: int
    own_v4: IPv4Address | None = None
    own_v6: IPv6Address | None = None
    psk: str | None = None
    keepalive: int = 0


@dataclass(frozen=True, slots=True)
class PeerData:
    public_key: str
    port: int


@functools.lru_cache(maxsize=16384)
def parse_peer_data(raw: str | None) -> PeerData | str:
    """``{"PublicKey":…,"Port":…}`` (Go JSON, keys case-insensitive, Port optional),
    or a one-line reason it is unusable."""
    if raw is None:
        return "no wireguard data in the lease"
    try:
        obj = GoObject.parse(raw)
        key = obj.get("PublicKey", as_str, "")
        port = obj.get("Port", as_int, 0)
    except GoJSONError as exc:
        return f"its wireguard data {_shown(raw)} does not parse ({exc})"
    if decode_key(key) is None:
        return f"its PublicKey {_shown(key)} is not a base64 WireGuard key"
    if not 0 <= port < 65536:
        return f"its Port {port} is not a UDP port"
    return PeerData(key.strip(), port)


def _shown(text: str) -> str:
    """``repr`` of lease text, cut short: a hostile lease must not flood the log."""
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _private4(ip: IPv4Address) -> bool:
    return any(ip in net for net in _RFC1918)


def select_mode(
    peer4: IPv4Address,
    peer6: IPv6Address | None,
    own4: IPv4Address | None,
    own6: IPv6Address | None,
) -> Mode:
    """flannel's ``auto`` endpoint choice (``selectMode``): IPv4 unless the peer's IPv4
    is private and both sides have non-ULA IPv6."""
    if peer6 is None:
        return Mode.IPV4
    if not _private4(peer4) and own4 is not None:
        return Mode.IPV4
    if peer6 not in _ULA and own6 is not None and own6 not in _ULA:
        return Mode.IPV6
    return Mode.IPV4


def lease_peers(lease: Lease, rules: PeerRules) -> dict[str, PeerConfig] | str:
    """The peer(s) one lease asks for, by device role, or a reason it gets none."""
    attrs = lease.attrs
    v4: PeerData | str | None = None
    v6: PeerData | str | None = None
    if rules.enable_ipv4 and attrs.backend_data is not None:
        v4 = parse_peer_data(attrs.backend_data)
    if (
        rules.enable_ipv6
        and lease.ipv6_subnet is not None
        and attrs.backend_v6_data is not None
        and attrs.public_ipv6 is not None
    ):
        v6 = parse_peer_data(attrs.backend_v6_data)
    where = f"wireguard: peer {lease.key} ({attrs.public_ip})"
    for data in (v4, v6):
        if isinstance(data, str):
            return f"{where}: {data}; skipped until its lease is fixed"
    if not isinstance(v4, PeerData) and not isinstance(v6, PeerData):
        return f"{where}: its lease has no wireguard data for an enabled address family"
    psk, keepalive = rules.psk, rules.keepalive

    def ep4(data: PeerData | None) -> str:
        return endpoint_text(attrs.public_ip, (data.port if data else 0) or rules.port4)

    def ep6(data: PeerData | None) -> str:
        return endpoint_text(attrs.public_ipv6, (data.port if data else 0) or rules.port6)

    if rules.mode is Mode.SEPARATE:
        out: dict[str, PeerConfig] = {}
        if isinstance(v4, PeerData):
            out["v4"] = PeerConfig.make(v4.public_key, ep4(v4), [lease.subnet], psk, keepalive)
        if isinstance(v6, PeerData) and lease.ipv6_subnet is not None:
            out["v6"] = PeerConfig.make(v6.public_key, ep6(v6), [lease.ipv6_subnet], psk, keepalive)
        return out
    subnets: list[IPv4Network | IPv6Network] = []
    if isinstance(v4, PeerData):
        subnets.append(lease.subnet)
    if isinstance(v6, PeerData) and lease.ipv6_subnet is not None:
        subnets.append(lease.ipv6_subnet)
    main = v6 if isinstance(v6, PeerData) else v4
    assert isinstance(main, PeerData)
    mode: Mode = rules.mode
    if mode is Mode.AUTO:
        mode = select_mode(attrs.public_ip, attrs.public_ipv6, rules.own_v4, rules.own_v6)
    if mode is Mode.IPV6:
        if attrs.public_ipv6 is None:
            return f"{where}: Mode ipv6 needs its PublicIPv6, which the lease does not have"
        endpoint = ep6(v6 if isinstance(v6, PeerData) else None)
    else:
        endpoint = ep4(v4 if isinstance(v4, PeerData) else None)
    return {"main": PeerConfig.make(main.public_key, endpoint, subnets, psk, keepalive)}


def desired_peers(
    leases: Iterable[Lease], rules: PeerRules, own_key: str
) -> tuple[dict[str, dict[str, PeerConfig]], list[str], list[str]]:
    """Per device role, the peers keyed by public key; plus skipped leases (one reason
    each) and warnings.

    Leases sharing a public key merge into one peer (AllowedIPs united; the endpoint of
    the most recently renewed lease wins). A lease carrying our own key (our own old
    lease after a subnet change) is skipped with a warning: WireGuard cannot peer
    with itself."""
    out: dict[str, dict[str, PeerConfig]] = {}
    skipped: list[str] = []
    warnings: list[str] = []
    ordered = sorted(leases, key=lambda lease: (lease.expiration or 0.0, lease.key))
    for lease in ordered:
        result = lease_peers(lease, rules)
        if isinstance(result, str):
            skipped.append(result)
            continue
        for role, peer in result.items():
            if peer.public_key == own_key:
                warnings.append(
                    f"wireguard: lease {lease.key} publishes this node's own public key"
                    " (an old lease of this node, or a copied key file): skipped"
                )
                continue
            table = out.setdefault(role, {})
            old = table.get(peer.public_key)
            if old is not None:
                if old.endpoint != peer.endpoint:
                    warnings.append(
                        f"wireguard: public key {peer.public_key} is published with endpoints"
                        f" {old.endpoint} and {peer.endpoint} (a copied key file?): using"
                        f" {peer.endpoint} from lease {lease.key}"
                    )
                peer = PeerConfig.make(
                    peer.public_key,
                    peer.endpoint,
                    old.allowed_ips + peer.allowed_ips,
                    peer.preshared_key,
                    peer.keepalive,
                )
            table[peer.public_key] = peer
    return out, skipped, warnings


def lease_keys(lease: Lease) -> set[str]:
    """The WireGuard public keys a lease publishes (IPv4 and IPv6 data)."""
    keys: set[str] = set()
    for raw in (lease.attrs.backend_data, lease.attrs.backend_v6_data):
        key = None if raw is None else _key_of(raw)
        if key is not None:
            keys.add(key)
    return keys


@functools.lru_cache(maxsize=16384)
def _key_of(raw: str) -> str | None:
    # Cached: every sync checks every peer, and the texts rarely change.
    data = parse_peer_data(raw)
    return None if isinstance(data, str) else data.public_key


def _node(lease: Lease) -> tuple[object, ...]:
    return (lease.attrs.public_ip, lease.attrs.public_ipv6)


def key_conflicts(leases: Iterable[Lease], own_key: str, own: Lease) -> list[str]:
    """Leases of *other* nodes (another public IP) that publish our own public key, and
    public keys published by two other nodes: one line each, for the log and /healthz.

    WireGuard routes by key, so one key on two nodes sends both nodes' traffic to
    whichever endpoint was written last. An own key in a lease of our own public IP is
    our own older lease and no conflict (``desired_peers`` skips it).
    """
    out: list[str] = []
    seen: dict[str, Lease] = {}
    for lease in sorted(leases, key=lambda lease: lease.key):
        if lease.attrs.backend_type != "wireguard" or _node(lease) == _node(own):
            continue
        for key in sorted(lease_keys(lease)):
            if key == own_key:
                out.append(
                    f"wireguard: peer {lease.key} ({lease.attrs.public_ip}) publishes this"
                    f" node's own public key {key}: not programmed. Two nodes share one key"
                    " file (copied?): delete the key file on one of them and restart it"
                )
                continue
            first = seen.setdefault(key, lease)
            if first is not lease and _node(first) != _node(lease):
                out.append(
                    f"wireguard: public key {key} is published by two nodes, {first.key}"
                    f" ({first.attrs.public_ip}) and {lease.key} ({lease.attrs.public_ip}):"
                    " only one of them gets traffic. Delete the key file on one of them and"
                    " restart it"
                )
    return out


def peer_changes(
    want: Mapping[str, PeerConfig], have: Mapping[str, PeerConfig]
) -> tuple[list[PeerConfig], list[str]]:
    """(peers to write, public keys to remove) that turn ``have`` into ``want``."""
    upserts = [peer for key, peer in want.items() if have.get(key) != peer]
    removes = [key for key in have if key not in want]
    return upserts, removes


__all__ = [
    "DevicePlan",
    "Mode",
    "PeerRules",
    "WireguardOptions",
    "desired_peers",
    "key_conflicts",
    "lease_keys",
    "lease_peers",
    "parse_peer_data",
    "peer_changes",
    "select_mode",
]
