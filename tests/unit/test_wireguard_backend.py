"""wireguard backend rules that need no kernel: options, lease JSON, peer rendering."""

from __future__ import annotations

import base64
import json
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path

import pytest

from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.wireguard import WireguardBackend
from loden.backend.wireguard_peers import (
    DevicePlan,
    Mode,
    PeerRules,
    WireguardOptions,
    desired_peers,
    lease_peers,
    parse_peer_data,
    peer_changes,
    select_mode,
)
from loden.errors import BackendError, InterfaceError, NetworkConfigError
from loden.kernel.wireguard import PeerConfig, public_key_of
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.settings import BackendSettings, parse_agent_args

PRIV = base64.b64encode(bytes.fromhex("77" + "07" * 31)).decode()
K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()
PSK = base64.b64encode(b"\x03" * 32).decode()
EXT = ExternalInterface("eth0", 2, 1500, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"))
EXT6 = ExternalInterface(
    "eth0",
    2,
    1500,
    IPv4Address("192.0.2.10"),
    IPv4Address("192.0.2.10"),
    IPv6Address("2001:db8::10"),
    IPv6Address("2001:db8::10"),
)
DUAL = '"EnableIPv6":true,"IPv6Network":"fd00:5::/56",'


def config(backend: str = "{}", extra: str = "") -> NetworkConfig:
    body = backend.rstrip("}")
    sep = "," if body != "{" else ""
    text = f'{{"Network":"10.5.0.0/16",{extra}"Backend":{body}{sep}"Type":"wireguard"}}}}'
    return NetworkConfig.parse(text)


def ctx(
    tmp: Path, backend: str = "{}", *, extra: str = "", ext: ExternalInterface = EXT
) -> BackendContext:
    key = tmp / "wgkey"
    if not key.exists():
        key.write_text(PRIV)
    return BackendContext(config(backend, extra), ext, tmp, BackendSettings(wireguard_key_file=key))


# -- options ---------------------------------------------------------------------------


def test_options_defaults_and_explicit_values() -> None:
    assert WireguardOptions.from_config(config()) == WireguardOptions()
    opts = WireguardOptions.from_config(
        config(
            '{"listenport":5000,"ListenPortV6":5001,"MTU":9000,'
            f'"PSK":"{PSK}","PersistentKeepaliveInterval":25,"Mode":"auto"}}'
        )
    )
    assert opts == WireguardOptions(5000, 5001, 9000, PSK, 25, Mode.AUTO)


@pytest.mark.parametrize(
    ("backend", "field", "message"),
    [
        ('{"Mode":"both"}', "Backend.Mode", r"no valid Mode configured: Backend.Mode is 'both'"),
        ('{"Mode":"Auto"}', "Backend.Mode", r"no valid Mode configured"),
        ('{"Mode":""}', "Backend.Mode", r"no valid Mode configured"),
        ('{"ListenPort":0}', "Backend.ListenPort", r"not a UDP port: use 1\.\.65535"),
        ('{"ListenPortV6":70000}', "Backend.ListenPortV6", r"not a UDP port"),
        ('{"ListenPort":"51820"}', "Backend.ListenPort", r"expected a number"),
        ('{"MTU":-1}', "Backend.MTU", r"negative"),
        ('{"PSK":"secret"}', "Backend.PSK", r"not a base64 WireGuard key"),
        ('{"PersistentKeepaliveInterval":-5}', "Backend.PersistentKeepaliveInterval", "range"),
    ],
)
def test_invalid_options_are_network_config_errors(backend: str, field: str, message: str) -> None:
    with pytest.raises(NetworkConfigError, match=message) as info:
        WireguardOptions.from_config(config(backend))
    assert info.value.field == field
    assert "\n" not in str(info.value)
    if field == "Backend.PSK":
        assert "secret" not in str(info.value)  # never echo a secret


def test_registry_creates_the_backend_and_checks_mtu(tmp_path: Path) -> None:
    backend = create_backend("WireGuard", ctx(tmp_path))
    assert isinstance(backend, WireguardBackend)
    assert backend.mtu == 1420 and backend.device == "flannel-wg"
    assert WireguardBackend(ctx(tmp_path, '{"MTU":1380}')).mtu == 1300
    with pytest.raises(BackendError, match=r"set Backend.MTU to at least 148"):
        WireguardBackend(ctx(tmp_path, '{"MTU":140}'))
    with pytest.raises(BackendError, match=r"at least 1360"):
        WireguardBackend(ctx(tmp_path, '{"MTU":1300}', extra=DUAL, ext=EXT6))
    with pytest.raises(InterfaceError, match=r"IPv6 public IP"):
        WireguardBackend(ctx(tmp_path, extra=DUAL))
    with pytest.raises(BackendError, match=r"not a valid link name"):
        WireguardBackend(
            BackendContext(config(), EXT, tmp_path, BackendSettings(wireguard_device="x" * 16))
        )


def test_key_file_precedence(tmp_path: Path) -> None:
    """flanneld's default, ``WIREGUARD_KEY_FILE`` over it (read by the agent's settings,
    never by the backend), an explicit setting over both."""
    assert str(WireguardBackend(BackendContext(config(), EXT, tmp_path)).key_file) == (
        "/run/flannel/wgkey"
    )
    settings = parse_agent_args([], {"WIREGUARD_KEY_FILE": str(tmp_path / "env")}).backend
    context = BackendContext(config(), EXT, tmp_path, settings)
    assert WireguardBackend(context).key_file == tmp_path / "env"
    assert WireguardBackend(ctx(tmp_path)).key_file == tmp_path / "wgkey"


# -- lease JSON ------------------------------------------------------------------------


async def test_lease_json_is_byte_exact(tmp_path: Path) -> None:
    public = public_key_of(PRIV)
    attrs = await WireguardBackend(ctx(tmp_path)).lease_attrs()
    assert attrs.to_json() == (
        '{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"wireguard",'
        f'"BackendData":{{"PublicKey":"{public}","Port":51820}}}}'
    )
    attrs = await WireguardBackend(
        ctx(tmp_path, '{"ListenPort":5000}', extra=DUAL, ext=EXT6)
    ).lease_attrs()
    assert attrs.to_json() == (
        '{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"wireguard",'
        f'"BackendData":{{"PublicKey":"{public}","Port":5000}},'
        f'"BackendV6Data":{{"PublicKey":"{public}","Port":51821}}}}'
    )
    # Single-device modes: v6 traffic reaches the one device, on ListenPort.
    attrs = await WireguardBackend(
        ctx(tmp_path, '{"Mode":"auto"}', extra=DUAL, ext=EXT6)
    ).lease_attrs()
    assert json.loads(attrs.backend_v6_data or "") == {"PublicKey": public, "Port": 51820}


async def test_key_file_copied_from_another_node_is_replaced(tmp_path: Path) -> None:
    """Issue 10: our public key already in a lease of another public IP means the key
    file came from that node: a new key is generated (and written) before publishing."""
    public = public_key_of(PRIV)
    data = LeaseAttrs.encode_data({"PublicKey": public, "Port": 51820})
    own_ip = IPv4Address("192.0.2.10")  # EXT's
    own_old = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(own_ip, "wireguard", data))
    other = Lease(
        IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("192.0.2.11"), "wireguard", data)
    )
    backend = WireguardBackend(ctx(tmp_path))
    attrs = await backend.lease_attrs([own_old])  # our own earlier lease: keep the key
    assert attrs.data()["PublicKey"] == public
    attrs = await backend.lease_attrs([own_old, other])
    fresh = attrs.data()["PublicKey"]
    assert fresh != public and fresh == backend.public_key
    assert public_key_of((tmp_path / "wgkey").read_text()) == fresh
    # The next start keeps the new key.
    assert (await WireguardBackend(ctx(tmp_path)).lease_attrs([other])).data()["PublicKey"] == fresh


