"""Typed async access to the kernel's network configuration (one network namespace).

:class:`Netlink` is the only door from Loden to rtnetlink, sysctls and ethtool. It
speaks rtnetlink through :mod:`loden.kernel.rtnl`, a small struct-based codec: links
(with their nested vxlan attributes) and addresses, and the high-volume routes,
neighbours and FDB entries, whose changes are sent in batches (many requests per
``send()``, acks collected per chunk) and whose state is read with one filtered dump.
See that module for the measurements behind it (5,000 vxlan peers = 15,000 entries:
~0.5 s instead of ~7 s with pyroute2 one request at a time; and pyroute2's import alone
cost the agent ~9 MB of RSS).

Every blocking call runs on one dedicated worker thread. That keeps the agent's event
loop free while thousands of entries are programmed, serialises use of the sockets
(neither engine is thread-safe), and makes namespaces cheap: with ``netns=`` the
worker thread ``setns()``-es into the namespace once, so its sockets, sysctl files
and ethtool ioctls all act there (tests and the lab drive several "hosts" from one
process; the agent itself runs inside its namespace and passes nothing).

Errors: every ``OSError`` (the codec's :class:`~loden.kernel.rtnl.NetlinkFailure`) is mapped to
:class:`~loden.errors.DataplaneError` in exactly one place, :meth:`Netlink._call`;
batch results carry one ``DataplaneError`` per failed entry.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, TypeVar

from loden.errors import DataplaneError, NotificationsLost
from loden.kernel import rtnl
from loden.kernel.netns import enter_netns
from loden.kernel.rtnl import AF_BRIDGE, EntryChange, KernelChange, LinkChange
from loden.kernel.types import (
    RT_TABLE_MAIN,
    RTPROT_BOOT,
    RTPROT_LODEN,
    RTPROT_STATIC,
    Address,
    BatchResult,
    Change,
    Entry,
    FdbEntry,
    IPAddress,
    IPNetwork,
    Link,
    Neighbour,
    Route,
    RouteLookup,
    VxlanSpec,
)

__all__ = [
    "RTPROT_BOOT",
    "RTPROT_LODEN",
    "RTPROT_STATIC",
    "RT_TABLE_MAIN",
    "Address",
    "BatchResult",
    "Change",
    "Entry",
    "EntryChange",
    "FdbEntry",
    "IPAddress",
    "IPNetwork",
    "KernelChange",
    "KernelMonitor",
    "Link",
    "LinkChange",
    "Neighbour",
    "Netlink",
    "NotificationsLost",
    "Route",
    "RouteLookup",
    "VxlanSpec",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_IFF_UP = 0x1
_SIOCETHTOOL = 0x8946
_ETHTOOL_GTXCSUM = 0x16
_ETHTOOL_STXCSUM = 0x17
#: Deleting something already gone is success: routes say ESRCH, neighbours ENOENT.
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


def _error(op: str, obj: str, exc: BaseException) -> DataplaneError:
    """The one mapping from foreign exceptions to DataplaneError."""
    code = getattr(exc, "code", None)  # pyroute2 NetlinkError
    if not isinstance(code, int):
        code = exc.errno if isinstance(exc, OSError) else None
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, rtnl.NetlinkFailure):
        detail = exc.strerror or detail
    elif isinstance(code, int) and code > 0:
        detail = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return DataplaneError(op, obj, detail, errno=code)


class Netlink:
    """Kernel network configuration of one namespace; use ``await Netlink.open()``.

    Two lanes, each a worker thread with its own socket in the namespace: dumps and
    link/address work on one, route/neighbour/FDB writes and route lookups on the other.
    A write (a new peer's routes) therefore never queues behind a 5,000-entry dump of a
    periodic resync (~50 ms each at 5,000 vxlan peers).
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        tag = netns or "self"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"netlink-{tag}")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"netlink-w-{tag}")
        self._rtnl: rtnl.RtnlSocket | None = None
        self._wrtnl: rtnl.RtnlSocket | None = None
        self._closed = False

    @classmethod
    async def open(cls, netns: str | None = None) -> Netlink:
        """Open sockets in ``netns`` (a name under /var/run/netns or a path; None: ours).

        :raises DataplaneError: the namespace does not exist or sockets cannot be opened.
        """
        self = cls(netns)
        try:
            await self._call("open", f"netns {netns or '(own)'}", self._setup)
            await self._call("open", f"netns {netns or '(own)'}", self._setup_writer, lane=True)
        except BaseException:
            await self.aclose()
            raise
        return self

    def _setup(self) -> None:
        if self.netns is not None:
            enter_netns(self.netns)
        self._rtnl = rtnl.RtnlSocket()

    def _setup_writer(self) -> None:
        if self.netns is not None:
            enter_netns(self.netns)
        self._wrtnl = rtnl.RtnlSocket()

    def _teardown(self) -> None:
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    def _teardown_writer(self) -> None:
        if self._wrtnl is not None:
            self._wrtnl.close()
            self._wrtnl = None

    async def aclose(self) -> None:
        """Close the sockets and stop the worker threads; idempotent."""
        if self._closed:
            return
        try:
            await self._call("close", "netlink sockets", self._teardown)
            await self._call("close", "netlink sockets", self._teardown_writer, lane=True)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            self._writer.shutdown(wait=True)

    async def __aenter__(self) -> Netlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self, op: str, obj: str, fn: Callable[..., T], *args: Any, lane: bool = False
    ) -> T:
        """Run ``fn`` on the dump lane, or with ``lane=True`` on the write lane."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise DataplaneError(op, obj, "the netlink handle is closed (aclose() was called)")
        try:
            return await loop.run_in_executor(self._writer if lane else self._executor, fn, *args)
        except DataplaneError:
            raise
        except Exception as exc:  # NetlinkError, OSError, pyroute2's own errors
            raise _error(op, obj, exc) from exc

    @property
    def _wsock(self) -> rtnl.RtnlSocket:
        if self._wrtnl is None:
            raise OSError(errno.EBADF, "netlink handle is closed")
        return self._wrtnl

    @property
    def _sock(self) -> rtnl.RtnlSocket:
        if self._rtnl is None:
            raise OSError(errno.EBADF, "netlink handle is closed")
        return self._rtnl

    # -- links -------------------------------------------------------------------

    async def links(self) -> list[Link]:
        def dump() -> list[Link]:
            return [rtnl.decode_link(m) for m in self._sock.dump(*rtnl.link_dump_request())]

        return await self._call("dump", "links", dump)

    async def link(self, name: str) -> Link | None:
        """The link called ``name``, or None."""
        return await self._call("get", f"link {name}", self._get_link, 0, name)

    async def link_by_index(self, index: int) -> Link | None:
        return await self._call("get", f"link #{index}", self._get_link, index, None)

    def _get_link(self, index: int, name: str | None) -> Link | None:
        (outcome,) = self._sock.transact([rtnl.link_get_request(index=index, name=name)])
        if outcome.error is not None:
            if outcome.error.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise outcome.error
        return rtnl.decode_link(outcome.replies[0]) if outcome.replies else None

    def _strict_one(self, request: tuple[int, int, bytes]) -> None:
        (outcome,) = self._sock.transact([request])
        if outcome.error is not None:
            raise outcome.error

    async def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> Link:
        """Create a link of ``kind`` with no kind-specific data (e.g. ``wireguard``),
        down, ``txqueuelen 0`` as Go flanneld's netlink library creates every link.

        :raises DataplaneError: with ``errno`` EOPNOTSUPP if the kernel has no such kind.
        """

        def create() -> Link:
            self._strict_one(rtnl.link_create_request(name, kind, mtu=mtu))
            link = self._get_link(0, name)
            if link is None:
                raise OSError(errno.ENODEV, f"{name} vanished right after creation")
            return link

        return await self._call("create", f"{kind} device {name}", create)

    async def create_vxlan(
        self, name: str, spec: VxlanSpec, *, mtu: int | None = None, mac: str | None = None
    ) -> Link:
        """Create a vxlan device (down); ``spec.port`` is always passed explicitly.

        ``txqueuelen 0`` as Go flanneld's device has (its netlink library sends the
        zero of an unset ``TxQLen``): a virtual device queues nothing itself, and the
        same ``ip -d link`` as flanneld's is part of the drop-in promise.
        """

        def create() -> Link:
            self._strict_one(rtnl.vxlan_create_request(name, spec, mtu=mtu, mac=mac))
            link = self._get_link(0, name)
            if link is None:
                raise OSError(errno.ENODEV, f"{name} vanished right after creation")
            return link

        return await self._call("create", f"vxlan device {name}", create)

    async def set_link(
        self,
        index: int,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        txqlen: int | None = None,
    ) -> None:
        if up is None and mtu is None and mac is None and txqlen is None:
            return
        request = rtnl.link_set_request(index, up=up, mtu=mtu, mac=mac, txqlen=txqlen)
        await self._call("set", f"link #{index}", self._strict_one, request)

    async def delete_link(self, index: int) -> None:
        request = rtnl.link_delete_request(index)
        await self._call("delete", f"link #{index}", self._strict_one, request)

    # -- addresses ---------------------------------------------------------------

    async def addresses(
        self, index: int | None = None, *, family: int | None = None
    ) -> list[Address]:
        """Addresses (of one link if ``index``), in kernel order."""

        def dump() -> list[Address]:
            request = rtnl.addr_dump_request(family or socket.AF_UNSPEC, index or 0)
            out = [rtnl.decode_addr(m) for m in self._sock.dump(*request)]
            return [
                a
                for a in out
                if a is not None
                and (index is None or a.index == index)
                and (family is None or a.ip.version == (4 if family == socket.AF_INET else 6))
            ]

        return await self._call("dump", "addresses", dump)

    async def add_address(self, index: int, iface: IPv4Interface | IPv6Interface) -> None:
        request = rtnl.addr_request(index, iface.ip, iface.network.prefixlen, delete=False)
        await self._call("add", f"address {iface} on #{index}", self._strict_one, request)

    async def delete_address(self, index: int, iface: IPv4Interface | IPv6Interface) -> None:
        request = rtnl.addr_request(index, iface.ip, iface.network.prefixlen, delete=True)
        await self._call("delete", f"address {iface} on #{index}", self._strict_one, request)

    # -- routes, neighbours, fdb (rtnl codec) -------------------------------------

    async def routes(
        self,
        *,
        family: int = socket.AF_INET,
        table: int = RT_TABLE_MAIN,
        skip: Skip | None = None,
        digest: Digest | None = None,
    ) -> list[Route]:
        """Every route of ``table`` for ``family`` (filtered in the kernel); with
        ``skip`` (entry hashes), those whose hash is in it are left out and removed from it
        (see :func:`_decoded`); ``digest`` gets the dump (see :class:`Digest`)."""

        def dump() -> list[Route]:
            kind, body = rtnl.route_dump_request(family, table)
            found = _decoded(self._sock.dump(kind, body), rtnl.decode_route, skip, digest)
            return [r for r in found if isinstance(r, Route) and r.table == table]

        return await self._call("dump", f"routes of table {table}", dump)

    async def neighbours(
        self,
        ifindex: int,
        *,
        family: int = socket.AF_INET,
        skip: Skip | None = None,
        digest: Digest | None = None,
    ) -> list[Neighbour]:
        def dump() -> list[Neighbour]:
            kind, body = rtnl.neigh_dump_request(family, ifindex)
            found = _decoded(self._sock.dump(kind, body), rtnl.decode_neigh, skip, digest)
            return [n for n in found if isinstance(n, Neighbour) and n.ifindex == ifindex]

        return await self._call("dump", f"neighbours of #{ifindex}", dump)

    async def fdb(
        self, ifindex: int, *, skip: Skip | None = None, digest: Digest | None = None
    ) -> list[FdbEntry]:
        """FDB entries of one (vxlan) device."""

        def dump() -> list[FdbEntry]:
            kind, body = rtnl.neigh_dump_request(AF_BRIDGE, ifindex)
            found = _decoded(self._sock.dump(kind, body), rtnl.decode_neigh, skip, digest)
            return [f for f in found if isinstance(f, FdbEntry) and f.ifindex == ifindex]

        return await self._call("dump", f"fdb of #{ifindex}", dump)

    async def route_get(self, dst: IPAddress) -> RouteLookup | None:
        """``ip route get dst``; None when unreachable."""
        return (await self.route_get_many([dst]))[dst]

    async def route_get_many(
        self, dsts: Iterable[IPAddress]
    ) -> dict[IPAddress, RouteLookup | None]:
        """Route lookups for many destinations in one batch (None: no route)."""
        targets = list(dict.fromkeys(dsts))

        def lookup() -> dict[IPAddress, RouteLookup | None]:
            outcomes = self._wsock.transact([rtnl.lookup_request(d) for d in targets])
            result: dict[IPAddress, RouteLookup | None] = {}
            for dst, outcome in zip(targets, outcomes, strict=True):
                if outcome.error is not None and outcome.error.errno not in (
                    errno.ENETUNREACH,
                    errno.EHOSTUNREACH,
                    errno.EINVAL,
                ):
                    raise outcome.error
                replies = outcome.replies
                result[dst] = rtnl.decode_lookup(replies[0]) if replies else None
            return result

        what = f"routes to {len(targets)} destinations"
        return await self._call("lookup", what, lookup, lane=True)

    async def monitor(
        self, *, rcvbuf: int = 16 << 20, skip_protocol: int | None = RTPROT_LODEN
    ) -> KernelMonitor:
        """Subscribe to the namespace's link, neighbour and route change notifications;
        echoes of this handle's own writes are left out (see :class:`rtnl.RtnlMonitor`).

        ``rcvbuf`` bounds how many notifications the kernel queues for us (kernel memory,
        used only while they wait); past it they are dropped and
        :meth:`KernelMonitor.read` raises :class:`NotificationsLost`.
        """
        own = frozenset(s.portid for s in (self._rtnl, self._wrtnl) if s is not None)
        sock = await self._call(
            "open", "netlink notification socket", rtnl.RtnlMonitor, rcvbuf, skip_protocol, own
        )
        if not sock.filtered:
            log.debug(
                "the kernel refused the notification socket's filter: echoes of our own "
                "writes are dropped after reading them (more CPU, same result)"
            )
        return KernelMonitor(sock)

    async def apply(self, changes: Sequence[Change], *, missing_ok: bool = True) -> BatchResult:
        """Program ``changes`` in order, batched; per-entry failures are collected.

        Deleting an entry that is already gone counts as success when ``missing_ok``.

        :raises DataplaneError: the socket itself failed (nothing can be said per entry).
        """
        if not changes:
            return BatchResult(0)

        def run() -> list[tuple[int, rtnl.NetlinkFailure]]:
            return self._wsock.write(rtnl.encode(c.entry, delete=c.delete) for c in changes)

        failures = await self._call("program", f"{len(changes)} entries", run, lane=True)
        failed: list[tuple[Change, DataplaneError]] = []
        for position, err in failures:
            change = changes[position]
            if change.delete and missing_ok and err.errno in _GONE:
                continue
            op, _, obj = change.describe().partition(" ")
            failed.append((change, _error(op, obj, err)))
        return BatchResult(len(changes) - len(failed), tuple(failed))

    async def replace(self, *entries: Route | Neighbour | FdbEntry) -> None:
        """Replace (create or overwrite) entries; raises the first failure."""
        await self._strict([Change(e) for e in entries])

    async def delete(self, *entries: Route | Neighbour | FdbEntry) -> None:
        """Delete entries (already gone is fine); raises the first other failure."""
        await self._strict([Change(e, delete=True) for e in entries])

    async def add_route(self, route: Route) -> bool:
        """Create ``route`` only if no route with its key (destination, table, metric)
        exists, as ``ip route add``; never overwrites one. False: one exists.

        :raises DataplaneError: the kernel refused it for another reason.
        """
        kind, flags, body = rtnl.encode(route, delete=False)
        flags = (flags & ~rtnl.NLM_F_REPLACE) | rtnl.NLM_F_EXCL

        def run() -> list[rtnl.Outcome]:
            return self._wsock.transact([(kind, flags, body)])

        what = f"route {route.dst}"
        (outcome,) = await self._call("add", what, run, lane=True)
        if outcome.error is None:
            return True
        if outcome.error.errno == errno.EEXIST:
            return False
        raise _error("add", what, outcome.error)

    async def _strict(self, changes: list[Change]) -> None:
        result = await self.apply(changes)
        if result.failed:
            raise result.failed[0][1]

    # -- sysctl, ethtool -----------------------------------------------------------

    async def sysctl(self, key: str) -> str:
        """Read ``key`` (slash form relative to /proc/sys, e.g. ``net/ipv4/ip_forward``)."""
        path = _sysctl_path(key)
        return await self._call("read", f"sysctl {key}", lambda: path.read_text().strip())

    async def set_sysctl(self, key: str, value: str) -> None:
        """Write ``key`` (slash form: device names may contain dots) if it differs."""
        path = _sysctl_path(key)

        def write() -> None:
            if path.read_text().strip() != value:
                path.write_text(value)

        await self._call("write", f"sysctl {key}={value}", write)

    async def set_tx_checksum(self, name: str, on: bool) -> bool:
        """``ethtool -K <name> tx on|off`` through the ioctl; True if it changed."""

        def run() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                if bool(_ethtool(s, name, _ETHTOOL_GTXCSUM)) == on:
                    return False
                _ethtool(s, name, _ETHTOOL_STXCSUM, int(on))
                return True

        state = "on" if on else "off"
        return await self._call("set", f"tx checksum offload {state} on {name}", run)


class Tally:
    """Dumped entries summed instead of kept: the count and the sum (mod 2**64) of the
    hashes of those ``counts`` picks (passed as a dump's ``skip``; the dump then
    returns nothing). Equal tallies of the wanted entries and of the kernel's owned
    ones: the kernel holds exactly what is wanted (as likely to be wrong as two sums
    of 64-bit hashes colliding), found without holding 15,000 hashes at once."""

    __slots__ = ("_counts", "size", "value")

    def __init__(self, counts: Callable[[Entry], bool]) -> None:
        self._counts = counts
        self.size = 0
        self.value = 0

    def add(self, entry: Entry) -> None:
        self.size += 1
        self.value = (self.value + hash(entry)) & rtnl.FINGERPRINT_MASK

    def take(self, entry: Entry) -> None:
        if self._counts(entry):
            self.add(entry)

    def same(self, other: Tally) -> bool:
        return (self.size, self.value) == (other.size, other.value)


#: A dump's ``skip``: the hashes of entries to leave out (removed from the set as they
#: are met), or a :class:`Tally` that takes every entry.
Skip = set[int] | Tally


class Digest:
    """What a set of dumps held, as one number: the sum (mod 2**64) of the
    :func:`rtnl.fingerprint` of every message the dump methods it is passed to read,
    before any filtering. Equal digests of the same dumps: nothing in them changed.
    ``decode=False``: fingerprint only, and those methods return nothing (a check that
    nothing changed then decodes nothing)."""

    __slots__ = ("decode", "value")

    def __init__(self, *, decode: bool = True) -> None:
        self.decode = decode
        self.value = 0

    def add(self, msg: bytes) -> None:
        self.value = (self.value + rtnl.fingerprint(msg)) & rtnl.FINGERPRINT_MASK


def _decoded(
    raw: Iterable[bytes],
    decode: Callable[[bytes], Entry | None],
    skip: Skip | None,
    digest: Digest | None = None,
) -> list[Entry]:
    """Decode dumped messages one at a time (:class:`rtnl.Dump` makes each only when
    it is reached); an entry whose hash is in ``skip`` is not kept, and its hash is
    removed from ``skip`` (which then holds what the kernel lacks). A no-change resync
    at 5,000 vxlan peers so keeps a few entries instead of 15,000 decoded ones (~4 MB
    for a moment, which the allocator then kept: issue 14). Every message also goes
    into ``digest``."""
    out: list[Entry] = []
    for msg in raw:
        if digest is not None:
            digest.add(msg)
            if not digest.decode:
                continue
        entry = decode(msg)
        if entry is None:
            continue
        if isinstance(skip, Tally):
            skip.take(entry)
            continue
        if skip is not None:
            key = hash(entry)
            if key in skip:
                skip.discard(key)
                continue
        out.append(entry)
    return out


class KernelMonitor:
    """Change notifications of one namespace, read on the event loop (non-blocking)."""

    def __init__(self, sock: rtnl.RtnlMonitor) -> None:
        self._sock = sock
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def read(self) -> list[KernelChange]:
        """Wait for notifications and return all that are queued.

        :raises NotificationsLost: some were dropped (the socket stays usable).
        :raises DataplaneError: the socket failed otherwise.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._ready.set)
        while True:
            self._ready.clear()
            try:
                changes = self._sock.read()
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise NotificationsLost() from exc
                raise _error("read", "netlink notifications", exc) from exc
            if changes:
                return changes
            await self._ready.wait()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        self._sock.close()


def _sysctl_path(key: str) -> Path:
    parts = key.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DataplaneError("write", f"sysctl {key}", "not a valid sysctl key")
    return Path("/proc/sys", *parts)


def _ethtool(sock: socket.socket, name: str, cmd: int, data: int = 0) -> int:
    value = ctypes.create_string_buffer(struct.pack("=II", cmd, data), 8)
    ifreq = struct.pack("16sP", name.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
    return int(struct.unpack("=II", value.raw)[1])
