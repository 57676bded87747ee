"""Backend construction rules that need no kernel: options, MACs, refusals, alloc."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.vxlan import VxlanBackend, VxlanOptions, compatible, derived_mac, peer_mac
from loden.errors import BackendError, NetworkConfigError
from loden.kernel.netlink import Link, VxlanSpec
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

EXT = ExternalInterface("eth0", 2, 1500, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"))


def ctx(
    backend: str, ext: ExternalInterface = EXT, tmp: Path = Path("/nonexistent")
) -> BackendContext:
    config = NetworkConfig.parse(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')
    return BackendContext(config, ext, tmp)


def test_vxlan_options_defaults_and_explicit_port() -> None:
    opts = VxlanOptions.from_config(ctx('{"Type":"vxlan"}').config)
    assert opts == VxlanOptions(vni=1, port=8472)
    opts = VxlanOptions.from_config(
        ctx(
            '{"type":"vxlan","vni":42,"port":4789,"gbp":true,"directrouting":true,"MTU":9000}'
        ).config
    )
    assert (opts.vni, opts.port, opts.gbp, opts.direct_routing, opts.mtu) == (
        42,
        4789,
        True,
        True,
        9000,
    )
    with pytest.raises(NetworkConfigError, match="VNI 16777216 is out of range"):
        ctx('{"Type":"vxlan","VNI":16777216}')


def test_vxlan_mtu_and_device_name() -> None:
    be = create_backend("vxlan", ctx('{"Type":"vxlan","VNI":7}'))
    assert isinstance(be, VxlanBackend)
    assert (be.name, be.mtu, be.spec.port, be.spec.local) == ("flannel.7", 1450, 8472, EXT.ext_addr)
    be = create_backend("vxlan", ctx('{"Type":"vxlan","MTU":9000}'))
    assert isinstance(be, VxlanBackend) and be.mtu == 8950


def test_derived_mac_is_stable_local_unicast() -> None:
    mac = derived_mac(IPv4Address("192.0.2.10"), 1)
    assert mac == derived_mac(IPv4Address("192.0.2.10"), 1)
    assert (
        mac
        != derived_mac(IPv4Address("192.0.2.11"), 1)
        != derived_mac(IPv4Address("192.0.2.10"), 2)
    )
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_peer_mac_accepts_go_json_forms() -> None:
    def lease(data: str | None) -> Lease:
        return Lease(
            IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("192.0.2.2"), "vxlan", data)
        )

    assert peer_mac(lease('{"VNI":1,"VtepMAC":"0A:58:0a:05:02:00"}')) == "0a:58:0a:05:02:00"
    assert peer_mac(lease('{"vtepmac":"0a-58-0a-05-02-00"}')) == "0a:58:0a:05:02:00"  # legacy
    assert peer_mac(lease('{"VNI":1}')) is None
    assert peer_mac(lease('{"VtepMAC":"zz"}')) is None
    assert peer_mac(lease(None)) is None


def test_compatibility_rules() -> None:
    spec = VxlanSpec(vni=1, port=8472, local=IPv4Address("192.0.2.10"), link=2)

    def dev(**kw: object) -> Link:
        fields = {"vni": 1, "port": 8472, "local": IPv4Address("192.0.2.10"), "link": 2}
        fields.update(kw)
        return Link(5, "flannel.1", "vxlan", 1450, "0a:00:00:00:00:01", True, VxlanSpec(**fields))  # type: ignore[arg-type]

    assert compatible(dev(), spec)
    assert compatible(dev(link=None, local=None), spec)  # unset on one side: not compared
    assert compatible(dev(port=0), spec)
    assert not compatible(dev(vni=2), spec)
    assert not compatible(dev(port=4789), spec)
    assert not compatible(dev(gbp=True), spec)
    assert not compatible(dev(local=IPv4Address("192.0.2.99")), spec)
    assert not compatible(Link(5, "flannel.1", "bridge", 1500, None, True), spec)


def test_hostgw_refuses_nat() -> None:
    nat = ExternalInterface("eth0", 2, 1500, IPv4Address("10.0.2.15"), IPv4Address("203.0.113.7"))
    with pytest.raises(BackendError) as err:
        create_backend("host-gw", ctx('{"Type":"host-gw"}', nat))
    assert "your PublicIP differs from interface IP, meaning that probably you're on a NAT" in str(
        err.value
    )


async def test_hostgw_lease_attrs() -> None:
    be = create_backend("host-gw", ctx('{"Type":"host-gw"}'))
    attrs = await be.lease_attrs()
    assert attrs.to_json() == '{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"host-gw"}'


async def test_alloc_backend() -> None:
    be = create_backend("alloc", ctx('{"Type":"alloc"}'))
    attrs = await be.lease_attrs()
    assert attrs.to_json() == '{"PublicIP":"192.0.2.10","PublicIPv6":null}'
    lease = Lease(IPv4Network("10.5.1.0/24"), attrs)
    network = await be.activate(lease)
    assert network.mtu == 1500 and network.lease == lease
    peer = Lease(IPv4Network("10.5.2.0/24"), attrs)
    report = await network.apply([LeaseEvent(EventKind.ADDED, peer)])
    assert (report.added, report.removed, report.errors) == (0, 0, ())
    assert await network.reconcile({peer.key: peer}) == report
    await network.aclose()


@pytest.mark.parametrize(
    "data",
    [
        '{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}',
        '{"VNI":4096,"VtepMAC":"fe:ed:fa:ce:00:ff"}',
        '{"VtepMAC":"02:00:00:00:00:0a"}',
        '{"VNI":1,"VtepMAC":"02:00:00:00:00:0A"}',
        '{"VNI":1,"vtepmac":"02:00:00:00:00:01"}',
        '{"VNI":1,"VtepMAC":"02:00:00:00:00:01","VtepMAC":"02:00:00:00:00:02"}',
        '{"VNI":1,"VtepMAC":"02-00-00-00-00-03"}',
        '{"VNI":1,"VtepMAC":"\\u00302:00:00:00:00:01"}',
        '{"VNI":1,"VtepMAC":"not a mac"}',
        '{"VNI":1}',
    ],
)
def test_vtep_mac_fast_path_reads_what_the_go_parser_reads(data: str) -> None:
    """The canonical BackendData is read with a regex (entries are derived in every full
    pass); it must agree with the Go-compatible parser on every input."""
    from loden.backend import vxlan
    from loden.model.gojson import GoJSONError, GoObject, as_str

    try:
        slow = vxlan.normalise_mac(GoObject.parse(data).get("VtepMAC", as_str, ""))
    except GoJSONError:
        slow = None
    assert vxlan._mac_of(data) == slow
