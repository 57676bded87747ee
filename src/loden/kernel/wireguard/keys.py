"""WireGuard keys: generation, derivation, the key file.

A private key is 32 random bytes clamped as Curve25519 requires (exactly what
``wg genkey`` and Go's ``wgtypes.GeneratePrivateKey`` produce); the public key is
derived with the ``cryptography`` package's X25519. Nothing else in Loden touches key
material: encryption is the kernel's or wireguard-go's job. Keys travel as base64
(lease JSON, key file, ``wg``) and as hex on the UAPI; converting between the two is
only encoding.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from loden.errors import ConfigError
from loden.files import replace_file

KEY_LEN = 32


def decode_key(text: str) -> bytes | None:
    """The 32 bytes of a base64 WireGuard key, or None if ``text`` is not one.

    Surrounding whitespace is ignored (a key file written by ``wg genkey > file`` ends
    with a newline; Go flannel rejects that, Loden accepts it)."""
    value = text.strip()
    if len(value) != 44:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def generate_private_key() -> str:
    """A new private key (base64), clamped like ``wg genkey``."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes_raw())
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return encode_key(bytes(raw))


def public_key_of(private_key: str) -> str:
    """The public key (base64) of a base64 private key.

    :raises ValueError: ``private_key`` is not a WireGuard key.
    """
    raw = decode_key(private_key)
    if raw is None:
        raise ValueError("not a base64 WireGuard key")
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return encode_key(public)


def load_or_create_private_key(path: Path) -> tuple[str, bool]:
    """flannel's key file rule: parse ``path`` if it exists, else generate and write it.

    Written as the base64 key without a newline, mode 0400, parent directories created
    0755. The write goes through a temporary file and a rename, so a crash never leaves
    a half-written key (flannel creates, chmods, then writes in place). Returns the
    key and whether it was generated.

    :raises ConfigError: the file cannot be read or written, or holds no valid key.
    """
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        key = generate_private_key()
        write_key_file(path, key)
        return key, True
    except OSError as exc:
        raise ConfigError(
            f"cannot read the wireguard key file {path}: {exc.strerror or exc};"
            " fix its permissions or point WIREGUARD_KEY_FILE elsewhere"
        ) from exc
    if decode_key(text) is None:
        raise ConfigError(
            f"wireguard key file {path} does not hold a base64 WireGuard private key"
            " (44 characters, e.g. from `wg genkey`): fix it, or delete it to have a new"
            " key generated (peers learn the new public key from the lease)"
        )
    return text.strip(), False


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` (0400, no newline; missing parents made 0755).

    :raises ConfigError: the directory or file cannot be written.
    """
    try:
        replace_file(path, key.encode("ascii"), mode=0o400, dir_mode=0o755)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the wireguard key file {path}: {exc.strerror or exc};"
            " make its directory writable or set WIREGUARD_KEY_FILE"
        ) from exc


def key_hex(key: str) -> str:
    """A base64 key as the UAPI's hex.

    :raises ValueError: ``key`` is not a base64 WireGuard key.
    """
    raw = decode_key(key)
    if raw is None:
        raise ValueError(f"not a base64 WireGuard key: {key!r}")
    return raw.hex()


def key_from_hex(text: str) -> str:
    return encode_key(bytes.fromhex(text))


__all__ = [
    "KEY_LEN",
    "decode_key",
    "encode_key",
    "generate_private_key",
    "key_from_hex",
    "key_hex",
    "load_or_create_private_key",
    "public_key_of",
    "write_key_file",
]
