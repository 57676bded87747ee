"""wireguard backend (spec §6.5): flannel's encrypted overlay, served by wireguard-go.

*What flannel does, and Loden too.* One WireGuard device ``flannel-wg`` (plus
``flannel-wg-v6`` for IPv6 in the default ``separate`` mode), MTU = (``Backend.MTU``
or the external MTU) − 80, the node subnet's network address as a /32 (/128), up,
and one route ``<Network> dev flannel-wg scope link`` (Loden's protocol 76). Every
peer lease of type ``wireguard`` becomes a WireGuard peer: its public key from the
lease's BackendData, endpoint ``<PublicIP>:<Port>`` (``Port`` from the peer's data, 0
meaning "my own listen port", for peers older than that field), AllowedIPs = the
peer's subnet, plus the configured PSK and persistent keepalive. The private key
lives in ``/run/flannel/wgkey`` (``WIREGUARD_KEY_FILE``, read into
``ctx.settings.wireguard_key_file`` by the agent) and is generated on first start;
the lease publishes ``{"PublicKey":"<b64>","Port":<ListenPort>}``. An existing device
of the same name is deleted and recreated at start, and the devices are **deleted on
shutdown**.

*Restart gap (kept on purpose: flannel semantics).* Because shutdown deletes the
device and start recreates it, an agent restart interrupts pod traffic through this
node: from SIGTERM until the new agent has its device, key, peers and route back, plus
one WireGuard handshake (measured: ~0.1 s for a backend restart, ~1 s for a whole
agent restart; ``tests/integration/test_wireguard_dataplane.py`` and
``test_agent_wireguard.py``). Peers still hold sessions keyed to the old device, and
a peer that only sends would keep using them until its rekey timeout (keepalive 10 s
+ rekey 5 s: measured 15.2 s) before handshaking again. So Loden programs the peers of
a freshly created device with a persistent keepalive, which makes wireguard-go send a
handshake initiation to every peer at once; the next apply or reconcile puts the
configured keepalive back. A killed agent (``kill -9``) takes its wireguard-go, and so
the device, with it (parent-death signal): unlike a kernel device it cannot outlive
its supervisor usefully.

*Kernel WireGuard where the kernel has it, wireguard-go where it does not.* The first
device is created as a kernel link of kind ``wireguard``, exactly flannel's state
(configured with ``wg``). If the running kernel answers that it knows no such link
kind, every device is instead a TUN served by a ``wireguard-go`` child process that
this backend starts, supervises and stops, configured through its UAPI socket (the
interface ``wg`` itself uses for user-space devices). The choice is made at run time,
logged once, and kept for the life of the agent (see :mod:`loden.kernel.wireguard`).
Reconcile recreates a device that was deleted (and restarts a wireguard-go that died),
and replays every peer.

*Level-triggered peers.* ``reconcile`` reads the device (``get``) and sends one
``set`` with exactly the difference: stale peers (a key no lease publishes any more,
e.g. a node that regenerated its key) are removed, changed peers rewritten, unchanged
peers not touched, so live sessions survive a resync (flannel's ``replace_peers``
would drop every session). ``apply`` computes the same target from the peer set it
tracks and diffs it against what it last programmed. The target itself (options,
modes, one peer per key) comes from :mod:`loden.backend.wireguard_peers`.

*Lease port in single-device modes.* One deliberate difference from flannel: in the
``ipv4``/``ipv6``/``auto`` modes the v6 lease data advertises the port the device
really listens on (``ListenPort``), because there is no ``ListenPortV6`` socket to
reach.

*Devices are created in* :meth:`WireguardBackend.activate`, *not before the lease*
(flannel creates them first): the lease only needs the public key, which comes from
the key file, and a node that never gets a lease then leaves no process behind.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.backend.identity import describe, other_nodes
from loden.backend.wireguard_peers import (
    DevicePlan,
    Mode,
    PeerRules,
    WireguardOptions,
    desired_peers,
    key_conflicts,
    lease_keys,
    peer_changes,
)
from loden.errors import BackendError, DataplaneError, InterfaceError
from loden.kernel.netlink import RTPROT_LODEN, Link, Netlink, Route
from loden.kernel.wireguard.device import WireguardDevice
from loden.kernel.wireguard.kernel import KIND, KernelWireguard, unsupported
from loden.kernel.wireguard.keys import (
    generate_private_key,
    load_or_create_private_key,
    public_key_of,
    write_key_file,
)
from loden.kernel.wireguard.process import WireguardGo
from loden.kernel.wireguard.uapi import PeerConfig, SetRequest
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

log = logging.getLogger(__name__)

DEVICE = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
#: Outer IPv4/IPv6 header (20/40) + UDP 8 + type 4 + key index 4 + nonce 8 + tag 16.
OVERHEAD = 80
#: Keepalive given to the peers of a freshly created device (see the module docstring).
KICK_KEEPALIVE = 25
_RT_SCOPE_LINK = 253
_V6_DEFAULT_METRIC = 1024


class WireguardBackend:
    backend_type = "wireguard"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        config = ctx.config
        assert isinstance(ctx.options, WireguardOptions), ctx.options
        self.options = ctx.options
        self.enable_ipv4 = config.enable_ipv4
        self.enable_ipv6 = config.enable_ipv6
        ext = ctx.ext
        if self.enable_ipv4 and ext.ext_addr is None:
            raise InterfaceError(
                f"wireguard needs an IPv4 public IP on {ext.name}: add one or set --public-ip"
            )
        if self.enable_ipv6 and ext.ext_v6_addr is None:
            raise InterfaceError(
                f"wireguard with EnableIPv6 needs an IPv6 public IP on {ext.name}:"
                " add one or set --public-ipv6"
            )
        base = self.options.mtu or ext.mtu
        self.mtu = base - OVERHEAD
        minimum = 1280 if self.enable_ipv6 else 68
        if self.mtu < minimum:
            source = "Backend.MTU" if self.options.mtu else f"the MTU of {ext.name}"
            raise BackendError(
                f"wireguard device MTU would be {self.mtu} ({source} {base} - {OVERHEAD}),"
                f" below the minimum {minimum}: set Backend.MTU to at least {minimum + OVERHEAD}"
            )
        self.netns = ctx.settings.netns
        self.device = ctx.settings.wireguard_device
        self.device_v6 = ctx.settings.wireguard_device_v6
        for name in (self.device, self.device_v6):
            if not 0 < len(name) <= 15 or "/" in name:
                raise BackendError(f"wireguard device name {name!r} is not a valid link name")
        self.key_file = ctx.settings.wireguard_key_file
        self.private_key = ""
        self.public_key = ""
        #: ``"kernel"`` or ``"wireguard-go"`` once the first device exists.
        self.implementation: str | None = None

    def choose(self, implementation: str, why: str) -> None:
        if self.implementation is None:
            self.implementation = implementation
            log.info("wireguard: %s", why)

    def plans(self) -> list[DevicePlan]:
        opts = self.options
        if opts.mode is Mode.SEPARATE:
            plans = []
            if self.enable_ipv4:
                plans.append(DevicePlan("v4", self.device, opts.listen_port, True, False))
            if self.enable_ipv6:
                plans.append(DevicePlan("v6", self.device_v6, opts.listen_port_v6, False, True))
            return plans
        return [
            DevicePlan("main", self.device, opts.listen_port, self.enable_ipv4, self.enable_ipv6)
        ]

    def rules(self) -> PeerRules:
        plans = self.plans()
        port4 = next((p.port for p in plans if p.v4), self.options.listen_port)
        port6 = next((p.port for p in plans if p.v6), self.options.listen_port_v6)
        return PeerRules(
            mode=self.options.mode,
            enable_ipv4=self.enable_ipv4,
            enable_ipv6=self.enable_ipv6,
            port4=port4,
            port6=port6,
            own_v4=self.ctx.ext.ext_addr if self.enable_ipv4 else None,
            own_v6=self.ctx.ext.ext_v6_addr if self.enable_ipv6 else None,
            psk=self.options.psk,
            keepalive=self.options.keepalive,
        )

    def load_keys(self) -> None:
        """Read (or generate) the private key; the lease needs the public one.

        :raises ConfigError: the key file is unreadable, unwritable or malformed.
        """
        key, created = load_or_create_private_key(self.key_file)
        self.private_key = key
        self.public_key = public_key_of(key)
        log.info(
            "wireguard: %s key file %s (public key %s)",
            "generated" if created else "using",
            self.key_file,
            self.public_key,
        )

    def _unique_key(self, others: Sequence[Lease]) -> None:
        """A key file copied from another node (its public key is in a lease with another
        public IP) gets replaced: two nodes with one key blackhole each other."""
        ext = self.ctx.ext
        own_ip = ext.ext_addr if self.enable_ipv4 and ext.ext_addr else ext.ext_v6_addr
        if own_ip is None:
            return
        wg = [lease for lease in others if lease.attrs.backend_type == "wireguard"]
        clash = [lease for lease in other_nodes(wg, own_ip) if self.public_key in lease_keys(lease)]
        if not clash:
            return
        old = self.public_key
        key = generate_private_key()
        write_key_file(self.key_file, key)
        self.private_key = key
        self.public_key = public_key_of(key)
        log.warning(
            "wireguard: the public key %s of %s is already published by another node's lease"
            " %s (a key file copied from that node, or a cloned image): generated a new key"
            " %s in %s",
            old,
            self.key_file,
            describe(clash),
            self.public_key,
            self.key_file,
        )

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        self.load_keys()
        self._unique_key(others)
        rules = self.rules()
        data = v6_data = None
        if self.enable_ipv4:
            data = LeaseAttrs.encode_data({"PublicKey": self.public_key, "Port": rules.port4})
        if self.enable_ipv6:
            v6_data = LeaseAttrs.encode_data({"PublicKey": self.public_key, "Port": rules.port6})
        ext = self.ctx.ext
        return LeaseAttrs(
            public_ip=ext.ext_addr if self.enable_ipv4 and ext.ext_addr else IPv4Address(0),
            backend_type="wireguard",
            backend_data=data,
            public_ipv6=ext.ext_v6_addr if self.enable_ipv6 else None,
            backend_v6_data=v6_data,
        )

    async def activate(self, lease: Lease) -> Network:
        if not self.private_key:
            self.load_keys()
        nl = await Netlink.open(self.netns)
        network = WireguardNetwork(self, lease, nl)
        try:
            await network.setup()
        except BaseException:
            await network.aclose()
            raise
        return network


@dataclass
class _Device:
    plan: DevicePlan
    proc: WireguardDevice | None = None
    index: int = 0
    #: Peers as last programmed (the ``apply`` fast path diffs against this).
    programmed: dict[str, PeerConfig] = field(default_factory=dict)
    #: Created since the last peer programming: give peers the kick keepalive.
    fresh: bool = False

    @property
    def name(self) -> str:
        return self.plan.name


class WireguardNetwork:
    """The running wireguard data plane of one lease (see the module docstring)."""

    backend_type = "wireguard"

    def __init__(self, backend: WireguardBackend, lease: Lease, nl: Netlink) -> None:
        self._be = backend
        self._lease = lease
        self._nl = nl
        self._config = backend.ctx.config
        self._rules = backend.rules()
        self._devices = [_Device(plan) for plan in backend.plans()]
        self._peers: dict[str, Lease] = {}
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        #: Peers that publish our key, keys published by two nodes (see ``key_conflicts``).
        self._conflicts: tuple[str, ...] = ()
        self._closed = False

    # -- properties --------------------------------------------------------------------

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def mtu(self) -> int:
        return self._be.mtu

    @property
    def public_key(self) -> str:
        return self._be.public_key

    @property
    def device_names(self) -> list[str]:
        return [dev.name for dev in self._devices]

    def process(self, name: str) -> WireguardDevice | None:
        """What serves device ``name``: a wireguard-go, or the kernel (diagnostics)."""
        return next((d.proc for d in self._devices if d.name == name), None)

    # -- devices -----------------------------------------------------------------------

    async def setup(self) -> None:
        """Create every device (deleting a same-named one first, like flannel).

        :raises DataplaneError: wireguard-go or a netlink operation failed.
        """
        for dev in self._devices:
            await self._create(dev)
        log.info(
            "wireguard: %s ready for %s (mtu %d, public key %s)",
            ", ".join(f"{d.name} port {d.plan.port}" for d in self._devices),
            self._lease.key,
            self._be.mtu,
            self._be.public_key,
        )

    async def _create(self, dev: _Device) -> None:
        nl, be = self._nl, self._be
        if dev.proc is not None:
            await dev.proc.stop()
            dev.proc = None
        link = await nl.link(dev.name)
        if link is not None:
            log.warning("wireguard: %s already exists; recreating it", dev.name)
            await nl.delete_link(link.index)
        proc, link = await self._new_device(dev)
        dev.proc = proc
        dev.index = link.index
        await proc.set(
            SetRequest(private_key=be.private_key, listen_port=dev.plan.port, replace_peers=True)
        )
        dev.programmed = {}
        dev.fresh = True
        await self._configure(dev, link)
        log.info(
            "wireguard: created %s (index %d, %s%s)",
            dev.name,
            link.index,
            proc.implementation,
            f" pid {proc.pid}" if proc.pid else "",
        )

    async def _new_device(self, dev: _Device) -> tuple[WireguardDevice, Link]:
        """A kernel ``wireguard`` link if the kernel has WireGuard, else wireguard-go."""
        nl, be = self._nl, self._be
        if be.implementation != "wireguard-go":
            try:
                link = await nl.create_link(dev.name, KIND, mtu=be.mtu)
            except DataplaneError as exc:
                if be.implementation == "kernel" or not unsupported(exc):
                    raise
                be.choose(
                    "wireguard-go",
                    f"the running kernel has no WireGuard ({exc}): serving the devices with"
                    " wireguard-go in user space (slower than the kernel's; a kernel >= 5.6"
                    " or the wireguard module gives flannel's kernel devices)",
                )
            else:
                be.choose(
                    "kernel",
                    "the running kernel has WireGuard: the devices are kernel wireguard"
                    " links, as Go flanneld creates",
                )
                return KernelWireguard(dev.name, netns=be.netns), link
        proc = WireguardGo(dev.name, netns=be.netns)
        # A wireguard-go whose device was just deleted needs a moment to go away; one
        # that still answers serves a same-named device elsewhere (shared socket dir).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while await proc.busy():
            if loop.time() >= deadline:
                raise DataplaneError(
                    "create",
                    f"wireguard device {dev.name}",
                    f"{proc.uapi.path} is served by another wireguard-go (a device of that"
                    " name in another network namespace?): device names must be unique per"
                    " /var/run/wireguard",
                )
            await asyncio.sleep(0.02)
        await proc.start()
        tun = await nl.link(dev.name)
        if tun is None:
            await proc.stop()
            raise DataplaneError("create", f"wireguard device {dev.name}", "no such link")
        return proc, tun

    async def _configure(self, dev: _Device, link: Link) -> bool:
        """MTU, addresses, up, routes; writes only differences. True if anything changed."""
        nl, lease, config = self._nl, self._lease, self._config
        changed = False
        if link.mtu != self._be.mtu:
            await nl.set_link(dev.index, mtu=self._be.mtu)
            changed = True
        have = [a.interface for a in await nl.addresses(dev.index)]
        wants: list[tuple[IPv4Interface | IPv6Interface, IPv4Network | IPv6Network | None]] = []
        if dev.plan.v4:
            wants.append((IPv4Interface((lease.subnet.network_address, 32)), config.network))
        if dev.plan.v6 and lease.ipv6_subnet is not None:
            wants.append(
                (IPv6Interface((lease.ipv6_subnet.network_address, 128)), config.ipv6_network)
            )
        for want, network in wants:
            for iface in have:
                stale = iface.version == want.version and iface != want
                if stale and (network is None or iface.ip in network):
                    await nl.delete_address(dev.index, iface)
                    changed = True
            if want not in have:
                await nl.add_address(dev.index, want)
                changed = True
        if not link.up:
            await nl.set_link(dev.index, up=True)
            changed = True
        if dev.plan.v4 and config.network is not None:
            changed |= await self._ensure_route(dev, config.network)
        if dev.plan.v6 and config.ipv6_network is not None:
            changed |= await self._ensure_route(dev, config.ipv6_network)
        return changed

    async def _ensure_route(self, dev: _Device, dst: IPv4Network | IPv6Network) -> bool:
        if dst.version == 4:
            want = Route(dst, oif=dev.index, scope=_RT_SCOPE_LINK)
            family = socket.AF_INET
        else:
            want = Route(dst, oif=dev.index, priority=_V6_DEFAULT_METRIC)
            family = socket.AF_INET6
        for route in await self._nl.routes(family=family):
            if route.same_path(want) and route.protocol == RTPROT_LODEN:
                return False
        await self._nl.replace(want)
        return True

    async def _ensure(self, dev: _Device) -> bool:
        """Repair ``dev``: recreate it if wireguard-go died or the link is gone or new."""
        link = await self._nl.link(dev.name)
        proc = dev.proc
        if proc is None or not proc.running:
            why = f"wireguard-go exited (status {proc.returncode if proc else None})"
        elif link is None:
            why = "the device was deleted"
        elif link.index != dev.index:
            why = f"the device was replaced (index {dev.index} -> {link.index})"
        else:
            if await self._configure(dev, link):
                log.warning("wireguard: repaired the configuration of %s", dev.name)
            return False
        log.warning("wireguard: %s: %s; recreating it and replaying every peer", dev.name, why)
        await self._create(dev)
        return True

    # -- peers -------------------------------------------------------------------------

    def accepts(self, lease: Lease) -> bool:
        if lease.overlaps_lease(self._lease):
            return False
        if lease.attrs.backend_type != "wireguard":
            self._warn(
                f"wireguard: ignoring non-wireguard subnet {lease.key}"
                f" (type {lease.attrs.backend_type or 'none'!r})"
            )
            return False
        return True

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            if len(self._warned) > 10000:  # bounded: a hostile store cannot grow it
                self._warned.clear()
            self._warned.add(message)
            log.warning("%s", message)

    async def _sync(self, *, read_device: bool) -> ReconcileReport:
        """Program every device to the peers of ``self._peers``; returns what changed."""
        wanted, skipped, warnings = desired_peers(
            self._peers.values(), self._rules, self._be.public_key
        )
        for message in (*skipped, *warnings):
            self._warn(message)
        conflicts = key_conflicts(self._peers.values(), self._be.public_key, self._lease)
        for message in conflicts:
            if message not in self._conflicts:
                log.error("%s", message)
        self._conflicts = tuple(conflicts)
        added = removed = 0
        for dev in self._devices:
            assert dev.proc is not None
            want = wanted.get(dev.plan.role, {})
            if dev.fresh and want:
                want = {
                    k: PeerConfig.make(
                        p.public_key,
                        p.endpoint,
                        p.allowed_ips,
                        p.preshared_key,
                        max(p.keepalive, KICK_KEEPALIVE),
                    )
                    for k, p in want.items()
                }
            private_key = port = None
            if read_device:
                state = await dev.proc.get()
                have = state.peer_configs()
                if state.private_key != self._be.private_key:
                    private_key = self._be.private_key
                if state.listen_port != dev.plan.port:
                    port = dev.plan.port
            else:
                have = dev.programmed
            upserts, removes = peer_changes(want, have)
            if upserts or removes or private_key or port:
                await dev.proc.set(
                    SetRequest(
                        private_key=private_key,
                        listen_port=port,
                        peers=tuple(upserts),
                        remove=tuple(removes),
                    )
                )
                for peer in upserts:
                    log.info(
                        "wireguard: %s peer %s via %s allowed %s",
                        dev.name,
                        peer.public_key,
                        peer.endpoint,
                        ",".join(map(str, peer.allowed_ips)),
                    )
                for key in removes:
                    log.info("wireguard: %s removed peer %s", dev.name, key)
                if private_key or port:
                    log.warning("wireguard: restored the key/listen port of %s", dev.name)
            dev.programmed = dict(want)
            if want:
                dev.fresh = False
            added += len(upserts)
            removed += len(removes)
        return ReconcileReport(
            added=added, removed=removed, skipped=tuple(skipped), conflicts=self._conflicts
        )

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        """Exactly these peers; devices repaired first (wireguard-go restarted if needed).

        :raises DataplaneError: a device could not be repaired or configured.
        """
        async with self._lock:
            for dev in self._devices:
                await self._ensure(dev)
            self._peers = {k: v for k, v in peers.items() if self.accepts(v)}
            return await self._sync(read_device=True)

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        """Added sets/replaces a peer (stale keys of the same lease go), Removed drops it.

        :raises DataplaneError: a device could not be repaired or configured.
        """
        async with self._lock:
            relevant = False
            for event in events:
                lease = event.lease
                if lease.overlaps_lease(self._lease):
                    continue
                if event.kind is EventKind.ADDED and self.accepts(lease):
                    self._peers[lease.key] = lease
                    relevant = True
                elif self._peers.pop(lease.key, None) is not None:
                    relevant = True
            if not relevant:
                return ReconcileReport(conflicts=self._conflicts)
            recreated = False
            for dev in self._devices:
                recreated |= await self._ensure(dev)
            return await self._sync(read_device=recreated)

    async def aclose(self) -> None:
        """Stop wireguard-go and delete the devices (flannel deletes them on exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            for dev in self._devices:
                try:
                    if dev.proc is not None:
                        await dev.proc.stop()
                    link = await self._nl.link(dev.name)
                    if link is not None:
                        await self._nl.delete_link(link.index)
                    log.info("wireguard: removed device %s", dev.name)
                except DataplaneError as exc:
                    log.warning("wireguard: cleaning up %s: %s", dev.name, exc)
        finally:
            await self._nl.aclose()


def create(ctx: BackendContext) -> WireguardBackend:
    """Registry entry point. ``ctx.settings``: ``netns`` (run in another namespace),
    ``wireguard_device``/``_v6`` (device names; tests), ``wireguard_key_file``."""
    return WireguardBackend(ctx)


__all__ = [
    "DEVICE",
    "DEVICE_V6",
    "OVERHEAD",
    "WireguardBackend",
    "WireguardNetwork",
    "create",
]
