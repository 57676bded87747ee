"""The WireGuard cross-platform UAPI (https://www.wireguard.com/xplatform/): values,
the text codec, and the client of a user-space device's socket.

``get=1`` / ``set=1`` text messages over the unix socket
``/var/run/wireguard/<dev>.sock``, the same interface ``wg`` uses for user-space
devices. Talking to it directly costs one local round trip per change instead of a
``wg`` fork, and lets one message carry every peer change of a reconcile.
:func:`render_set` and :func:`parse_get` are pure functions; :class:`PeerConfig` and
:class:`DeviceState` are also what the kernel device (:mod:`.kernel`) reads and writes.
The socket lives in the filesystem, not in a network namespace: two devices of the
same name in two namespaces that share ``/var/run/wireguard`` collide, which is why
tests give every device a unique name (a real node has one ``flannel-wg``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from loden.errors import DataplaneError
from loden.kernel.wireguard.keys import key_from_hex, key_hex

SOCKET_DIR = Path("/var/run/wireguard")
ZERO_KEY_HEX = "0" * 64
#: Largest UAPI answer accepted (a ``get`` of 5,000 peers is ~1.5 MB).
_READ_LIMIT = 64 << 20

IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer as Loden programs it and compares it with the device.

    Values are canonical so that ``==`` means "the device already does this":
    ``allowed_ips`` sorted, ``endpoint`` as wireguard-go prints it (``1.2.3.4:51820``,
    ``[fd00::1]:51821``), ``preshared_key`` None for "none" (an all-zero key).
    """

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[IPNetwork, ...]
    preshared_key: str | None = None
    keepalive: int = 0

    @staticmethod
    def make(
        public_key: str,
        endpoint: str | None,
        allowed_ips: Iterable[IPNetwork],
        preshared_key: str | None = None,
        keepalive: int = 0,
    ) -> PeerConfig:
        ips = tuple(sorted(set(allowed_ips), key=lambda n: (n.version, n)))
        return PeerConfig(public_key, endpoint, ips, preshared_key or None, keepalive)


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer read back from the device: its configuration and its counters."""

    config: PeerConfig
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class DeviceState:
    private_key: str | None
    listen_port: int
    peers: tuple[PeerStatus, ...] = field(default_factory=tuple)

    def peer_configs(self) -> dict[str, PeerConfig]:
        return {p.config.public_key: p.config for p in self.peers}


def endpoint_text(ip: object, port: int) -> str:
    """``ip:port`` for IPv4, ``[ip]:port`` for IPv6 (wireguard-go's spelling)."""
    text = str(ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def render_set(
    *,
    private_key: str | None = None,
    listen_port: int | None = None,
    replace_peers: bool = False,
    peers: Sequence[PeerConfig] = (),
    remove: Sequence[str] = (),
) -> str:
    """A UAPI ``set`` message.

    Every peer is written in full (preshared key, keepalive, ``replace_allowed_ips``),
    so the result never depends on what the device held before; only peers that differ
    are sent at all (see the backend), so live sessions are never reset.

    :raises ValueError: a key is not a base64 WireGuard key.
    """
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={key_hex(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for key in remove:
        lines += [f"public_key={key_hex(key)}", "remove=true"]
    for peer in peers:
        lines.append(f"public_key={key_hex(peer.public_key)}")
        psk = key_hex(peer.preshared_key) if peer.preshared_key else ZERO_KEY_HEX
        lines.append(f"preshared_key={psk}")
        if peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={net}" for net in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


@dataclass(frozen=True, slots=True)
class SetRequest:
    """One configuration change of a device, whichever implementation serves it (the
    UAPI renders it with :func:`render_set`, a kernel device with ``wg set``)."""

    private_key: str | None = None
    listen_port: int | None = None
    #: Remove every peer the request does not name.
    replace_peers: bool = False
    peers: tuple[PeerConfig, ...] = ()
    remove: tuple[str, ...] = ()

    def render(self) -> str:
        return render_set(
            private_key=self.private_key,
            listen_port=self.listen_port,
            replace_peers=self.replace_peers,
            peers=self.peers,
            remove=self.remove,
        )


class UapiError(ValueError):
    """A UAPI answer that does not parse (internal; mapped to DataplaneError)."""


def parse_get(text: str) -> DeviceState:
    """Parse the answer to ``get=1`` (everything up to and including ``errno=``).

    :raises UapiError: a malformed line or a non-zero errno.
    """
    private_key: str | None = None
    listen_port = 0
    peers: list[PeerStatus] = []
    current: dict[str, object] | None = None

    def flush() -> None:
        if current is None:
            return
        sec = int(str(current.get("sec", 0)))
        nsec = int(str(current.get("nsec", 0)))
        allowed = current.get("allowed", [])
        assert isinstance(allowed, list)
        config = PeerConfig.make(
            str(current["key"]),
            str(current["endpoint"]) if current.get("endpoint") else None,
            allowed,
            str(current["psk"]) if current.get("psk") else None,
            int(str(current.get("keepalive", 0))),
        )
        peers.append(
            PeerStatus(
                config,
                sec + nsec / 1e9,
                int(str(current.get("rx", 0))),
                int(str(current.get("tx", 0))),
            )
        )

    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"malformed UAPI line {line!r}")
        try:
            if key == "errno":
                if int(value) != 0:
                    raise UapiError(f"errno={value}")
                break
            if key == "private_key":
                private_key = key_from_hex(value) if value != ZERO_KEY_HEX else None
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "public_key":
                flush()
                current = {"key": key_from_hex(value), "allowed": []}
            elif current is None:
                continue  # fwmark and future device-level keys
            elif key == "preshared_key":
                current["psk"] = key_from_hex(value) if value != ZERO_KEY_HEX else ""
            elif key == "endpoint":
                current["endpoint"] = value
            elif key == "persistent_keepalive_interval":
                current["keepalive"] = int(value)
            elif key == "allowed_ip":
                allowed = current["allowed"]
                assert isinstance(allowed, list)
                allowed.append(ip_network(value, strict=False))
            elif key == "last_handshake_time_sec":
                current["sec"] = int(value)
            elif key == "last_handshake_time_nsec":
                current["nsec"] = int(value)
            elif key == "rx_bytes":
                current["rx"] = int(value)
            elif key == "tx_bytes":
                current["tx"] = int(value)
        except ValueError as exc:
            if isinstance(exc, UapiError):
                raise
            raise UapiError(f"malformed UAPI line {line!r}: {exc}") from exc
    flush()
    return DeviceState(private_key, listen_port, tuple(peers))


def socket_path(name: str) -> Path:
    return SOCKET_DIR / f"{name}.sock"


class Uapi:
    """Client of one device's UAPI socket (a connection per operation)."""

    def __init__(self, name: str, *, timeout: float = 5.0) -> None:
        self.name = name
        self.path = socket_path(name)
        self.timeout = timeout

    async def _exchange(self, op: str, message: str) -> str:
        obj = f"wireguard device {self.name} ({self.path})"
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.path), limit=_READ_LIMIT
                )
                try:
                    writer.write(message.encode("ascii"))
                    await writer.drain()
                    answer = await reader.readuntil(b"\n\n")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError as exc:
            raise DataplaneError(op, obj, f"no UAPI answer within {self.timeout:g}s") from exc
        except asyncio.IncompleteReadError as exc:
            raise DataplaneError(op, obj, "wireguard-go closed the UAPI socket early") from exc
        except OSError as exc:
            code = exc.errno
            detail = f"{os.strerror(code)} ({errno_mod.errorcode.get(code, code)})" if code else ""
            raise DataplaneError(op, obj, detail or str(exc), errno=code) from exc
        return answer.decode("ascii", "replace")

    async def get(self) -> DeviceState:
        """:raises DataplaneError: the device does not answer or answers nonsense."""
        text = await self._exchange("read", "get=1\n\n")
        try:
            return parse_get(text)
        except UapiError as exc:
            raise DataplaneError("read", f"wireguard device {self.name}", str(exc)) from exc

    async def set(self, message: str) -> None:
        """Send a ``set`` message (see :func:`render_set`).

        :raises DataplaneError: wireguard-go rejected it (errno) or did not answer.
        """
        text = await self._exchange("configure", message)
        for line in text.splitlines():
            if line.startswith("errno="):
                code = abs(int(line[6:] or "0"))
                if code:
                    raise DataplaneError(
                        "configure",
                        f"wireguard device {self.name}",
                        f"wireguard-go answered errno {code} ({os.strerror(code)});"
                        " its log has the reason",
                        errno=code,
                    )
                return
        raise DataplaneError("configure", f"wireguard device {self.name}", "no errno in answer")

    async def alive(self) -> bool:
        """Does a process accept connections on the socket right now?"""
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_unix_connection(str(self.path))
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


__all__ = [
    "SOCKET_DIR",
    "DeviceState",
    "PeerConfig",
    "PeerStatus",
    "SetRequest",
    "Uapi",
    "UapiError",
    "endpoint_text",
    "parse_get",
    "render_set",
    "socket_path",
]
