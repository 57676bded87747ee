"""WireGuard plumbing: keys, the cross-platform UAPI, and a supervised ``wireguard-go``.

This kernel has no WireGuard module, so a WireGuard device is a TUN served by
``wireguard-go`` (the reference user-space implementation). Three pieces live here:

*Keys.* A private key is 32 random bytes clamped as Curve25519 requires (exactly what
``wg genkey`` and Go's ``wgtypes.GeneratePrivateKey`` produce); the public key is
derived with the ``cryptography`` package's X25519. Nothing else here touches key
material: encryption is wireguard-go's job. Keys travel as base64 (lease JSON, key
file, ``wg``) and as hex on the UAPI; converting between the two is only encoding.

*The UAPI* (https://www.wireguard.com/xplatform/): ``get=1`` / ``set=1`` text
messages over the unix socket ``/var/run/wireguard/<dev>.sock``, the same interface
``wg`` uses for user-space devices. Talking to it directly costs one local round
trip per change instead of a ``wg`` fork, and lets one message carry every peer
change of a reconcile. :func:`render_set` and :func:`parse_get` are pure functions.
The socket lives in the filesystem, not in a network namespace: two devices of the
same name in two namespaces that share ``/var/run/wireguard`` collide, which is why
tests give every device a unique name (a real node has one ``flannel-wg``).

*The process.* :class:`WireguardGo` runs ``wireguard-go -f <dev>`` as a child in its
own session (a terminal's Ctrl-C reaches only the agent, which shuts it down in order)
with the parent-death signal set to SIGTERM (``setpriv --pdeathsig``): a wireguard-go
that outlives its supervisor could not be supervised, would keep a deleted test
namespace alive, and would block the next start's socket. SIGTERM makes wireguard-go
close the TUN (the device disappears) and remove its socket; so does deleting the
device, which ends the process within ~20 ms.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno as errno_mod
import logging
import os
import shutil
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from loden.errors import ConfigError, DataplaneError
from loden.files import replace_file
from loden.kernel.netns import netns_argv

log = logging.getLogger(__name__)

KEY_LEN = 32
SOCKET_DIR = Path("/var/run/wireguard")
_ZERO_KEY_HEX = "0" * 64
#: Largest UAPI answer accepted (a ``get`` of 5,000 peers is ~1.5 MB).
_READ_LIMIT = 64 << 20

IPNetwork = IPv4Network | IPv6Network


# -- keys ------------------------------------------------------------------------------


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


def _hex(key: str) -> str:
    raw = decode_key(key)
    if raw is None:
        raise ValueError(f"not a base64 WireGuard key: {key!r}")
    return raw.hex()


def _from_hex(text: str) -> str:
    return encode_key(bytes.fromhex(text))


# -- configuration values --------------------------------------------------------------


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
        lines.append(f"private_key={_hex(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for key in remove:
        lines += [f"public_key={_hex(key)}", "remove=true"]
    for peer in peers:
        lines.append(f"public_key={_hex(peer.public_key)}")
        psk = _hex(peer.preshared_key) if peer.preshared_key else _ZERO_KEY_HEX
        lines.append(f"preshared_key={psk}")
        if peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={net}" for net in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


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
                private_key = _from_hex(value) if value != _ZERO_KEY_HEX else None
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "public_key":
                flush()
                current = {"key": _from_hex(value), "allowed": []}
            elif current is None:
                continue  # fwmark and future device-level keys
            elif key == "preshared_key":
                current["psk"] = _from_hex(value) if value != _ZERO_KEY_HEX else ""
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


# -- the socket ----------------------------------------------------------------------


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
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


# -- the process -----------------------------------------------------------------------


class WireguardGo:
    """One ``wireguard-go -f <name>`` child serving the TUN device ``name``.

    ``netns`` (a name under /var/run/netns or a path) starts it inside that network
    namespace through ``nsenter``, so its TUN and UDP sockets live there.
    """

    def __init__(self, name: str, *, netns: str | None = None, binary: str = "wireguard-go"):
        self.name = name
        self.netns = netns
        self.binary = binary
        self.uapi = Uapi(name)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def argv(self) -> list[str]:
        binary = shutil.which(self.binary)
        if binary is None:
            raise DataplaneError(
                "start",
                f"wireguard device {self.name}",
                f"{self.binary} is not installed: install wireguard-go (apt install"
                " wireguard-go), it serves WireGuard devices on kernels without the module",
            )
        argv = [binary, "-f", self.name]
        if self.netns is not None:
            argv = netns_argv(self.netns, argv)
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        else:
            log.warning("setpriv not found: wireguard-go %s will outlive a killed agent", self.name)
        return argv

    async def start(self, timeout: float = 5.0) -> None:
        """Start the process and wait until its UAPI socket answers.

        :raises DataplaneError: it is missing, exits, or does not answer in time.
        """
        obj = f"wireguard device {self.name}"
        argv = self.argv()
        env = {
            **os.environ,
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "error"),
            # Also silences the "your kernel has WireGuard" banner of foreground mode.
            "WG_PROCESS_FOREGROUND": "1",
        }
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True
            )
        except OSError as exc:
            raise DataplaneError("start", obj, f"{argv[0]}: {exc.strerror or exc}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._proc.returncode is not None:
                raise DataplaneError(
                    "start",
                    obj,
                    f"wireguard-go exited with status {self._proc.returncode}; see its"
                    " messages above (is /dev/net/tun available?)",
                )
            if await self.uapi.alive():
                return
            if loop.time() >= deadline:
                await self.stop()
                raise DataplaneError("start", obj, f"no UAPI socket after {timeout:g}s")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (wireguard-go removes the TUN and its socket), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # A killed wireguard-go leaves its socket behind; the next start would test it.
        if not await self.uapi.alive():
            with contextlib.suppress(OSError):
                self.uapi.path.unlink()


__all__ = [
    "DeviceState",
    "PeerConfig",
    "PeerStatus",
    "Uapi",
    "WireguardGo",
    "decode_key",
    "encode_key",
    "endpoint_text",
    "generate_private_key",
    "load_or_create_private_key",
    "parse_get",
    "public_key_of",
    "render_set",
    "socket_path",
    "write_key_file",
]