async def test_lease_attrs_generate_a_missing_key(tmp_path: Path) -> None:
    context = BackendContext(
        config(), EXT, tmp_path, BackendSettings(wireguard_key_file=tmp_path / "k" / "w")
    )
    backend = WireguardBackend(context)
    attrs = await backend.lease_attrs()
    assert (tmp_path / "k" / "w").exists()
    assert attrs.data() == {"PublicKey": backend.public_key, "Port": 51820}
    assert public_key_of((tmp_path / "k" / "w").read_text()) == backend.public_key


def test_device_plans_per_mode(tmp_path: Path) -> None:
    plans = WireguardBackend(ctx(tmp_path, extra=DUAL, ext=EXT6)).plans()
    assert plans == [
        DevicePlan("v4", "flannel-wg", 51820, True, False),
        DevicePlan("v6", "flannel-wg-v6", 51821, False, True),
    ]
    plans = WireguardBackend(ctx(tmp_path, '{"Mode":"ipv6"}', extra=DUAL, ext=EXT6)).plans()
    assert plans == [DevicePlan("main", "flannel-wg", 51820, True, True)]
    assert WireguardBackend(ctx(tmp_path)).plans() == [
        DevicePlan("v4", "flannel-wg", 51820, True, False)
    ]


# -- peers -----------------------------------------------------------------------------

