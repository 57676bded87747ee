"""External interface selection (spec §8.4) over synthetic host views."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_interface

import pytest

from loden.errors import InterfaceError
from loden.kernel.interfaces import HostView, InterfaceOptions, choose, usable
from loden.kernel.netlink import Address, Link, RouteLookup

PERM, DYN, TEMP, DEPR = 0x80, 0x00, 0x01, 0x20


def link(index: int, name: str, mtu: int = 1500) -> Link:
    return Link(index=index, name=name, kind=None, mtu=mtu, mac=None, up=True)


def addr(index: int, text: str, flags: int = PERM) -> Address:
    iface = ip_interface(text)
    scope = 253 if iface.ip.is_link_local else (254 if iface.ip.is_loopback else 0)
    return Address(index=index, interface=iface, scope=scope, flags=flags)


def view(**kwargs: object) -> HostView:
    links = (link(1, "lo"), link(2, "eth0"), link(3, "eth1"), link(4, "wg0", mtu=0))
    addresses = {
        1: (addr(1, "127.0.0.1/8"), addr(1, "::1/128")),
        2: (addr(2, "10.0.2.15/24"), addr(2, "fe80::1/64")),
        3: (addr(3, "192.168.56.11/24"), addr(3, "192.168.56.99/24"), addr(3, "fd00::11/64")),
        4: (addr(4, "172.20.0.1/24"),),
    }
    base: dict[str, object] = {"links": links, "addresses": addresses, "default_v4": 2}
    base.update(kwargs)
    return HostView(**base)  # type: ignore[arg-type]


def test_default_route_interface() -> None:
    sel = choose(view(), InterfaceOptions())
    assert sel.ext.name == "eth0" and sel.ext.index == 2 and sel.ext.mtu == 1500
    assert sel.ext.iface_addr == sel.ext.ext_addr == IPv4Address("10.0.2.15")
    assert sel.reason == "chose eth0 (10.0.2.15): default route interface"


def test_no_default_route_lists_interfaces() -> None:
    with pytest.raises(InterfaceError) as err:
        choose(view(default_v4=None), InterfaceOptions())
    text = str(err.value)
    assert "no IPv4 default route" in text
    assert "eth1:[192.168.56.11, 192.168.56.99, fd00::11]" in text


def test_default_route_without_interface() -> None:
    with pytest.raises(InterfaceError, match="without a usable interface"):
        choose(view(default_v4=0), InterfaceOptions())


def test_public_ip_selects_owner() -> None:
    sel = choose(view(), InterfaceOptions(public_ip=IPv4Address("192.168.56.99")))
    assert sel.ext.name == "eth1"
    assert sel.ext.iface_addr == sel.ext.ext_addr == IPv4Address("192.168.56.99")
    assert "interface owning --public-ip 192.168.56.99" in sel.reason


def test_public_ip_not_local_without_iface() -> None:
    with pytest.raises(InterfaceError, match="not an address of any local interface"):
        choose(view(), InterfaceOptions(public_ip=IPv4Address("203.0.113.7")))


def test_iface_by_name_with_nat_public_ip() -> None:
    opts = InterfaceOptions(ifaces=("eth1",), public_ip=IPv4Address("203.0.113.7"))
    sel = choose(view(), opts)
    assert sel.ext.name == "eth1"
    assert sel.ext.iface_addr == IPv4Address("192.168.56.11")
    assert sel.ext.ext_addr == IPv4Address("203.0.113.7")
    assert sel.reason == (
        "chose eth1 (192.168.56.11): --iface=eth1; public IP 203.0.113.7 from --public-ip"
    )


def test_iface_by_ip_fixes_the_address() -> None:
    sel = choose(view(), InterfaceOptions(ifaces=("192.168.56.99",)))
    assert sel.ext.name == "eth1" and sel.ext.iface_addr == IPv4Address("192.168.56.99")


def test_iface_values_in_order_first_success_wins() -> None:
    opts = InterfaceOptions(ifaces=("eth9", "10.9.9.9", "wg0", "eth1", "eth0"))
    sel = choose(view(), opts)
    assert sel.ext.name == "eth1"


def test_iface_regex_prefers_addresses_then_names() -> None:
    # "eth0" matches a name, but an address match anywhere wins first.
    sel = choose(view(), InterfaceOptions(regexes=(r"^192\.168\.56\.9", "eth0")))
    assert sel.ext.name == "eth1" and sel.ext.iface_addr == IPv4Address("192.168.56.99")
    assert "matched 192.168.56.99" in sel.reason
    sel = choose(view(), InterfaceOptions(regexes=(r"th1$",)))
    assert sel.ext.name == "eth1" and sel.ext.iface_addr == IPv4Address("192.168.56.11")
    assert "matched the name" in sel.reason


def test_iface_regex_invalid_and_unmatched() -> None:
    with pytest.raises(InterfaceError) as err:
        choose(view(), InterfaceOptions(regexes=("(", "^nothing$")))
    text = str(err.value)
    assert "--iface-regex=(: not a valid regular expression" in text
    assert "--iface-regex=^nothing$: matched no address and no interface name" in text
    assert "eth0:[10.0.2.15, fe80::1]" in text


def test_iface_then_regex_then_can_reach() -> None:
    reach = RouteLookup(IPv4Address("192.168.56.1"), 3, None, IPv4Address("192.168.56.11"))
    opts = InterfaceOptions(ifaces=("eth7",), regexes=("^nope$",), can_reach=reach.dst)
    sel = choose(view(reach=reach), opts)
    assert sel.ext.name == "eth1" and sel.ext.iface_addr == IPv4Address("192.168.56.11")
    assert sel.reason.endswith("--iface-can-reach=192.168.56.1 routes via it")


def test_can_reach_without_route() -> None:
    opts = InterfaceOptions(can_reach=IPv4Address("198.51.100.1"))
    with pytest.raises(InterfaceError, match="--iface-can-reach=198.51.100.1: no route to it"):
        choose(view(reach=None), opts)


def test_mtu_zero_is_rejected() -> None:
    with pytest.raises(InterfaceError, match="wg0 reports MTU 0"):
        choose(view(), InterfaceOptions(ifaces=("wg0",)))


def test_interface_without_ipv4() -> None:
    v = view(addresses={2: (addr(2, "fe80::1/64"),)})
    with pytest.raises(InterfaceError, match="failed to find IPv4 address for interface eth0"):
        choose(v, InterfaceOptions())


def test_address_preference() -> None:
    addrs = [
        addr(2, "fe80::5/64"),
        addr(2, "2001:db8::7/64", TEMP | PERM),
        addr(2, "2001:db8::8/64", DYN),
        addr(2, "2001:db8::9/64", PERM),
        addr(2, "2001:db8::dead/64", PERM | DEPR),
    ]
    order = [str(a.ip) for a in usable(addrs, 6)]
    assert order == ["2001:db8::9", "2001:db8::7", "2001:db8::8", "fe80::5"]
    v4 = [addr(2, "169.254.1.1/16"), addr(2, "10.1.1.1/8")]
    assert [str(a.ip) for a in usable(v4, 4)] == ["10.1.1.1", "169.254.1.1"]


def test_dual_stack_default_routes_must_agree() -> None:
    opts = InterfaceOptions(ipv6=True)
    with pytest.raises(InterfaceError, match="v6 default route interface eth1 must be the same"):
        choose(view(default_v6=3), opts)
    sel = choose(view(default_v4=3, default_v6=3), opts)
    assert sel.ext.iface_addr == IPv4Address("192.168.56.11")
    assert sel.ext.iface_v6_addr == sel.ext.ext_v6_addr == IPv6Address("fd00::11")


def test_dual_stack_iface_ip_and_public_ipv6_on_other_interface() -> None:
    opts = InterfaceOptions(ifaces=("10.0.2.15",), ipv6=True, public_ipv6=IPv6Address("fd00::11"))
    with pytest.raises(InterfaceError, match="--public-ipv6 fd00::11 is on eth1, not on eth0"):
        choose(view(), opts)


def test_ipv6_only_by_regex() -> None:
    opts = InterfaceOptions(regexes=("^fd00:",), ipv4=False, ipv6=True)
    sel = choose(view(), opts)
    assert sel.ext.name == "eth1" and sel.ext.iface_addr is None and sel.ext.ext_addr is None
    assert sel.ext.iface_v6_addr == IPv6Address("fd00::11")


# -- IPv6 for every selection flag (flannel #2081) ----------------------------------------


def test_ipv6_only_default_route_and_iface_by_name() -> None:
    sel = choose(view(default_v4=None, default_v6=3), InterfaceOptions(ipv4=False, ipv6=True))
    assert (sel.ext.name, sel.ext.iface_v6_addr) == ("eth1", IPv6Address("fd00::11"))
    assert sel.reason == "chose eth1 (fd00::11): default route interface"
    sel = choose(view(), InterfaceOptions(ifaces=("eth1",), ipv4=False, ipv6=True))
    assert sel.ext.ext_v6_addr == IPv6Address("fd00::11") and sel.ext.ext_addr is None


def test_ipv6_only_iface_by_ipv6_address_and_refuses_ipv4() -> None:
    sel = choose(view(), InterfaceOptions(ifaces=("fd00::11",), ipv4=False, ipv6=True))
    assert sel.ext.name == "eth1" and sel.ext.iface_v6_addr == IPv6Address("fd00::11")
    with pytest.raises(InterfaceError, match="IPv4 address but IPv4 is not enabled"):
        choose(view(), InterfaceOptions(ifaces=("10.0.2.15",), ipv4=False, ipv6=True))


def test_ipv6_can_reach_fills_the_other_family_from_the_interface() -> None:
    reach = RouteLookup(IPv6Address("fd00::1"), 3, None, IPv6Address("fd00::11"))
    sel = choose(view(reach=reach), InterfaceOptions(can_reach=reach.dst, ipv6=True))
    assert sel.ext.name == "eth1"
    assert sel.ext.iface_v6_addr == IPv6Address("fd00::11")
    assert sel.ext.iface_addr == IPv4Address("192.168.56.11")  # first usable IPv4 of eth1
    assert "--iface-can-reach=fd00::1 routes via it" in sel.reason


def test_public_ipv6_alone_selects_its_owner_and_is_advertised() -> None:
    sel = choose(
        view(), InterfaceOptions(public_ipv6=IPv6Address("fd00::11"), ipv4=False, ipv6=True)
    )
    assert sel.ext.name == "eth1" and sel.ext.ext_v6_addr == IPv6Address("fd00::11")
    assert "interface owning --public-ipv6 fd00::11" in sel.reason


def test_public_ipv6_behind_nat_with_iface() -> None:
    nat = IPv6Address("2001:db8::99")
    sel = choose(view(), InterfaceOptions(ifaces=("eth1",), public_ipv6=nat, ipv6=True))
    assert sel.ext.iface_v6_addr == IPv6Address("fd00::11") and sel.ext.ext_v6_addr == nat
    assert sel.reason.endswith("; public IPv6 2001:db8::99 from --public-ipv6")


def test_dual_stack_regex_needs_both_families_on_one_interface() -> None:
    opts = InterfaceOptions(regexes=(r"^(192\.168\.56\.11|fd00::11)$",), ipv6=True)
    sel = choose(view(), opts)
    assert sel.ext.name == "eth1"
    assert (sel.ext.iface_addr, sel.ext.iface_v6_addr) == (
        IPv4Address("192.168.56.11"),
        IPv6Address("fd00::11"),
    )
    # A dual-stack regex matching only an IPv4 address is no match (flannel's rule).
    with pytest.raises(InterfaceError, match="matched no address and no interface name"):
        choose(view(), InterfaceOptions(regexes=(r"^10\.0\.2\.15$",), ipv6=True))


def test_ipv6_only_interface_without_ipv6() -> None:
    v = view(addresses={2: (addr(2, "10.0.2.15/24"),)})
    with pytest.raises(InterfaceError, match="failed to find IPv6 address for interface eth0"):
        choose(v, InterfaceOptions(ifaces=("eth0",), ipv4=False, ipv6=True))
