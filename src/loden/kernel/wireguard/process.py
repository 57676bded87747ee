"""The supervised ``wireguard-go``: a WireGuard device for kernels without WireGuard.

:class:`WireguardGo` runs ``wireguard-go -f <dev>`` as a child in its own session (a
terminal's Ctrl-C reaches only the agent, which shuts it down in order) with the
parent-death signal set to SIGTERM (``setpriv --pdeathsig``): a wireguard-go that
outlives its supervisor could not be supervised, would keep a deleted test namespace
alive, and would block the next start's socket. SIGTERM makes wireguard-go close the
TUN (the device disappears) and remove its socket; so does deleting the device, which
ends the process within ~20 ms. It is configured through its UAPI socket (:mod:`.uapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal

from loden.errors import DataplaneError
from loden.kernel.netns import netns_argv
from loden.kernel.wireguard.uapi import DeviceState, SetRequest, Uapi

log = logging.getLogger(__name__)


class WireguardGo:
    """One ``wireguard-go -f <name>`` child serving the TUN device ``name``.

    ``netns`` (a name under /var/run/netns or a path) starts it inside that network
    namespace through ``nsenter``, so its TUN and UDP sockets live there.
    """

    implementation = "wireguard-go"

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

    async def get(self) -> DeviceState:
        """:raises DataplaneError: the device does not answer or answers nonsense."""
        return await self.uapi.get()

    async def set(self, request: SetRequest) -> None:
        """:raises DataplaneError: wireguard-go rejected it or did not answer."""
        await self.uapi.set(request.render())

    async def busy(self) -> bool:
        """Does a wireguard-go (this one, or one serving a same-named device in another
        namespace) answer on the device's socket right now?"""
        return await self.uapi.alive()

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
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # A killed wireguard-go leaves its socket behind; the next start would test it.
        if not await self.uapi.alive():
            with contextlib.suppress(OSError):
                self.uapi.path.unlink()


__all__ = ["WireguardGo"]
