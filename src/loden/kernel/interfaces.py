"""External interface and public IP selection (flannel ``pkg/ipmatch``, spec §8.4).

The order is flannel's: with no ``--iface``/``--iface-regex``/``--iface-can-reach``, the
interface owning ``--public-ip`` (or ``--public-ipv6``), else the default-route
interface. Otherwise each ``--iface`` value (an IP: the interface carrying exactly it;
else a name), then each ``--iface-regex`` (tested against the interfaces' addresses
first, then against their names), then ``--iface-can-reach`` (route lookup); the first
candidate that yields a usable address wins and later ones are not looked at.

Unlike flannel, every rejected candidate leaves a reason, and the final error lists
them together with every interface and its addresses, because "Failed to find
interface to use" on a multi-NIC host is the start of many support threads (pain
point 11). The chosen interface comes back with a one-line human reason that the
agent logs prominently ("chose eth0 (10.1.2.3): default route interface").

The decision itself is :func:`choose`, a pure function over a :class:`HostView`
snapshot, so every flag form is unit-testable without a kernel; :func:`select`
gathers the snapshot through :class:`~loden.kernel.netlink.Netlink`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from loden.backend.base import ExternalInterface
from loden.errors import InterfaceError
from loden.kernel.netlink import Address, IPAddress, Link, Netlink, RouteLookup


@dataclass(frozen=True, slots=True)
class InterfaceOptions:
    """The selection flags, already parsed (``--iface`` values are names or IPs)."""

    ifaces: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    can_reach: IPAddress | None = None
    public_ip: IPv4Address | None = None
    public_ipv6: IPv6Address | None = None
    ipv4: bool = True
    ipv6: bool = False


@dataclass(frozen=True, slots=True)
class HostView:
    """What selection looks at: links in kernel order, their addresses, default routes."""

    links: tuple[Link, ...]
    addresses: Mapping[int, tuple[Address, ...]]
    #: Output interface index of the first default route (None: no default route;
    #: 0: a default route without an interface, e.g. multipath).
    default_v4: int | None = None
    default_v6: int | None = None
    #: Answer of a route lookup for ``InterfaceOptions.can_reach``.
    reach: RouteLookup | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    ext: ExternalInterface
    reason: str


def usable(addrs: Sequence[Address], version: int) -> list[Address]:
    """Usable addresses of one family in preference order (flannel's rules).

    Global or link-local unicast, not deprecated; global before link-local, permanent
    before dynamic, non-temporary before temporary; stable otherwise (kernel order).
    """
    out = [
        a
        for a in addrs
        if a.ip.version == version
        and not a.deprecated
        and not a.ip.is_loopback
        and not a.ip.is_multicast
        and not a.ip.is_unspecified
    ]
    return sorted(out, key=lambda a: (a.ip.is_link_local, not a.permanent, a.temporary))


def choose(view: HostView, opts: InterfaceOptions) -> Selection:
    """Pick the external interface and addresses; see the module docstring.

    :raises InterfaceError: nothing matches; the message lists what was tried and every
        interface with its addresses.
    """
    if not opts.ipv4 and not opts.ipv6:
        raise InterfaceError("neither IPv4 nor IPv6 is enabled: nothing to select")
    if not (opts.ifaces or opts.regexes or opts.can_reach):
        return _default(view, opts)
    rejected: list[str] = []
    for value in opts.ifaces:
        result = _by_iface(view, opts, value)
        if isinstance(result, Selection):
            return result
        rejected.append(f"--iface={value}: {result}")
    for pattern in opts.regexes:
        result = _by_regex(view, opts, pattern)
        if isinstance(result, Selection):
            return result
        rejected.append(f"--iface-regex={pattern}: {result}")
    if opts.can_reach is not None:
        result = _by_reach(view, opts)
        if isinstance(result, Selection):
            return result
        rejected.append(f"--iface-can-reach={opts.can_reach}: {result}")
    raise InterfaceError(
        "failed to find an interface that matches the interfaces and/or regexes provided ("
        + "; ".join(rejected)
        + f"); interfaces: {describe(view)}; fix --iface/--iface-regex/--iface-can-reach"
    )


def describe(view: HostView) -> str:
    """``name:[ip, ...]`` for every interface, as flannel's error prints them."""
    parts = []
    for link in view.links:
        ips = ", ".join(str(a.ip) for a in view.addresses.get(link.index, ()))
        parts.append(f"{link.name}:[{ips}]")
    return " ".join(parts) or "(none)"


def _finish(
    view: HostView,
    opts: InterfaceOptions,
    link: Link,
    why: str,
    v4: IPv4Address | None = None,
    v6: IPv6Address | None = None,
) -> Selection | str:
    """Fill in missing addresses and the public IPs; a string explains a rejection."""
    if link.mtu <= 0:
        return f"interface {link.name} reports MTU {link.mtu}"
    addrs = view.addresses.get(link.index, ())
    if opts.ipv4 and v4 is None:
        found4 = usable(addrs, 4)
        if not found4:
            return f"failed to find IPv4 address for interface {link.name}"
        ip4 = found4[0].ip
        assert isinstance(ip4, IPv4Address)
        v4 = ip4
    if opts.ipv6 and v6 is None:
        if opts.public_ipv6 is not None and any(a.ip == opts.public_ipv6 for a in addrs):
            v6 = opts.public_ipv6
        else:
            found6 = usable(addrs, 6)
            if not found6:
                return f"failed to find IPv6 address for interface {link.name}"
            ip6 = found6[0].ip
            assert isinstance(ip6, IPv6Address)
            v6 = ip6
    ext4 = (opts.public_ip or v4) if opts.ipv4 else None
    ext6 = (opts.public_ipv6 or v6) if opts.ipv6 else None
    shown = ", ".join(str(a) for a in (v4, v6) if a is not None)
    reason = f"chose {link.name} ({shown}): {why}"
    if opts.public_ip is not None and opts.public_ip != v4:
        reason += f"; public IP {opts.public_ip} from --public-ip"
    if opts.public_ipv6 is not None and opts.public_ipv6 != v6:
        reason += f"; public IPv6 {opts.public_ipv6} from --public-ipv6"
    ext = ExternalInterface(
        name=link.name,
        index=link.index,
        mtu=link.mtu,
        iface_addr=v4 if opts.ipv4 else None,
        ext_addr=ext4,
        iface_v6_addr=v6 if opts.ipv6 else None,
        ext_v6_addr=ext6,
    )
    return Selection(ext, reason)


def _default(view: HostView, opts: InterfaceOptions) -> Selection:
    wanted: IPAddress | None = opts.public_ip or opts.public_ipv6
    if wanted is not None:
        flag = "--public-ip" if opts.public_ip is not None else "--public-ipv6"
        owner = _owner(view, wanted)
        if owner is None:
            raise InterfaceError(
                f"{flag} {wanted} is not an address of any local interface, and no --iface"
                f" was given to choose one; interfaces: {describe(view)};"
                f" add --iface=<name> (a public IP behind NAT needs an explicit interface)"
            )
        result = _finish(view, opts, owner, f"interface owning {flag} {wanted}", *_fixed(wanted))
    else:
        link = _default_link(view, opts)
        result = _finish(view, opts, link, "default route interface")
    if isinstance(result, str):
        raise InterfaceError(f"{result}; interfaces: {describe(view)}; choose one with --iface")
    return result


def _default_link(view: HostView, opts: InterfaceOptions) -> Link:
    names: dict[int, str] = {}
    for version, oif in ((4, view.default_v4), (6, view.default_v6)):
        if (version == 4 and not opts.ipv4) or (version == 6 and not opts.ipv6):
            continue
        if oif is None:
            raise InterfaceError(
                f"no IPv{version} default route: cannot pick the external interface;"
                f" interfaces: {describe(view)}; use --iface or --iface-can-reach"
            )
        link = _link(view, oif) if oif else None
        if link is None:
            raise InterfaceError(
                f"found an IPv{version} default route without a usable interface (#{oif});"
                " use --iface or --iface-can-reach"
            )
        names[version] = link.name
    if len(names) == 2 and names[4] != names[6]:
        raise InterfaceError(
            f"v6 default route interface {names[6]} must be the same with v4 default route"
            f" interface {names[4]}; choose one with --iface"
        )
    found = _by_name(view, names.get(4) or names[6])
    assert found is not None
    return found


def _by_iface(view: HostView, opts: InterfaceOptions, value: str) -> Selection | str:
    try:
        ip = ip_address(value)
    except ValueError:
        link = _by_name(view, value)
        if link is None:
            return f"no interface named {value}"
        return _finish(view, opts, link, f"--iface={value}")
    if (ip.version == 4 and not opts.ipv4) or (ip.version == 6 and not opts.ipv6):
        return f"{ip} is an IPv{ip.version} address but IPv{ip.version} is not enabled"
    owner = _owner(view, ip)
    if owner is None:
        return f"no interface has the address {ip}"
    if opts.ipv4 and opts.ipv6 and ip.version == 4 and opts.public_ipv6 is not None:
        owner6 = _owner(view, opts.public_ipv6)
        if owner6 is not None and owner6.index != owner.index:
            return f"--public-ipv6 {opts.public_ipv6} is on {owner6.name}, not on {owner.name}"
    return _finish(view, opts, owner, f"--iface={value}", *_fixed(ip))


def _by_regex(view: HostView, opts: InterfaceOptions, pattern: str) -> Selection | str:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    for link in view.links:
        addrs = view.addresses.get(link.index, ())
        v4 = next((a.ip for a in usable(addrs, 4) if rx.search(str(a.ip))), None)
        v6 = next((a.ip for a in usable(addrs, 6) if rx.search(str(a.ip))), None)
        if (opts.ipv4 and v4 is None) or (opts.ipv6 and v6 is None):
            continue
        assert v4 is None or isinstance(v4, IPv4Address)
        assert v6 is None or isinstance(v6, IPv6Address)
        shown = v4 or v6
        result = _finish(view, opts, link, f"--iface-regex={pattern} matched {shown}", v4, v6)
        if isinstance(result, Selection):
            return result
    for link in view.links:
        if rx.search(link.name):
            result = _finish(view, opts, link, f"--iface-regex={pattern} matched the name")
            if isinstance(result, Selection):
                return result
    return "matched no address and no interface name"


def _by_reach(view: HostView, opts: InterfaceOptions) -> Selection | str:
    reach = view.reach
    if reach is None or not reach.oif:
        return "no route to it"
    link = _link(view, reach.oif)
    if link is None:
        return f"route uses unknown interface #{reach.oif}"
    src = reach.prefsrc
    v4 = src if isinstance(src, IPv4Address) else None
    v6 = src if isinstance(src, IPv6Address) else None
    return _finish(view, opts, link, f"--iface-can-reach={opts.can_reach} routes via it", v4, v6)


def _fixed(ip: IPAddress) -> tuple[IPv4Address | None, IPv6Address | None]:
    return (ip, None) if isinstance(ip, IPv4Address) else (None, ip)


def _link(view: HostView, index: int) -> Link | None:
    return next((link for link in view.links if link.index == index), None)


def _by_name(view: HostView, name: str) -> Link | None:
    return next((link for link in view.links if link.name == name), None)


def _owner(view: HostView, ip: IPAddress) -> Link | None:
    for link in view.links:
        if any(a.ip == ip for a in view.addresses.get(link.index, ())):
            return link
    return None


async def snapshot(nl: Netlink, opts: InterfaceOptions) -> HostView:
    """Read links, addresses, default routes (and the can-reach lookup) from the kernel."""
    links = tuple(await nl.links())
    by_index: dict[int, list[Address]] = {}
    for addr in await nl.addresses():
        by_index.setdefault(addr.index, []).append(addr)
    defaults: dict[int, int | None] = {}
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        if (version == 4 and opts.ipv4) or (version == 6 and opts.ipv6):
            routes = [r for r in await nl.routes(family=family) if r.dst.prefixlen == 0]
            defaults[version] = (routes[0].oif or 0) if routes else None
    reach = await nl.route_get(opts.can_reach) if opts.can_reach is not None else None
    return HostView(
        links=links,
        addresses={k: tuple(v) for k, v in by_index.items()},
        default_v4=defaults.get(4),
        default_v6=defaults.get(6),
        reach=reach,
    )


async def select(nl: Netlink, opts: InterfaceOptions) -> Selection:
    """Select the external interface in ``nl``'s namespace.

    :raises InterfaceError: nothing matches (the message lists interfaces and addresses).
    :raises DataplaneError: the kernel could not be read.
    """
    return choose(await snapshot(nl, opts), opts)