SUB = IPv4Network("10.5.7.0/24")
SUB6 = IPv6Network("fd00:5:0:7::/64")
RULES = PeerRules(Mode.SEPARATE, True, False, 51820, 51821, IPv4Address("192.0.2.10"))


def data(key: str, port: int | None = 51820) -> str | None:
    value: dict[str, object] = {"PublicKey": key}
    if port is not None:
        value["Port"] = port
    return LeaseAttrs.encode_data(value)


def lease(
    key: str = K1,
    *,
    ip: str = "192.0.2.20",
    port: int | None = 51820,
    subnet: IPv4Network = SUB,
    ip6: str | None = None,
    v6key: str | None = None,
    expiration: float | None = None,
) -> Lease:
    attrs = LeaseAttrs(
        IPv4Address(ip),
        "wireguard",
        data(key, port),
        IPv6Address(ip6) if ip6 else None,
        data(v6key or key, 51821) if ip6 else None,
    )
    return Lease(subnet, attrs, SUB6 if ip6 else None, expiration=expiration)


def test_separate_mode_peer_and_port_fallback() -> None:
    assert lease_peers(lease(), RULES) == {
        "v4": PeerConfig(K1, "192.0.2.20:51820", (SUB,), None, 0)
    }
    # Port 0 or absent (peers older than the field): our own listen port.
    rules = PeerRules(Mode.SEPARATE, True, False, 6000, 6001, psk=PSK, keepalive=25)
    for port in (0, None):
        assert lease_peers(lease(port=port), rules) == {
            "v4": PeerConfig(K1, "192.0.2.20:6000", (SUB,), PSK, 25)
        }


def test_separate_mode_dual_stack_makes_one_peer_per_device() -> None:
    rules = PeerRules(Mode.SEPARATE, True, True, 51820, 51821)
    peers = lease_peers(lease(ip6="2001:db8::20", v6key=K2), rules)
    assert peers == {
        "v4": PeerConfig(K1, "192.0.2.20:51820", (SUB,)),
        "v6": PeerConfig(K2, "[2001:db8::20]:51821", (SUB6,)),
    }


@pytest.mark.parametrize(
    ("mode", "peer_ip", "endpoint"),
    [
        (Mode.IPV4, "10.0.0.20", "10.0.0.20:51820"),
        (Mode.IPV6, "10.0.0.20", "[2001:db8::20]:51821"),
        (Mode.AUTO, "192.0.2.20", "192.0.2.20:51820"),  # public IPv4: IPv4
        (Mode.AUTO, "10.0.0.20", "[2001:db8::20]:51821"),  # private IPv4, global IPv6
    ],
)
def test_single_device_modes(mode: Mode, peer_ip: str, endpoint: str) -> None:
    rules = PeerRules(
        mode, True, True, 51820, 51820, IPv4Address("10.0.0.10"), IPv6Address("2001:db8::10")
    )
    peers = lease_peers(lease(ip=peer_ip, ip6="2001:db8::20"), rules)
    assert peers == {"main": PeerConfig.make(K1, endpoint, [SUB, SUB6])}


