"""Issue 10: node-local values bound to the node's identity; the offload default."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import pytest

from loden.backend.identity import BoundValue, NodeIdentity, other_nodes, random_mac
from loden.backend.vxlan import kernel_version, peer_v6_mac, tx_checksum_decision, vxlan_rivals
from loden.backend.wireguard_peers import key_conflicts
from loden.health import HealthState
from loden.kernel.wireguard import generate_private_key, public_key_of
from loden.model.lease import Lease, LeaseAttrs

A = NodeIdentity(IPv4Address("192.0.2.1"), 1)
B = NodeIdentity(IPv4Address("192.0.2.2"), 1)


def test_bound_value_round_trip_and_file_format(tmp_path: Path) -> None:
    store = BoundValue(tmp_path / "flannel.1.mac", "VtepMAC")
    assert store.load(A) is None
    store.store(A, "6e:00:00:00:00:01")
    assert json.loads((tmp_path / "flannel.1.mac").read_text()) == {
        "PublicIP": "192.0.2.1",
        "VNI": 1,
        "VtepMAC": "6e:00:00:00:00:01",
    }
    assert store.load(A) == "6e:00:00:00:00:01"


@pytest.mark.parametrize(
    "text",
    [
        "6e:00:00:00:00:01\n",  # the format before issue 10
        '{"PublicIP":"192.0.2.2","VNI":1,"VtepMAC":"6e:00:00:00:00:01"}',  # another node
        '{"PublicIP":"192.0.2.1","VNI":2,"VtepMAC":"6e:00:00:00:00:01"}',  # another VNI
        '{"PublicIP":"192.0.2.1","VtepMAC":"6e:00:00:00:00:01"}',  # no VNI
        '{"PublicIP":"192.0.2.1","VNI":"1","VtepMAC":"6e:00:00:00:00:01"}',
        '{"PublicIP":"nonsense","VNI":1,"VtepMAC":"6e:00:00:00:00:01"}',
        '{"PublicIP":"192.0.2.1","VNI":1,"VtepMAC":7}',
        "[1, 2]",
        "",
    ],
)
def test_value_not_stored_for_this_node_is_ignored_with_one_line(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "flannel.1.mac"
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert BoundValue(path, "VtepMAC").load(A) is None
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()


def test_ipv6_identity(tmp_path: Path) -> None:
    store = BoundValue(tmp_path / "flannel-v6.1.mac", "VtepMAC")
    six = NodeIdentity(IPv6Address("2001:db8::1"), 1)
    store.store(six, "6e:00:00:00:00:02")
    assert store.load(six) == "6e:00:00:00:00:02"
    assert store.load(NodeIdentity(IPv6Address("2001:db8::2"), 1)) is None


def _lease(net: str, ip: str, v6: str | None = None) -> Lease:
    return Lease(
        IPv4Network(net),
        LeaseAttrs(IPv4Address(ip), "vxlan", public_ipv6=IPv6Address(v6) if v6 else None),
    )


def test_other_nodes_by_family() -> None:
    mine = _lease("10.0.1.0/24", "192.0.2.1", "2001:db8::1")
    other = _lease("10.0.2.0/24", "192.0.2.2", "2001:db8::2")
    v4only = _lease("10.0.3.0/24", "192.0.2.3")
    assert other_nodes([mine, other, v4only], IPv4Address("192.0.2.1")) == [other, v4only]
    assert other_nodes([mine, other, v4only], IPv6Address("2001:db8::1")) == [other]


def test_random_mac_is_local_unicast_and_avoids_taken() -> None:
    for _ in range(100):
        mac = random_mac()
        assert int(mac[:2], 16) & 0x03 == 0x02
    assert random_mac({"02:00:00:00:00:00"}) != "02:00:00:00:00:00"


@pytest.mark.parametrize(
    ("option", "release", "on", "words"),
    [
        (None, "6.18.0", True, "5.7 or newer"),
        (None, "5.7.0-1-amd64", True, "5.7 or newer"),
        (None, "5.6.19", False, "older than 5.7"),
        (None, "4.19.0-26-cloud-amd64", False, "older than 5.7"),
        (None, "weird", False, "not understood"),
        (True, "4.19.0", True, "true in the Backend config"),
        (False, "6.18.0", False, "false in the Backend config"),
    ],
)
def test_tx_checksum_decision(option: bool | None, release: str, on: bool, words: str) -> None:
    decided, why = tx_checksum_decision(option, release)
    assert decided is on and words in why


def test_kernel_version() -> None:
    assert kernel_version("5.10.0-28-amd64") == (5, 10)
    assert kernel_version("") is None


def _wg(net: str, ip: str, key: str) -> Lease:
    data = LeaseAttrs.encode_data({"PublicKey": key, "Port": 51820})
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), "wireguard", data))


def test_wireguard_key_conflicts() -> None:
    own_key = public_key_of(generate_private_key())
    shared = public_key_of(generate_private_key())
    mine = _wg("10.0.1.0/24", "192.0.2.1", own_key)
    old_mine = _wg("10.0.9.0/24", "192.0.2.1", own_key)  # our own older lease: fine
    thief = _wg("10.0.2.0/24", "192.0.2.2", own_key)
    twin1 = _wg("10.0.3.0/24", "192.0.2.3", shared)
    twin2 = _wg("10.0.4.0/24", "192.0.2.4", shared)
    assert key_conflicts([old_mine], own_key, mine) == []
    out = key_conflicts([old_mine, thief, twin1, twin2], own_key, mine)
    assert len(out) == 2
    assert "192.0.2.2" in out[0] and "own public key" in out[0]
    assert "192.0.2.3" in out[1] and "192.0.2.4" in out[1]


def test_conflicts_make_healthz_fail() -> None:
    health = HealthState(store_last_ok=1e18)
    assert health.problems() == []
    health.identity_conflicts = ("vxlan: peer 10.0.2.0/24 advertises VtepMAC ...",)
    assert health.problems() == ["vxlan: peer 10.0.2.0/24 advertises VtepMAC ..."]


def test_vxlan_rivals_by_family_and_vni() -> None:
    def lease(net: str, ip: str, v6: str | None, data: dict[str, object], v6data: object) -> Lease:
        return Lease(
            IPv4Network(net),
            LeaseAttrs(
                IPv4Address(ip),
                "vxlan",
                json.dumps(data),
                public_ipv6=IPv6Address(v6) if v6 else None,
                backend_v6_data=json.dumps(v6data) if v6data else None,
            ),
        )

    mac = "6e:00:00:00:00:01"
    mine = lease("10.0.1.0/24", "192.0.2.1", "2001:db8::1", {"VNI": 1, "VtepMAC": mac}, None)
    same = lease("10.0.2.0/24", "192.0.2.2", "2001:db8::2", {"VNI": 1}, {"VNI": 1, "VtepMAC": mac})
    other_vni = lease("10.0.3.0/24", "192.0.2.3", "2001:db8::3", {"VNI": 2}, {"VNI": 2})
    old = lease("10.0.4.0/24", "192.0.2.4", None, {"VtepMAC": mac}, None)  # v0.11: no VNI
    leases = [mine, same, other_vni, old]
    assert vxlan_rivals(leases, IPv4Address("192.0.2.1"), 1) == [same, old]
    assert vxlan_rivals(leases, IPv6Address("2001:db8::1"), 1) == [same]
    assert [peer_v6_mac(x) for x in vxlan_rivals(leases, IPv6Address("2001:db8::1"), 1)] == [mac]
