"""The kernel's own WireGuard link (flannel's state), and the check whether this kernel
has one.

Go flanneld creates its devices as links of kind ``wireguard`` (``ip link add
flannel-wg type wireguard``) and configures them over generic netlink; kernels >= 5.6
have WireGuard built in or as a module, older ones need the backported module. Loden
does the same wherever the running kernel offers it, and falls back to a
``wireguard-go`` process (:mod:`.process`) only where it does not. Which one applies is
found out at run time by creating the link: the kernel answers ``EOPNOTSUPP`` for a link
kind it does not know (after trying to load ``wireguard.ko`` itself). Nothing is
assumed from the machine Loden was built or tested on.

A kernel device is configured with ``wg`` (wireguard-tools, which flannel's docs ask
for anyway), run in the device's network namespace: ``wg set`` writes exactly the
peers of one :class:`~loden.kernel.wireguard.uapi.SetRequest` (each in full, allowed IPs
replaced, so the result never depends on what the device held before), ``wg show
dump`` reads the device back. Keys go through files in a private temporary directory,
never on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path

from loden.errors import DataplaneError
from loden.kernel.netns import netns_argv
from loden.kernel.wireguard.uapi import DeviceState, PeerConfig, PeerStatus, SetRequest

KIND = "wireguard"
#: What creating a link of an unknown kind answers (no WireGuard in this kernel).
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP})
_TIMEOUT = 10.0


def unsupported(exc: DataplaneError) -> bool:
    """Does this failure to create a ``wireguard`` link mean the kernel has none?"""
    return exc.errno in UNSUPPORTED


def set_argv(name: str, request: SetRequest, current: Sequence[str], keydir: Path) -> list[str]:
    """``wg set`` arguments for ``request``; keys are written into ``keydir``.

    ``current``: public keys the device has now (``replace_peers`` removes the ones
    the request does not name).
    """
    count = 0

    def key_file(key: str) -> str:
        nonlocal count
        count += 1
        path = keydir / f"k{count}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        return str(path)

    argv = ["wg", "set", name]
    if request.private_key is not None:
        argv += ["private-key", key_file(request.private_key)]
    if request.listen_port is not None:
        argv += ["listen-port", str(request.listen_port)]
    named = {peer.public_key for peer in request.peers}
    remove = list(request.remove)
    if request.replace_peers:
        remove += [key for key in current if key not in named and key not in remove]
    for key in remove:
        argv += ["peer", key, "remove"]
    for peer in request.peers:
        psk = key_file(peer.preshared_key) if peer.preshared_key else "/dev/null"
        argv += ["peer", peer.public_key, "preshared-key", psk]
        if peer.endpoint:
            argv += ["endpoint", peer.endpoint]
        argv += ["persistent-keepalive", str(peer.keepalive) if peer.keepalive else "off"]
        argv += ["allowed-ips", ",".join(str(net) for net in peer.allowed_ips)]
    return argv


def parse_dump(text: str) -> DeviceState:
    """``wg show <dev> dump``: the device line, then one tab-separated line per peer.

    :raises ValueError: a line that does not have the expected fields.
    """
    rows = [line.split("\t") for line in text.splitlines() if line]
    if not rows or len(rows[0]) != 4:
        raise ValueError(f"unexpected first line of wg show dump: {text[:200]!r}")
    private, _, port, _ = rows[0]
    peers = []
    for row in rows[1:]:
        if len(row) != 8:
            raise ValueError(f"unexpected peer line of wg show dump: {row!r}")
        key, psk, endpoint, allowed, handshake, rx, tx, keepalive = row
        ips = [ip_network(a, strict=False) for a in allowed.split(",") if a and a != "(none)"]
        config = PeerConfig.make(
            key,
            None if endpoint == "(none)" else endpoint,
            ips,
            None if psk == "(none)" else psk,
            0 if keepalive == "off" else int(keepalive),
        )
        peers.append(PeerStatus(config, float(handshake), int(rx), int(tx)))
    return DeviceState(None if private == "(none)" else private, int(port), tuple(peers))


class KernelWireguard:
    """A kernel ``wireguard`` link named ``name`` (created by the caller through
    netlink), configured with ``wg``. No process: it lives as long as the link."""

    implementation = "kernel"

    def __init__(self, name: str, *, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns

    @property
    def pid(self) -> int | None:
        return None

    @property
    def running(self) -> bool:
        return True  # nothing to die; a deleted link is noticed by the caller

    @property
    def returncode(self) -> int | None:
        return None

    async def busy(self) -> bool:
        return False

    async def stop(self) -> None:
        """Nothing to stop: the caller deletes the link."""

    async def _wg(self, *args: str) -> str:
        obj = f"wireguard device {self.name}"
        if shutil.which("wg") is None:
            raise DataplaneError(
                "configure",
                obj,
                "wg is not installed: install wireguard-tools (apt install"
                " wireguard-tools), it configures kernel WireGuard devices",
            )
        argv = list(args) if self.netns is None else netns_argv(self.netns, args)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise DataplaneError(
                "configure", obj, f"wg did not answer within {_TIMEOUT:g}s"
            ) from None
        if proc.returncode:
            detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise DataplaneError("configure", obj, f"wg exited {proc.returncode}: {detail[0]}")
        return out.decode(errors="replace")

    async def get(self) -> DeviceState:
        """:raises DataplaneError: ``wg`` failed or printed something unexpected."""
        text = await self._wg("wg", "show", self.name, "dump")
        try:
            return parse_dump(text)
        except ValueError as exc:
            raise DataplaneError("read", f"wireguard device {self.name}", str(exc)) from exc

    async def set(self, request: SetRequest) -> None:
        """:raises DataplaneError: ``wg`` rejected the configuration."""
        current: list[str] = []
        if request.replace_peers:
            current = (await self._wg("wg", "show", self.name, "peers")).split()
        with tempfile.TemporaryDirectory(prefix="loden-wg-") as keydir:
            await self._wg(*set_argv(self.name, request, current, Path(keydir)))


__all__ = ["KIND", "KernelWireguard", "parse_dump", "set_argv", "unsupported"]