def test_auto_mode_selection() -> None:
    own4, own6 = IPv4Address("10.0.0.1"), IPv6Address("2001:db8::1")
    private4, public4 = IPv4Address("10.0.0.2"), IPv4Address("192.0.2.2")
    ula, global6 = IPv6Address("fd00::2"), IPv6Address("2001:db8::2")
    assert select_mode(private4, None, own4, own6) is Mode.IPV4
    assert select_mode(public4, global6, own4, own6) is Mode.IPV4
    assert select_mode(private4, global6, own4, own6) is Mode.IPV6
    assert select_mode(private4, ula, own4, own6) is Mode.IPV4
    assert select_mode(private4, global6, own4, IPv6Address("fd00::1")) is Mode.IPV4
    assert select_mode(private4, global6, own4, None) is Mode.IPV4
    # 100.64/10 is not RFC 1918 (Go's IsPrivate), unlike Python's is_private idea.
    assert select_mode(IPv4Address("100.64.0.2"), global6, own4, own6) is Mode.IPV4


@pytest.mark.parametrize(
    ("backend_data", "reason"),
    [
        (None, r"no wireguard data"),
        ('{"PublicKey":"short"}', r"PublicKey 'short' is not a base64 WireGuard key"),
        (f'{{"PublicKey":"{K1}","Port":70000}}', r"Port 70000 is not a UDP port"),
        (f'{{"PublicKey":"{K1}","Port":"x"}}', r"does not parse"),
        ("[1]", r"does not parse"),
    ],
)
def test_bad_peer_data_is_skipped_with_a_reason(backend_data: str | None, reason: str) -> None:
    bad = Lease(SUB, LeaseAttrs(IPv4Address("192.0.2.20"), "wireguard", backend_data))
    result = lease_peers(bad, RULES)
    assert isinstance(result, str)
    assert "10.5.7.0-24" in result and "192.0.2.20" in result
    if backend_data is not None:
        assert isinstance(parse_peer_data(backend_data), str)
    assert re.search(reason, result), result


def test_hostile_peer_data_is_cut_short_in_reasons() -> None:
    reason = parse_peer_data('{"PublicKey":"' + "A" * 100000 + '"}')
    assert isinstance(reason, str) and len(reason) < 400


def test_go_json_peer_data_is_case_insensitive() -> None:
    assert parse_peer_data(f'{{"publickey":"{K1}","port":7}}') == parse_peer_data(
        f'{{"PublicKey":"{K1}","Port":7}}'
    )


def test_desired_peers_merge_shared_keys_and_skip_our_own() -> None:
    own = K2
    old = lease(K1, ip="192.0.2.21", subnet=IPv4Network("10.5.8.0/24"), expiration=100.0)
    new = lease(K1, ip="192.0.2.20", expiration=200.0)
    mine = lease(own, ip="192.0.2.10", subnet=IPv4Network("10.5.9.0/24"))
    broken = Lease(IPv4Network("10.5.10.0/24"), LeaseAttrs(IPv4Address("192.0.2.30"), "wireguard"))
    wanted, skipped, warnings = desired_peers([new, mine, broken, old], RULES, own)
    assert wanted == {
        "v4": {
            K1: PeerConfig.make(
                K1, "192.0.2.20:51820", [SUB, ip_network("10.5.8.0/24")]
            )  # newest endpoint
        }
    }
    assert len(skipped) == 1 and "10.5.10.0-24" in skipped[0]
    assert any("own public key" in w for w in warnings)
    assert any("192.0.2.21:51820 and 192.0.2.20:51820" in w for w in warnings)


def test_peer_changes() -> None:
    a = PeerConfig.make(K1, "192.0.2.20:51820", [SUB])
    b = PeerConfig.make(K2, "192.0.2.21:51820", [IPv4Network("10.5.8.0/24")])
    moved = PeerConfig.make(K1, "192.0.2.99:51820", [SUB])
    assert peer_changes({K1: a}, {K1: a}) == ([], [])
    assert peer_changes({K1: moved}, {K1: a, K2: b}) == ([moved], [K2])
    assert peer_changes({K1: a, K2: b}, {}) == ([a, b], [])
