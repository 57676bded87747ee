"""subnet.env read the flannel CNI plugin's way (spec §9.2), and Go's address parsers.

The plugin's reader is much stricter than a shell: line by line, split at the first
``=``, no quotes, no ``export``; each value is parsed with Go's ``net.ParseCIDR`` rules
and errors carry Go's messages.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from loden.errors import ParseError

Network = IPv4Network | IPv6Network


# --------------------------------------------------------------------------------------
# Addresses, Go style.

_PREFIX_RE = re.compile(r"[0-9]+")


def parse_ip(text: str) -> IPv4Address | IPv6Address:
    """Go's ``net.ParseIP``: dotted quad or IPv6 text; no zone, no whitespace.

    :raises ParseError: ``invalid IP address: <text>``.
    """
    if "%" in text or text.strip() != text:
        raise ParseError(f"invalid IP address: {text}")
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise ParseError(f"invalid IP address: {text}") from exc


def parse_cidr(text: str) -> tuple[IPv4Address | IPv6Address, Network]:
    """Go's ``net.ParseCIDR``: the address as written and its network (host bits off).

    :raises ParseError: ``invalid CIDR address: <text>`` (Go's message).
    """
    addr, sep, bits = text.partition("/")
    if not sep or not _PREFIX_RE.fullmatch(bits) or len(bits) > 8:
        raise ParseError(f"invalid CIDR address: {text}")
    try:
        ip = parse_ip(addr)
    except ParseError as exc:
        raise ParseError(f"invalid CIDR address: {text}") from exc
    prefix = int(bits)
    if prefix > ip.max_prefixlen:
        raise ParseError(f"invalid CIDR address: {text}")
    return ip, ipaddress.ip_network((ip, prefix), strict=False)


# --------------------------------------------------------------------------------------
# subnet.env, the plugin's way.

_MAX_LINE = 64 * 1024  # bufio.Scanner's default token limit
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class FlannelSubnetEnv:
    """What the plugin takes from ``subnet.env`` (all optional until validated)."""

    networks: tuple[Network, ...] = ()
    subnet: Network | None = None
    ipv6_networks: tuple[Network, ...] = ()
    ipv6_subnet: Network | None = None
    mtu: int | None = None
    ipmasq: bool | None = None

    def missing(self) -> str:
        """The comma-separated names flannel lists as missing ("" if complete)."""
        names: list[str] = []
        if not self.networks and not self.ipv6_networks:
            names += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
        if self.subnet is None and self.ipv6_subnet is None:
            names += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
        if self.mtu is None:
            names.append("FLANNEL_MTU")
        if self.ipmasq is None:
            names.append("FLANNEL_IPMASQ")
        return ", ".join(names)


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _parse_networks(value: str) -> tuple[Network, ...]:
    found: list[Network] = []
    for item in value.split(","):
        _, network = parse_cidr(item)
        if network not in found:
            found.append(network)
    return tuple(found)


def _parse_mtu(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise ParseError(f"strconv.ParseUint: parsing {_go_quote(value)}: invalid syntax")
    number = int(value)
    if number > _UINT32_MAX:
        raise ParseError(f"strconv.ParseUint: parsing {_go_quote(value)}: value out of range")
    return number


def parse_subnet_env(text: str, path: str) -> FlannelSubnetEnv:
    """Parse ``subnet.env`` exactly like flannel's ``loadFlannelSubnetEnv``.

    Each recognised line replaces the earlier value of its key; other keys are
    ignored. A recognised key without ``=`` is an error (flannel's Go code panics).

    :raises ParseError: a value does not parse (Go's message), or keys are missing
        (``<path> is missing FLANNEL_MTU, ...``).
    """
    networks: tuple[Network, ...] = ()
    ipv6_networks: tuple[Network, ...] = ()
    subnet: Network | None = None
    ipv6_subnet: Network | None = None
    mtu: int | None = None
    ipmasq: bool | None = None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    known = {
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_NETWORK",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    }
    for number, raw_line in enumerate(lines, start=1):
        if len(raw_line.encode("utf-8", "surrogateescape")) > _MAX_LINE:
            raise ParseError("bufio.Scanner: token too long")
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        key, sep, value = line.partition("=")
        if key not in known:
            continue
        if not sep:
            raise ParseError(f"{path}: line {number}: {key} has no '=' and no value")
        if key == "FLANNEL_NETWORK":
            networks = _parse_networks(value)
        elif key == "FLANNEL_SUBNET":
            subnet = parse_cidr(value)[1]
        elif key == "FLANNEL_IPV6_NETWORK":
            ipv6_networks = _parse_networks(value)
        elif key == "FLANNEL_IPV6_SUBNET":
            ipv6_subnet = parse_cidr(value)[1]
        elif key == "FLANNEL_MTU":
            mtu = _parse_mtu(value)
        else:
            ipmasq = value == "true"
    env = FlannelSubnetEnv(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq)
    missing = env.missing()
    if missing:
        raise ParseError(f"{path} is missing {missing}")
    return env
