"""Security, files: the modes Loden documents (SECURITY.md), whatever the umask.

subnet.env 0644 in a 0755 directory, the state directory 0700, the WireGuard private
key 0400. The agent-level check (a real agent under umask 077) is in
tests/chaos/test_chaos_security.py.
"""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from loden.errors import ConfigError
from loden.files import atomic_write, check_writable, ensure_private_dir


@pytest.fixture(params=[0o000, 0o077, 0o022])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_subnet_env_and_state_dir_modes(tmp_path: Path, umask: int) -> None:
    subnet_env = tmp_path / "run" / "flannel" / "subnet.env"
    check_writable(subnet_env)
    atomic_write(subnet_env, b"FLANNEL_SUBNET=10.5.3.1/24\n")
    assert (mode(subnet_env), mode(subnet_env.parent)) == (0o644, 0o755)
    state = tmp_path / "var" / "lib" / "loden"
    ensure_private_dir(state)
    assert mode(state) == 0o700
    assert [p.name for p in subnet_env.parent.iterdir()] == ["subnet.env"]  # no temp left


def test_unwritable_subnet_file_paths_are_refused_up_front(tmp_path: Path) -> None:
    directory = tmp_path / "subnet.env"
    directory.mkdir()
    with pytest.raises(ConfigError, match="it is a directory"):
        check_writable(directory)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        check_writable(blocker / "subnet.env")  # its "directory" is a file
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_private_dir(blocker)


def test_wireguard_private_key_is_0400(tmp_path: Path, umask: int) -> None:
    try:
        wg = importlib.import_module("loden.kernel.wireguard")
    except ModuleNotFoundError:
        pytest.skip("no wireguard backend in this tree")
    key_file = tmp_path / "run" / "flannel" / "wgkey"
    key, created = wg.load_or_create_private_key(key_file)
    assert created and mode(key_file) == 0o400
    assert key_file.read_text() == key  # no newline, nothing else
    again, created = wg.load_or_create_private_key(key_file)
    assert (again, created) == (key, False)
