"""The kernel WireGuard path (issue 10 §5): run-time detection with the wireguard-go
fallback, and the ``wg`` translation of a configuration change.

This machine's kernel has no WireGuard, so the kernel device itself cannot be created
here: the detection is driven by a netlink double that answers as a kernel with
WireGuard would (the link is created), or as one without (EOPNOTSUPP, what the real
kernel here answers: tests/integration/test_wireguard_dataplane.py checks that).
"""

from __future__ import annotations

import base64
import errno
import logging
import stat
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.wireguard import WireguardBackend, WireguardNetwork
from loden.errors import DataplaneError
from loden.kernel.types import Link
from loden.kernel.wireguard.kernel import KernelWireguard, parse_dump, set_argv, unsupported
from loden.kernel.wireguard.uapi import PeerConfig, SetRequest
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.settings import BackendSettings

K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()
K3 = base64.b64encode(b"\x03" * 32).decode()
PSK = base64.b64encode(b"\x07" * 32).decode()
PRIV = base64.b64encode(bytes.fromhex("77" + "07" * 31)).decode()


def test_set_argv_writes_every_peer_in_full_and_keys_only_to_files(tmp_path: Path) -> None:
    peer = PeerConfig.make(
        K1, "192.0.2.20:51820", [IPv4Network("10.5.2.0/24"), IPv4Network("10.5.3.0/24")], PSK, 25
    )
    bare = PeerConfig.make(K2, None, [IPv4Network("10.5.4.0/24")])
    request = SetRequest(
        private_key=PRIV, listen_port=51820, replace_peers=True, peers=(peer, bare)
    )
    argv = set_argv("flannel-wg", request, [K1, K3], tmp_path)
    assert PRIV not in argv and PSK not in argv
    files = sorted(tmp_path.iterdir())
    assert [f.read_text() for f in files] == [PRIV + "\n", PSK + "\n"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert argv == [
        *("wg", "set", "flannel-wg", "private-key", str(files[0]), "listen-port", "51820"),
        *("peer", K3, "remove"),  # replace_peers: on the device, not in the request
        *("peer", K1, "preshared-key", str(files[1]), "endpoint", "192.0.2.20:51820"),
        *("persistent-keepalive", "25", "allowed-ips", "10.5.2.0/24,10.5.3.0/24"),
        *("peer", K2, "preshared-key", "/dev/null", "persistent-keepalive", "off"),
        *("allowed-ips", "10.5.4.0/24"),
    ]


def test_set_argv_removes() -> None:
    argv = set_argv("wg0", SetRequest(remove=(K1,)), [], Path("/nonexistent"))
    assert argv == ["wg", "set", "wg0", "peer", K1, "remove"]


def test_parse_dump() -> None:
    text = (
        f"{PRIV}\t{K3}\t51820\toff\n"
        f"{K1}\t{PSK}\t192.0.2.20:51820\t10.5.2.0/24,10.5.3.0/24\t1700000000\t10\t20\t25\n"
        f"{K2}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
    )
    state = parse_dump(text)
    assert state.private_key == PRIV and state.listen_port == 51820
    assert state.peer_configs() == {
        K1: PeerConfig.make(
            K1,
            "192.0.2.20:51820",
            [IPv4Network("10.5.2.0/24"), IPv4Network("10.5.3.0/24")],
            PSK,
            25,
        ),
        K2: PeerConfig.make(K2, None, []),
    }
    assert state.peers[0].last_handshake == 1700000000 and state.peers[0].tx_bytes == 20
    with pytest.raises(ValueError):
        parse_dump("garbage\n")


class FakeNetlink:
    """Answers ``create_link`` like a kernel with (``error`` None) or without WireGuard."""

    def __init__(self, error: int | None) -> None:
        self.error = error
        self.created: list[tuple[str, str]] = []

    async def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> Link:
        if self.error is not None:
            raise DataplaneError("create", f"{kind} device {name}", "no", errno=self.error)
        self.created.append((name, kind))
        return Link(index=7, name=name, kind=kind, mtu=mtu or 0, mac=None, up=False)


def _network(tmp_path: Path, nl: FakeNetlink) -> tuple[WireguardBackend, WireguardNetwork]:
    key = tmp_path / "wgkey"
    key.write_text(PRIV)
    config = NetworkConfig.parse('{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}')
    ip = IPv4Address("192.0.2.10")
    ext = ExternalInterface("eth0", 2, 1500, ip, ip)
    backend = WireguardBackend(
        BackendContext(config, ext, tmp_path, BackendSettings(wireguard_key_file=key))
    )
    backend.load_keys()
    lease = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(ip, "wireguard"))
    return backend, WireguardNetwork(backend, lease, nl)  # type: ignore[arg-type]


async def test_a_kernel_with_wireguard_gets_kernel_links(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nl = FakeNetlink(None)
    backend, net = _network(tmp_path, nl)
    with caplog.at_level(logging.INFO):
        device, link = await net._new_device(net._devices[0])
        again, _ = await net._new_device(net._devices[0])
    assert isinstance(device, KernelWireguard) and isinstance(again, KernelWireguard)
    assert device.implementation == "kernel" and backend.implementation == "kernel"
    assert nl.created == [("flannel-wg", "wireguard")] * 2 and link.index == 7
    said = [r.getMessage() for r in caplog.records if "running kernel" in r.getMessage()]
    assert said == [
        "wireguard: the running kernel has WireGuard: the devices are kernel wireguard"
        " links, as Go flanneld creates"
    ]  # once, not per device


async def test_other_link_failures_are_not_taken_for_a_missing_wireguard(
    tmp_path: Path,
) -> None:
    backend, net = _network(tmp_path, FakeNetlink(errno.EPERM))
    with pytest.raises(DataplaneError):
        await net._new_device(net._devices[0])
    assert backend.implementation is None


async def test_once_kernel_always_kernel(tmp_path: Path) -> None:
    """A kernel that had WireGuard for the first device does not silently switch to
    wireguard-go for a later one: the failure is reported as it is."""
    backend, net = _network(tmp_path, FakeNetlink(errno.EOPNOTSUPP))
    backend.implementation = "kernel"
    with pytest.raises(DataplaneError):
        await net._new_device(net._devices[0])


def test_unsupported_errnos() -> None:
    assert unsupported(DataplaneError("create", "x", "y", errno=errno.EOPNOTSUPP))
    assert not unsupported(DataplaneError("create", "x", "y", errno=errno.EEXIST))
    assert not unsupported(DataplaneError("create", "x", "y"))
