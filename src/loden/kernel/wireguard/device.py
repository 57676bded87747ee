"""What the wireguard backend needs from a device, whichever implementation serves it:
the kernel's ``wireguard`` link (:mod:`.kernel`) or a ``wireguard-go`` (:mod:`.process`)."""

from __future__ import annotations

from typing import Protocol

from loden.kernel.wireguard.uapi import DeviceState, SetRequest


class WireguardDevice(Protocol):
    #: ``"kernel"`` or ``"wireguard-go"`` (for logs and status).
    implementation: str
    name: str

    @property
    def pid(self) -> int | None:
        """The serving process, if there is one."""
        ...

    @property
    def running(self) -> bool:
        """False once a serving process has exited (the device is then gone too)."""
        ...

    @property
    def returncode(self) -> int | None: ...

    async def busy(self) -> bool:
        """Is the device's name served by something already (before creation)?"""
        ...

    async def get(self) -> DeviceState: ...

    async def set(self, request: SetRequest) -> None: ...

    async def stop(self) -> None: ...


__all__ = ["WireguardDevice"]
