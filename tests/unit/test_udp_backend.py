"""udp backend without a kernel: lease attrs, options, and the micro-benchmark as a check."""

from __future__ import annotations

import importlib.util
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.udp import UdpBackend
from loden.errors import InterfaceError
from loden.model.config import NetworkConfig

EXT = ExternalInterface("eth0", 2, 1500, IPv4Address("192.0.2.1"), IPv4Address("198.51.100.1"))


def ctx(backend: str = '{"Type":"udp"}', ext: ExternalInterface = EXT) -> BackendContext:
    cfg = NetworkConfig.parse(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')
    return BackendContext(cfg, ext, Path("/nonexistent"))


async def test_lease_has_public_ip_only() -> None:
    backend = create_backend("udp", ctx())
    attrs = await backend.lease_attrs()
    assert attrs.to_json() == '{"PublicIP":"198.51.100.1","PublicIPv6":null}'
    assert attrs.to_json(legacy=True) == '{"PublicIP":"198.51.100.1"}'


def test_port_option_and_default() -> None:
    backend = create_backend("udp", ctx('{"Type":"udp","port":9000}'))
    assert isinstance(backend, UdpBackend) and backend.port == 9000
    default = create_backend("udp", ctx())
    assert isinstance(default, UdpBackend) and default.port == 8285 and default.workers >= 1


def test_needs_an_interface_address() -> None:
    ext = ExternalInterface("eth0", 2, 1500, None, None)
    with pytest.raises(InterfaceError, match="eth0"):
        create_backend("udp", ctx(ext=ext))


def test_micro_benchmark_runs() -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "udp_datapath.py"
    spec = importlib.util.spec_from_file_location("udp_datapath_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = module.run(packets=200, rounds=1)
    assert set(results) == {"tun->wire small", "wire->tun small", "wire->tun tcp", "tun->wire tso"}
    assert all(loden > 0 and naive > 0 for loden, naive, _ in results.values())
