"""The agent's side of the data path: a pool of worker processes and their control sockets.

Each worker (:mod:`loden.udp.worker`) is started with ``subprocess.Popen`` (not
``fork``: the agent is an asyncio process that may have threads) and inherits its TUN
queue fd, its UDP socket and one end of a ``SOCK_SEQPACKET`` socket pair. The pool
closes its copies of the TUN and UDP fds once a worker has them, so the TUN device
lives exactly as long as the workers do.

Everything here is bounded in time: sends to a worker wait at most
:data:`SEND_TIMEOUT` for room, stats replies :data:`STATS_TIMEOUT`, and :meth:`aclose`
waits :data:`STOP_TIMEOUT` before killing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from loden.errors import DataplaneError
from loden.udp import peers as peer_codec
from loden.udp.peers import PeerTable

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0
STATS_TIMEOUT = 2.0
STOP_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What every worker of one pool shares."""

    vnet: bool
    tun_addr: IPv4Address
    port: int


class _Slot:
    __slots__ = ("ctl", "proc")

    def __init__(self, ctl: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.ctl = ctl
        self.proc = proc


class WorkerPool:
    """Starts, feeds and stops the worker processes of one udp Network."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.table = PeerTable(port=spec.port)
        self._slots: list[_Slot | None] = []

    def __len__(self) -> int:
        return len(self._slots)

    def start(self, index: int | None, tun_fd: int, sock: socket.socket) -> int:
        """Start a worker with ``tun_fd`` and ``sock`` (both closed here afterwards).

        ``index`` None appends a slot; otherwise the slot is reused (respawn). The new
        worker gets the current peer table before any packet (control messages are
        queued in order). Returns the slot index.

        :raises DataplaneError: the process cannot be started.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [
                sys.executable,
                "-m",
                "loden.udp.worker",
                "--ctl",
                str(child.fileno()),
                "--sock",
                str(sock.fileno()),
                "--tun",
                str(tun_fd),
                "--vnet",
                "1" if self.spec.vnet else "0",
                "--tun-addr",
                str(self.spec.tun_addr),
                "--port",
                str(self.spec.port),
            ]
            try:
                proc = subprocess.Popen(
                    argv, pass_fds=(child.fileno(), sock.fileno(), tun_fd), stdin=subprocess.DEVNULL
                )
            except OSError as exc:
                parent.close()
                raise DataplaneError("start", "udp worker", str(exc), errno=exc.errno) from exc
        finally:
            child.close()
            sock.close()
            os.close(tun_fd)
        parent.setblocking(False)
        slot = _Slot(parent, proc)
        if index is None:
            self._slots.append(slot)
            index = len(self._slots) - 1
        else:
            old = self._slots[index]
            if old is not None:
                old.ctl.close()
            self._slots[index] = slot
        for msg in peer_codec.encode(self.table):
            # A fresh socket pair has room for a first table of ordinary size.
            with contextlib.suppress(BlockingIOError):
                parent.send(msg)
        log.info("udp worker %d started (pid %d)", index, proc.pid)
        return index

    def dead(self) -> list[int]:
        """Indexes of slots whose process has exited (or never started)."""
        out = []
        for i, slot in enumerate(self._slots):
            if slot is None or slot.proc.poll() is not None:
                out.append(i)
        return out

    def pids(self) -> list[int]:
        return [slot.proc.pid for slot in self._slots if slot is not None]

    async def _send(self, slot: _Slot, msg: bytes, fds: list[int] | None = None) -> bool:
        deadline = time.monotonic() + SEND_TIMEOUT
        while True:
            try:
                if fds:
                    socket.send_fds(slot.ctl, [msg], fds)
                else:
                    slot.ctl.send(msg)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.error("udp worker pid %d does not read its control socket", slot.proc.pid)
                    return False
                await asyncio.sleep(0.002)
            except OSError as exc:
                log.warning("udp worker pid %d: control send failed: %s", slot.proc.pid, exc)
                return False

    async def set_table(self, table: PeerTable) -> None:
        """Send ``table`` to every worker; each swaps it in when complete."""
        self.table = table
        messages = list(peer_codec.encode(table))
        for slot in self._slots:
            if slot is None:
                continue
            for msg in messages:
                if not await self._send(slot, msg):
                    break

    async def replace_tun(self, fds: list[int]) -> None:
        """Give worker i the TUN queue ``fds[i]`` (after the device was recreated)."""
        try:
            for slot, fd in zip(self._slots, fds, strict=False):
                if slot is not None:
                    await self._send(slot, b"T", [fd])
        finally:
            for fd in fds:
                os.close(fd)

    async def stats(self) -> list[dict[str, Any]]:
        """Counters of every live worker (workers that do not answer are skipped)."""
        loop = asyncio.get_running_loop()
        out: list[dict[str, Any]] = []
        for slot in self._slots:
            if slot is None or slot.proc.poll() is not None:
                continue
            if not await self._send(slot, b"S"):
                continue
            try:
                while True:
                    async with asyncio.timeout(STATS_TIMEOUT):
                        reply = await loop.sock_recv(slot.ctl, 1 << 16)
                    if not reply or reply[:1] == b"S":
                        break
            except (TimeoutError, OSError):
                continue
            if reply:
                out.append(json.loads(reply[1:]))
        return out

    async def aclose(self) -> None:
        """Close every control socket (workers exit on EOF); kill stragglers."""
        slots = [slot for slot in self._slots if slot is not None]
        self._slots = []
        for slot in slots:
            slot.ctl.close()
        deadline = time.monotonic() + STOP_TIMEOUT
        for slot in slots:
            while slot.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if slot.proc.poll() is None:
                log.warning("udp worker pid %d did not exit; killing it", slot.proc.pid)
                slot.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    slot.proc.wait(1.0)
