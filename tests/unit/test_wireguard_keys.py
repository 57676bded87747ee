"""wireguard key handling: generation, derivation, the key file (create, mode, parse)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from loden.errors import ConfigError
from loden.kernel.wireguard.keys import (
    decode_key,
    generate_private_key,
    load_or_create_private_key,
    public_key_of,
)

# RFC 7748 §6.1 (X25519): Alice's private and public keys.
RFC_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_public_key_matches_rfc7748_vector() -> None:
    assert public_key_of(b64(RFC_PRIVATE)) == b64(RFC_PUBLIC)


def test_generated_keys_are_clamped_and_distinct() -> None:
    keys = {generate_private_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        raw = decode_key(key)
        assert raw is not None and len(key) == 44
        assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_agrees_with_wg_pubkey() -> None:
    key = generate_private_key()
    out = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == public_key_of(key)


@pytest.mark.parametrize(
    "text",
    ["", "abc", b64(b"x" * 31), b64(b"x" * 33), "!" * 44, b64(b"x" * 32)[:-1] + "*"],
)
def test_decode_key_rejects_non_keys(text: str) -> None:
    assert decode_key(text) is None


def test_decode_key_ignores_surrounding_whitespace() -> None:
    assert decode_key(f"  {b64(RFC_PRIVATE)}\n") == RFC_PRIVATE


def test_key_file_is_created_0400_without_newline_in_0755_dirs(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "wgkey"
    key, created = load_or_create_private_key(path)
    assert created
    assert path.read_text() == key and "\n" not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o400
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert path.parent.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in path.parent.iterdir()] == ["wgkey"]  # no temporary left over
    again, created = load_or_create_private_key(path)
    assert (again, created) == (key, False)


def test_existing_key_file_is_parsed_and_a_newline_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "wgkey"
    path.write_text(b64(RFC_PRIVATE) + "\n")  # as `wg genkey > wgkey` writes it
    key, created = load_or_create_private_key(path)
    assert (key, created) == (b64(RFC_PRIVATE), False)
    assert public_key_of(key) == b64(RFC_PUBLIC)


def test_malformed_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "wgkey"
    path.write_text("not a key")
    with pytest.raises(ConfigError, match=r"does not hold a base64 WireGuard private key"):
        load_or_create_private_key(path)
    assert path.read_text() == "not a key"  # never overwritten


def test_unreadable_or_unwritable_key_file_is_a_config_error(tmp_path: Path) -> None:
    directory = tmp_path / "wgkey"
    directory.mkdir()
    with pytest.raises(ConfigError, match=r"cannot read the wireguard key file"):
        load_or_create_private_key(directory)
    # Missing, and its directory cannot be created (not even by root: /proc).
    with pytest.raises(ConfigError, match=r"cannot write the wireguard key file"):
        load_or_create_private_key(Path("/proc/loden-no-such-dir/wgkey"))
