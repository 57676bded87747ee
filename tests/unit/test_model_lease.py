"""Subnet keys and lease JSON, byte-exact with Go flannel in both eras."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loden.errors import LeaseFormatError, ParseError, SubnetKeyError
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import overlap, parse_subnet_key, subnet_key, within


def test_key_round_trip() -> None:
    assert subnet_key(IPv4Network("10.12.13.0/24")) == "10.12.13.0-24"
    v4, v6 = parse_subnet_key("/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56")
    assert v4 == IPv4Network("10.12.13.0/24") and v6 == IPv6Network("fd00:12:13::/56")
    assert subnet_key(v4, v6) == "10.12.13.0-24&fd00:12:13::-56"


@pytest.mark.parametrize(
    "key",
    [
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&:12:13:-56",
        "10.12.13.0-24&20011::-56",
        "10.12.13.0-24&2001-56",
        "10.12.13.0-24&2001::",
        "10.12.13.0-24&2001::-56hi",
        # Go parses the prefix as a 5-bit number: /32 never parsed in flannel either.
        "10.12.13.0-32",
        "10.12.13.5-24",
        "010.1.2.0-24",
        "10.12.13.0-0024",
    ],
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(SubnetKeyError):
        parse_subnet_key(key)


@given(st.text(max_size=60))
def test_key_parser_raises_only_its_own_error(key: str) -> None:
    try:
        parse_subnet_key(key)
    except SubnetKeyError:
        pass


def test_v2_era_json_is_the_seed_documents() -> None:
    attrs = LeaseAttrs(IPv4Address("10.211.55.13"), "host-gw")
    assert attrs.to_json(legacy=True) == '{"PublicIP":"10.211.55.13","BackendType":"host-gw"}'


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        (
            LeaseAttrs(
                IPv4Address("192.168.64.3"),
                "vxlan",
                LeaseAttrs.encode_data({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}),
            ),
            '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        ),
        (
            LeaseAttrs(IPv4Address("10.0.0.1"), "host-gw"),
            '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"host-gw"}',
        ),
        (LeaseAttrs(IPv4Address("10.0.0.1")), '{"PublicIP":"10.0.0.1","PublicIPv6":null}'),
        (
            LeaseAttrs(
                IPv4Address("10.0.0.1"),
                "wireguard",
                LeaseAttrs.encode_data({"PublicKey": "abc+/=", "Port": 51820}),
                IPv6Address("fc00::1"),
                LeaseAttrs.encode_data({"PublicKey": "abc+/=", "Port": 51821}),
            ),
            '{"PublicIP":"10.0.0.1","PublicIPv6":"fc00::1","BackendType":"wireguard",'
            '"BackendData":{"PublicKey":"abc+/=","Port":51820},'
            '"BackendV6Data":{"PublicKey":"abc+/=","Port":51821}}',
        ),
    ],
)
def test_v3_json_byte_exact(attrs: LeaseAttrs, expected: str) -> None:
    assert attrs.to_json() == expected
    assert LeaseAttrs.parse(expected) == attrs


def test_go_escapes_html_characters_in_raw_data() -> None:
    attrs = LeaseAttrs(IPv4Address("10.0.0.1"), "extension", LeaseAttrs.encode_data("a<b&c"))
    assert attrs.to_json(legacy=True) == (
        '{"PublicIP":"10.0.0.1","BackendType":"extension","BackendData":"a\\u003cb\\u0026c"}'
    )


def test_readers_accept_legacy_vxlan_and_case_insensitive_keys() -> None:
    attrs = LeaseAttrs.parse(
        '{"publicip":"10.0.0.2","backendtype":"vxlan",'
        '"BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
    )
    assert attrs.public_ip == IPv4Address("10.0.0.2")
    assert attrs.data() == {"VtepMAC": "aa:bb:cc:dd:ee:ff"}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"PublicIP":"10.0.0.300"}',
        b'{"PublicIP":7}',
        b'{"PublicIPv6":"10.0.0.1"}',
        b"\xff\xfe",
        b'{"BackendData":{"VNI":1' + b"0" * 5000 + b"}}",  # beyond int() of a string
    ],
)
def test_malformed_values(raw: bytes) -> None:
    with pytest.raises(LeaseFormatError):
        LeaseAttrs.parse(raw, key="10.0.1.0-24")


@given(st.binary(max_size=120))
def test_lease_parser_raises_only_its_own_error(raw: bytes) -> None:
    try:
        LeaseAttrs.parse(raw)
    except ParseError:
        pass


def _lease(v4: str, v6: str | None = None) -> Lease:
    attrs = LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan")
    return Lease(IPv4Network(v4), attrs, None if v6 is None else IPv6Network(v6))


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (("10.1.2.0/24",), ("10.1.2.0/24",), True),
        (("10.1.0.0/16",), ("10.1.2.0/24",), True),  # different lengths still collide
        (("10.1.2.0/24",), ("10.1.3.0/24",), False),
        # One IPv4 subnet, different IPv6 ones: two keys, one collision.
        (("10.1.2.0/24", "fd00:0:0:1::/64"), ("10.1.2.0/24", "fd00:0:0:2::/64"), True),
        (("10.1.2.0/24", "fd00:0:0:1::/64"), ("10.1.3.0/24", "fd00:0:0:1::/64"), True),
        # IPv6-only leases share the empty IPv4 part 0.0.0.0/0, which holds nothing.
        (("0.0.0.0/0", "fd00:0:0:1::/64"), ("0.0.0.0/0", "fd00:0:0:2::/64"), False),
        (("0.0.0.0/0", "fd00:0:0:1::/64"), ("10.1.2.0/24",), False),
        (("10.1.2.0/24", "fd00:0:0:1::/64"), ("10.1.3.0/24",), False),
    ],
)
def test_leases_overlap_family_by_family(
    a: tuple[str, ...], b: tuple[str, ...], overlap: bool
) -> None:
    first, second = _lease(*a), _lease(*b)
    assert first.overlaps_lease(second) is overlap
    assert second.overlaps_lease(first) is overlap
    assert first.overlaps(second.subnet, second.ipv6_subnet) is overlap


def test_ipv4_subnet_of_an_ipv6_only_lease_is_none() -> None:
    assert _lease("0.0.0.0/0", "fd00::/64").ipv4_subnet is None
    assert _lease("10.1.2.0/24").ipv4_subnet == IPv4Network("10.1.2.0/24")


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
def test_within_and_overlap_agree_with_ipaddress(a: int, alen: int, b: int, blen: int) -> None:
    first = IPv4Network((a, alen), strict=False)
    second = IPv4Network((b, blen), strict=False)
    assert within(first, second) is first.subnet_of(second)
    assert overlap(first, second) is first.overlaps(second)


def test_overlap_checks_leave_no_cached_broadcast_on_the_leases() -> None:
    """``ipaddress`` caches a network's broadcast address on the object when asked to
    compare ranges: ~400 bytes on every peer's subnet at 5,000 peers (issue 14)."""
    peer = _lease("10.1.2.0/24", "fd00:0:0:2::/64")
    own = _lease("10.1.3.0/24", "fd00:0:0:3::/64")
    assert not peer.overlaps_lease(own)
    assert within(peer.subnet, IPv4Network("10.0.0.0/8"))
    for net in (peer.subnet, peer.ipv6_subnet, own.subnet, own.ipv6_subnet):
        assert "broadcast_address" not in vars(net)
