"""udp backend (spec §6.3): flannel's user-space TUN proxy, wire-compatible and faster.

Kernel state, exactly as flannel makes it: a TUN device from the template ``flannel%d``
(so ``flannel0``) with the node subnet's network address as a /32, MTU = external MTU
− 28, up, and one route for the whole Network through it (an existing route for the
Network is left alone, as flannel ignores EEXIST). Peers are reached on
``<peer PublicIP>:<Port>`` from ``<IfaceAddr>:<Port>`` (default 8285); every datagram
carries one inner IPv4 packet (see :mod:`loden.udp`). The lease has no BackendType and
no BackendData, and every peer lease is accepted whatever its BackendType, as flannel
does.

The data path runs in worker processes (:mod:`loden.udp.engine`), one per CPU by
default (at most 4; ``ctx.settings.udp_workers`` overrides), each on its own TUN queue
and reuseport socket. This object only feeds them: :meth:`UdpNetwork.apply` and
:meth:`UdpNetwork.reconcile` send a complete new peer table, which the workers swap in
without pausing. ``reconcile`` also repairs the device: if ``flannel0`` was deleted
it is recreated (same name, address, MTU, route) and the new queues are handed to the
running workers; a worker that died is restarted. ``aclose`` stops the workers, and
the TUN disappears with their fds.

``ctx.settings.netns`` runs everything in another network namespace (tests, the lab):
the TUN, the sockets and the workers are created from a thread that entered it.

One addition to flannel's device setup: ``accept_local=1`` on the TUN. The proxy's ICMP
Net Unreachable carries the TUN's own address as its source, and current kernels
drop a packet with a local source address as a martian unless that sysctl is set, so
without it flannel's ICMP errors never reach the pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TypeVar

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.errors import BackendError, DataplaneError, InterfaceError
from loden.kernel.netlink import RTPROT_BOOT, Netlink, Route
from loden.kernel.netns import enter_netns
from loden.model.backend_options import UdpOptions
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.udp.engine import WorkerPool, WorkerSpec
from loden.udp.native import native
from loden.udp.peers import PeerTable
from loden.udp.sockets import open_sockets
from loden.udp.tun import TunOptions, open_queue, open_tun

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 8285
#: IPv4 header + UDP header.
ENCAP_OVERHEAD = 28
NAME_TEMPLATE = "flannel%d"
MAX_DEFAULT_WORKERS = 4


def _default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


class UdpBackend:
    backend_type = "udp"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        assert isinstance(ctx.options, UdpOptions), ctx.options
        self.port = ctx.options.port
        self.netns = ctx.settings.netns
        self.workers = max(1, ctx.settings.udp_workers or _default_workers())
        # TSO super-packets from the TUN pay off only when segmenting them is cheap: with
        # the C loop ~2.8x a per-packet read (0.155 vs 0.06 of the underlay here); with
        # the Python loop per-packet reads win. Benchmarks force either.
        tso = ctx.settings.udp_tso
        self.tso = tso if tso is not None else native is not None
        if ctx.ext.iface_addr is None or ctx.ext.ext_addr is None:
            raise InterfaceError(
                f"udp backend needs an IPv4 address on {ctx.ext.name} to bind port {self.port}"
            )

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        # flannel's udp lease: PublicIP only, no BackendType, no BackendData (spec §3.2).
        assert self.ctx.ext.ext_addr is not None
        return LeaseAttrs(public_ip=self.ctx.ext.ext_addr)

    async def activate(self, lease: Lease) -> Network:
        network = UdpNetwork(self, lease)
        try:
            await network.start()
        except BaseException:
            await network.aclose()
            raise
        return network


class UdpNetwork:
    """The running udp data plane of one lease (see the module docstring)."""

    def __init__(self, backend: UdpBackend, lease: Lease) -> None:
        ctx = backend.ctx
        network = ctx.config.network
        if network is None:
            raise BackendError("udp backend needs an IPv4 Network in the config")
        self._lease = lease
        self._network = IPv4Network(network)
        self._mtu = ctx.ext.mtu - ENCAP_OVERHEAD
        self._port = backend.port
        self._bind = ctx.ext.iface_addr or IPv4Address(0)
        self._netns = backend.netns
        self._nworkers = backend.workers
        self._opts = TunOptions(vnet_hdr=True, tso=backend.tso, multi_queue=True)
        self.tun_addr = lease.subnet.network_address
        self.tun_name = NAME_TEMPLATE
        self.ifindex = 0
        self._peers: dict[str, Lease] = {}
        #: apply() and reconcile() may overlap (the agent does not serialise them); each
        #: pushes a table computed from ``_peers``, so they must not interleave.
        self._lock = asyncio.Lock()
        self._pool = WorkerPool(WorkerSpec(vnet=True, tun_addr=self.tun_addr, port=self._port))
        self._nl: Netlink | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    # -- setup -------------------------------------------------------------------

    async def _in_ns(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` where TUNs, sockets and workers must be created (our namespace)."""
        if self._netns is None:
            return fn(*args)
        if self._thread is None:
            netns = self._netns
            self._thread = ThreadPoolExecutor(
                1, thread_name_prefix=f"udp-{netns}", initializer=enter_netns, initargs=(netns,)
            )
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        """Create and configure the TUN, bind the sockets, start the workers.

        :raises DataplaneError: a device, address, route or socket operation failed.
        """
        self._nl = await Netlink.open(self._netns)
        fds = await self._create_device()
        try:
            socks = await self._in_ns(open_sockets, self._bind, self._port, self._nworkers)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        pairs = list(zip(fds, socks, strict=True))
        try:
            while pairs:
                fd, sock = pairs[0]
                # The pool owns (and closes) fd and sock from this call on.
                pairs.pop(0)
                await self._in_ns(self._pool.start, None, fd, sock)
        finally:
            for fd, sock in pairs:
                os.close(fd)
                sock.close()
        log.info(
            "udp: %s %s/32 mtu %d, %d workers on %s:%d",
            self.tun_name,
            self.tun_addr,
            self._mtu,
            len(self._pool),
            self._bind,
            self._port,
        )

    async def _create_device(self) -> list[int]:
        """Open the TUN queues and configure the device; returns the queue fds."""
        template = NAME_TEMPLATE if self.ifindex == 0 else self.tun_name
        fds, name = await self._in_ns(open_tun, template, self._nworkers, self._opts)
        try:
            self.tun_name = name
            await self._configure(created=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    async def _configure(self, *, created: bool) -> bool:
        """Make the device look as flannel leaves it; True if anything had to change."""
        nl = self._nl
        assert nl is not None
        link = await nl.link(self.tun_name)
        if link is None:
            raise DataplaneError("configure", self.tun_name, "the TUN device vanished")
        self.ifindex = link.index
        changed = created
        if link.mtu != self._mtu or not link.up:
            await nl.set_link(link.index, mtu=self._mtu, up=True)
            changed = True
        addr = IPv4Interface(f"{self.tun_addr}/32")
        if not any(a.interface == addr for a in await nl.addresses(link.index)):
            await nl.add_address(link.index, addr)
            changed = True
        # The proxy's ICMP errors come from the TUN's own address; kernels since 6.x
        # drop such packets as martians unless accept_local is set on the device.
        key = f"net/ipv4/conf/{self.tun_name}/accept_local"
        if await nl.sysctl(key) != "1":
            await nl.set_sysctl(key, "1")
            changed = True
        if not any(r.dst == self._network for r in await nl.routes()):
            await nl.replace(Route(dst=self._network, oif=link.index, protocol=RTPROT_BOOT))
            changed = True
        return changed

    # -- peers -------------------------------------------------------------------

    def _table(self) -> PeerTable:
        own = self._lease.subnet
        entries = [
            (lease.subnet, lease.attrs.public_ip)
            for lease in self._peers.values()
            if lease.subnet != own
        ]
        return PeerTable.build(entries, self._port)

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        """Added sets or replaces a peer, Removed deletes it; one table push per batch."""
        async with self._lock:
            return await self._apply(events)

    async def _apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        added = removed = 0
        for event in events:
            key = event.lease.key
            if event.kind is EventKind.ADDED:
                if self._peers.get(key) != event.lease:
                    added += 1
                self._peers[key] = event.lease
                log.info(
                    "udp: subnet added: %s -> %s", event.lease.subnet, event.lease.attrs.public_ip
                )
            elif self._peers.pop(key, None) is not None:
                removed += 1
                log.info("udp: subnet removed: %s", event.lease.subnet)
        if added or removed:
            await self._pool.set_table(self._table())
        return ReconcileReport(added=added, removed=removed)

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        """Exactly these peers; recreate the TUN if it is gone; restart dead workers."""
        async with self._lock:
            return await self._reconcile(peers)

    async def _reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        errors: list[str] = []
        try:
            await self._repair()
        except DataplaneError as exc:
            errors.append(str(exc))
        added = sum(1 for k, v in peers.items() if self._peers.get(k) != v)
        removed = sum(1 for k in self._peers if k not in peers)
        self._peers = dict(peers)
        # Always push: a restarted worker or a recreated device must not miss a peer.
        await self._pool.set_table(self._table())
        return ReconcileReport(added=added, removed=removed, errors=tuple(errors))

    async def _repair(self) -> None:
        nl = self._nl
        assert nl is not None
        link = await nl.link(self.tun_name)
        if link is None or link.index != self.ifindex:
            log.warning("udp: %s is gone; recreating it", self.tun_name)
            fds = await self._create_device()
            await self._pool.replace_tun(fds)
        elif await self._configure(created=False):
            log.warning("udp: repaired the configuration of %s", self.tun_name)
        for index in self._pool.dead():
            log.warning("udp: worker %d exited; restarting it", index)
            fd = (await self._in_ns(open_queue, self.tun_name, self._opts))[0]
            try:
                socks = await self._in_ns(open_sockets, self._bind, self._port, 1)
            except BaseException:
                os.close(fd)
                raise
            await self._in_ns(self._pool.start, index, fd, socks[0])

    async def aclose(self) -> None:
        """Stop the workers (the TUN and its route go with them) and release handles."""
        try:
            await self._pool.aclose()
        finally:
            if self._nl is not None:
                await self._nl.aclose()
                self._nl = None
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None


def create(ctx: BackendContext) -> UdpBackend:
    """Registry entry point."""
    return UdpBackend(ctx)
