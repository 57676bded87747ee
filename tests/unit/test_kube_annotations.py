"""Annotation prefix normalisation and the patch bodies Go flanneld sends (spec §4.2,
§4.3, §4.5, §4.7), byte for byte, per backend."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address

import pytest

from loden.errors import ConfigError
from loden.model.lease import LeaseAttrs
from loden.subnet.kube.annotations import (
    AnnotationKeys,
    annotations_patch,
    desired_annotations,
    network_unavailable_patch,
    normalise_prefix,
)

P = "flannel.alpha.coreos.com/"
KEYS = AnnotationKeys(P)
VXLAN_DATA = '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'
VXLAN_V6_DATA = '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}'
WG_DATA = '{"PublicKey":"kdnzVpc3pkY4eH8J2nBBwNGC3Pl6tQhHuInkBqmVbUs=","Port":51820}'
WG_V6_DATA = '{"PublicKey":"kdnzVpc3pkY4eH8J2nBBwNGC3Pl6tQhHuInkBqmVbUs=","Port":51821}'
KUBELET = {"node.alpha.kubernetes.io/ttl": "0"}


@pytest.mark.parametrize(
    ("flag", "normalised"),
    [
        ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/"),
        ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-"),
        ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-"),
        ("org.com/9", "org.com/9-"),
        ("my_org.example-1.io/a_b", "my_org.example-1.io/a_b-"),
    ],
)
def test_prefix_normalised_as_flanneld(flag: str, normalised: str) -> None:
    assert normalise_prefix(flag) == normalised
    assert AnnotationKeys.for_flag(flag).backend_type == normalised + "backend-type"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("org", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
        ("org/", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
        ("org/prefix", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
        ("org.COM", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
        ("org.com/PREFIX", "prefix must be in a format: fqdn/[0-9a-z-_]*"),
        ("a.com/b/c", "prefix can contain at most single slash"),
    ],
)
def test_prefix_rejected_with_flanneld_message(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("subnet/kube: " + message)) as info:
        normalise_prefix(flag)
    assert "--kube-annotation-prefix" in str(info.value)
    assert flag in str(info.value)


def _attrs(
    btype: str,
    data: str | None,
    *,
    ip: str = "172.18.0.3",
    ip6: str | None = None,
    v6data: str | None = None,
) -> LeaseAttrs:
    return LeaseAttrs(
        public_ip=IPv4Address(ip),
        backend_type=btype,
        backend_data=data,
        public_ipv6=IPv6Address(ip6) if ip6 else None,
        backend_v6_data=v6data,
    )


def _body(**annotations: str) -> bytes:
    inner = ",".join(f'"{P}{k.replace("_", "-")}":"{v}"' for k, v in annotations.items())
    return ('{"metadata":{"annotations":{' + inner + "}}}").encode()


# The bodies Go flanneld sends for a fresh node (only a kubelet annotation present):
# CreateTwoWayMergePatch over the annotation map, keys sorted, values as Go writes them.
FRESH_NODE_PATCHES = [
    (
        "vxlan",
        _attrs("vxlan", VXLAN_DATA),
        b'{"metadata":{"annotations":{'
        b'"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"12:c6:65:89:b4:e3\\"}",'
        b'"flannel.alpha.coreos.com/backend-type":"vxlan",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        b'"flannel.alpha.coreos.com/public-ip":"172.18.0.3"}}}',
    ),
    (
        "host-gw",
        _attrs("host-gw", None),
        _body(
            backend_data="null",
            backend_type="host-gw",
            kube_subnet_manager="true",
            public_ip="172.18.0.3",
        ),
    ),
    (
        "udp",  # BackendType "" and no data: flanneld writes both anyway
        _attrs("", None),
        _body(
            backend_data="null", backend_type="", kube_subnet_manager="true", public_ip="172.18.0.3"
        ),
    ),
    (
        "wireguard",
        _attrs("wireguard", WG_DATA),
        b'{"metadata":{"annotations":{'
        b'"flannel.alpha.coreos.com/backend-data":"{\\"PublicKey\\":\\"kdnzVpc3pkY4eH8J2nBBwNGC3Pl6tQhHuInkBqmVbUs=\\",\\"Port\\":51820}",'
        b'"flannel.alpha.coreos.com/backend-type":"wireguard",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        b'"flannel.alpha.coreos.com/public-ip":"172.18.0.3"}}}',
    ),
    (
        "vxlan dual-stack",
        _attrs("vxlan", VXLAN_DATA, ip6="fc00:f853:ccd:e793::3", v6data=VXLAN_V6_DATA),
        b'{"metadata":{"annotations":{'
        b'"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"12:c6:65:89:b4:e3\\"}",'
        b'"flannel.alpha.coreos.com/backend-type":"vxlan",'
        b'"flannel.alpha.coreos.com/backend-v6-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"aa:bb:cc:dd:ee:ff\\"}",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        b'"flannel.alpha.coreos.com/public-ip":"172.18.0.3",'
        b'"flannel.alpha.coreos.com/public-ipv6":"fc00:f853:ccd:e793::3"}}}',
    ),
    (
        "host-gw dual-stack",
        _attrs("host-gw", None, ip6="fc00::3"),
        _body(
            backend_data="null",
            backend_type="host-gw",
            backend_v6_data="null",
            kube_subnet_manager="true",
            public_ip="172.18.0.3",
            public_ipv6="fc00::3",
        ),
    ),
    (
        "wireguard dual-stack",
        _attrs("wireguard", WG_DATA, ip6="fc00::3", v6data=WG_V6_DATA),
        b'{"metadata":{"annotations":{'
        b'"flannel.alpha.coreos.com/backend-data":"{\\"PublicKey\\":\\"kdnzVpc3pkY4eH8J2nBBwNGC3Pl6tQhHuInkBqmVbUs=\\",\\"Port\\":51820}",'
        b'"flannel.alpha.coreos.com/backend-type":"wireguard",'
        b'"flannel.alpha.coreos.com/backend-v6-data":"{\\"PublicKey\\":\\"kdnzVpc3pkY4eH8J2nBBwNGC3Pl6tQhHuInkBqmVbUs=\\",\\"Port\\":51821}",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        b'"flannel.alpha.coreos.com/public-ip":"172.18.0.3",'
        b'"flannel.alpha.coreos.com/public-ipv6":"fc00::3"}}}',
    ),
]


@pytest.mark.parametrize(
    ("attrs", "body"), [x[1:] for x in FRESH_NODE_PATCHES], ids=[x[0] for x in FRESH_NODE_PATCHES]
)
def test_patch_body_matches_go_flanneld(attrs: LeaseAttrs, body: bytes) -> None:
    assert annotations_patch(desired_annotations(KEYS, KUBELET, attrs)) == body


def test_vxlan_ipv6_only_node_writes_no_ipv4_data() -> None:
    # vxlan with null IPv4 data (IPv4 disabled): flanneld writes neither backend-data nor
    # public-ip, only the IPv6 keys.
    attrs = _attrs("vxlan", None, ip="0.0.0.0", ip6="fc00::3", v6data=VXLAN_V6_DATA)
    changed = desired_annotations(KEYS, KUBELET, attrs)
    assert sorted(changed) == [
        P + "backend-type",
        P + "backend-v6-data",
        P + "kube-subnet-manager",
        P + "public-ipv6",
    ]


def test_nothing_to_patch_when_annotations_already_right() -> None:
    attrs = _attrs("vxlan", VXLAN_DATA)
    current = {**KUBELET, **desired_annotations(KEYS, KUBELET, attrs)}
    assert desired_annotations(KEYS, current, attrs) == {}


def test_only_changed_annotations_are_sent() -> None:
    attrs = _attrs("vxlan", VXLAN_DATA)
    current = {**KUBELET, **desired_annotations(KEYS, KUBELET, attrs)}
    moved = _attrs("vxlan", VXLAN_DATA, ip="172.18.0.9")
    assert annotations_patch(desired_annotations(KEYS, current, moved)) == _body(
        public_ip="172.18.0.9"
    )


def test_public_ip_overwrite_wins_over_detected_ip() -> None:
    current = {**KUBELET, P + "public-ip-overwrite": "203.0.113.7"}
    changed = desired_annotations(KEYS, current, _attrs("host-gw", None))
    assert changed[P + "public-ip"] == "203.0.113.7"
    # ...and once written, nothing more to do even though it differs from the detected IP.
    current.update(changed)
    assert desired_annotations(KEYS, current, _attrs("host-gw", None)) == {}


def test_public_ipv6_overwrite() -> None:
    current = {**KUBELET, P + "public-ipv6-overwrite": "2001:db8::7"}
    attrs = _attrs("host-gw", None, ip6="fc00::3")
    assert desired_annotations(KEYS, current, attrs)[P + "public-ipv6"] == "2001:db8::7"


def test_custom_prefix_keys() -> None:
    keys = AnnotationKeys.for_flag("example.com/blue")
    changed = desired_annotations(keys, {}, _attrs("host-gw", None))
    assert sorted(changed) == [
        "example.com/blue-backend-data",
        "example.com/blue-backend-type",
        "example.com/blue-kube-subnet-manager",
        "example.com/blue-public-ip",
    ]


def test_html_characters_escaped_like_go() -> None:
    changed = {P + "backend-data": '{"x":"<&>"}'}
    assert annotations_patch(changed) == (
        b'{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":'
        b'"{\\"x\\":\\"\\u003c\\u0026\\u003e\\"}"}}}'
    )


def test_network_unavailable_condition_body() -> None:
    # 2026-12-05T07:50:00Z; v1.NodeCondition field order, metav1.Time in RFC 3339 UTC.
    assert network_unavailable_patch(1796457000.0) == (
        b'{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",'
        b'"lastHeartbeatTime":"2026-12-05T07:50:00Z","lastTransitionTime":"2026-12-05T07:50:00Z",'
        b'"reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}'
    )
