"""subnet.env: bytes and mode as flannel writes them; tolerant read-back."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from loden.files import atomic_write, read_previous_subnets
from loden.model.subnet_env import SubnetEnv, read_previous


def test_ipv4_bytes() -> None:
    env = SubnetEnv(
        IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), None, None, 1450, False
    )
    assert env.render() == (
        b"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
        b"FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )


def test_dual_stack_bytes() -> None:
    env = SubnetEnv(
        IPv4Network("10.42.0.0/16"),
        IPv4Network("10.42.0.0/24"),
        IPv6Network("2001:cafe:42::/56"),
        IPv6Network("2001:cafe:42::/64"),
        1450,
        True,
    )
    assert env.render() == (
        b"FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n"
        b"FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        b"FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )


def test_atomic_write_mode_ignores_umask(tmp_path: Path) -> None:
    target = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        atomic_write(target, b"X=1\n")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"X=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["subnet.env"]


def test_previous_subnet_read_back_tolerates_quotes_export_and_lists(tmp_path: Path) -> None:
    prev = read_previous(
        "# comment\nexport FLANNEL_NETWORK=\"10.5.0.0/16\"\nFLANNEL_SUBNET='10.5.72.1/24'\n"
    )
    assert prev.network == IPv4Network("10.5.0.0/16")
    assert prev.subnet == IPv4Network("10.5.72.0/24")
    assert read_previous("FLANNEL_SUBNET=bogus,10.5.9.1/24\n").subnet == IPv4Network("10.5.9.0/24")
    assert read_previous("FLANNEL_SUBNET=10.5.9.1/24,10.5.8.1/24\n").subnet is None
    assert read_previous("FLANNEL_SUBNET=garbage\n").subnet is None
    assert read_previous_subnets(tmp_path / "missing").subnet is None


def test_mk_docker_opts_rewritten_file_gives_no_previous_subnet() -> None:
    text = (
        'DOCKER_OPT_BIP="--bip=172.17.40.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1500"\n'
        'DOCKER_NETWORK_OPTIONS=" --bip=172.17.40.1/24 --ip-masq=false --mtu=1500"\n'
    )
    assert read_previous(text).subnet is None


@given(st.text(max_size=300))
def test_read_previous_never_raises(text: str) -> None:
    read_previous(text)
