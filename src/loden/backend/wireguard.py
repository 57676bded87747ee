"""wireguard backend (spec §6.5): flannel's encrypted overlay, served by wireguard-go.

*What flannel does, and Loden too.* One WireGuard device ``flannel-wg`` (plus
``flannel-wg-v6`` for IPv6 in the default ``separate`` mode), MTU = (``Backend.MTU``
or the external MTU) − 80, the node subnet's network address as a /32 (/128), up,
and one route ``<Network> dev flannel-wg scope link`` (Loden's protocol 76). Every
peer lease of type ``wireguard`` becomes a WireGuard peer: its public key from the
lease's BackendData, endpoint ``<PublicIP>:<Port>`` (``Port`` from the peer's data, 0
meaning "my own listen port", for peers older than that field), AllowedIPs = the
peer's subnet, plus the configured PSK and persistent keepalive. The private key
lives in ``/run/flannel/wgkey`` (``WIREGUARD_KEY_FILE``; ``ctx.extra["wg_key_file"]``
wins over both) and is generated on first start; the lease publishes
``{"PublicKey":"<b64>","Port":<ListenPort>}``. An existing device of the same name
is deleted and recreated at start, and the devices are **deleted on shutdown**.

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

*No kernel module here.* The kernel these nodes run has no WireGuard, so each
device is a TUN served by a ``wireguard-go`` child process that this backend starts,
supervises and stops (see :mod:`loden.kernel.wireguard`). Reconcile restarts it (and
recreates the device) when the process died or the device was deleted, and replays
every peer. Configuration goes through the device's UAPI socket, the interface ``wg``
itself uses for user-space devices.

*Level-triggered peers.* ``reconcile`` reads the device (``get``) and sends one
``set`` with exactly the difference: stale peers (a key no lease publishes any more,
e.g. a node that regenerated its key) are removed, changed peers rewritten, unchanged
peers not touched, so live sessions survive a resync (flannel's ``replace_peers``
would drop every session). ``apply`` computes the same target from the peer set it
tracks and diffs it against what it last programmed. Two leases with the same public
key (a node that got a new subnet while its old lease lives on) become one peer
whose AllowedIPs hold both subnets, as WireGuard allows one peer per key.

*Modes.* ``separate``: IPv4 peers on ``flannel-wg``, IPv6 peers on ``flannel-wg-v6``
(port ``ListenPortV6``). ``ipv4``/``ipv6``/``auto``: one device, one peer per node
with both subnets, the endpoint picked by family (``auto``: IPv4 unless the peer's
IPv4 is RFC 1918 and both sides have non-ULA IPv6). One deliberate difference: in the
single-device modes the v6 lease data advertises the port the device really listens
on (``ListenPort``), because there is no ``ListenPortV6`` socket to reach.

*Devices are created in* :meth:`WireguardBackend.activate`, *not before the lease*
(flannel creates them first): the lease only needs the public key, which comes from
the key file, and a node that never gets a lease then leaves no process behind.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.errors import BackendError, DataplaneError, InterfaceError, NetworkConfigError
from loden.kernel.netlink import RTPROT_LODEN, Link, Netlink, Route
from loden.kernel.wireguard import (
    PeerConfig,
    WireguardGo,
    decode_key,
    endpoint_text,
    load_or_create_private_key,
    public_key_of,
    render_set,
)
from loden.model.config import NetworkConfig
from loden.model.gojson import GoJSONError, GoObject, as_int, as_str
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

log = logging.getLogger(__name__)

DEVICE = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
DEFAULT_KEY_FILE = "/run/flannel/wgkey"
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
#: Outer IPv4/IPv6 header (20/40) + UDP 8 + type 4 + key index 4 + nonce 8 + tag 16.
OVERHEAD = 80
#: Keepalive given to the peers of a freshly created device (see the module docstring).
KICK_KEEPALIVE = 25
_RT_SCOPE_LINK = 253
_V6_DEFAULT_METRIC = 1024
_RFC1918 = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
_ULA = IPv6Network("fc00::/7")


class Mode(enum.Enum):
    SEPARATE = "separate"
    AUTO = "auto"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


@dataclass(frozen=True, slots=True)
class WireguardOptions:
    """The ``Backend`` options of a wireguard network config, validated."""

    listen_port: int = DEFAULT_PORT
    listen_port_v6: int = DEFAULT_PORT_V6
    mtu: int = 0
    psk: str | None = None
    keepalive: int = 0
    mode: Mode = Mode.SEPARATE

    @classmethod
    def from_config(cls, config: NetworkConfig) -> WireguardOptions:
        """:raises NetworkConfigError: an option has the wrong type or an invalid value."""
        spec = config.backend
        port = _port(spec.option("ListenPort", as_int, DEFAULT_PORT), "ListenPort", DEFAULT_PORT)
        port6 = _port(
            spec.option("ListenPortV6", as_int, DEFAULT_PORT_V6), "ListenPortV6", DEFAULT_PORT_V6
        )
        mtu = spec.option("MTU", as_int, 0)
        if mtu < 0:
            raise NetworkConfigError(
                f"Backend.MTU {mtu} is negative: leave it out (external MTU) or give the"
                " underlay MTU, e.g. 1500",
                field="Backend.MTU",
                value=mtu,
            )
        psk = spec.option("PSK", as_str, "")
        if psk and decode_key(psk) is None:
            # The value is a secret: never echo it.
            raise NetworkConfigError(
                "Backend.PSK is not a base64 WireGuard key: use 44 characters as printed"
                " by `wg genpsk`",
                field="Backend.PSK",
            )
        keepalive = spec.option("PersistentKeepaliveInterval", as_int, 0)
        if not 0 <= keepalive <= 65535:
            raise NetworkConfigError(
                f"Backend.PersistentKeepaliveInterval {keepalive} is out of range: use"
                " 0 (off) to 65535 seconds, e.g. 25",
                field="Backend.PersistentKeepaliveInterval",
                value=keepalive,
            )
        raw_mode = spec.option("Mode", as_str, Mode.SEPARATE.value)
        try:
            mode = Mode(raw_mode)
        except ValueError:
            raise NetworkConfigError(
                f"no valid Mode configured: Backend.Mode is {raw_mode!r}; use"
                ' "separate" (the default), "auto", "ipv4" or "ipv6"',
                field="Backend.Mode",
                value=raw_mode,
            ) from None
        return cls(port, port6, mtu, psk.strip() or None, keepalive, mode)


def _port(value: int, name: str, default: int) -> int:
    if not 0 < value < 65536:
        raise NetworkConfigError(
            f"Backend.{name} {value} is not a UDP port: use 1..65535 (default {default})",
            field=f"Backend.{name}",
            value=value,
        )
    return value


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device: its role (``v4``/``v6`` in separate mode, ``main`` otherwise)."""

    role: str
    name: str
    port: int
    v4: bool
    v6: bool


@dataclass(frozen=True, slots=True)
class PeerRules:
    """Everything :func:`lease_peers` needs besides the lease."""

    mode: Mode
    enable_ipv4: bool
    enable_ipv6: bool
    #: Listen ports of the devices that carry IPv4 / IPv6 (the "Port 0" fallback).
    port4: int
    port6: int
    own_v4: IPv4Address | None = None
    own_v6: IPv6Address | None = None
    psk: str | None = None
    keepalive: int = 0


@dataclass(frozen=True, slots=True)
class PeerData:
    public_key: str
    port: int


@functools.lru_cache(maxsize=16384)
def parse_peer_data(raw: str | None) -> PeerData | str:
    """``{"PublicKey":…,"Port":…}`` (Go JSON, keys case-insensitive, Port optional),
    or a one-line reason it is unusable."""
    if raw is None:
        return "no wireguard data in the lease"
    try:
        obj = GoObject.parse(raw)
        key = obj.get("PublicKey", as_str, "")
        port = obj.get("Port", as_int, 0)
    except GoJSONError as exc:
        return f"its wireguard data {_shown(raw)} does not parse ({exc})"
    if decode_key(key) is None:
        return f"its PublicKey {_shown(key)} is not a base64 WireGuard key"
    if not 0 <= port < 65536:
        return f"its Port {port} is not a UDP port"
    return PeerData(key.strip(), port)


def _shown(text: str) -> str:
    """``repr`` of lease text, cut short: a hostile lease must not flood the log."""
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _private4(ip: IPv4Address) -> bool:
    return any(ip in net for net in _RFC1918)


def select_mode(
    peer4: IPv4Address,
    peer6: IPv6Address | None,
    own4: IPv4Address | None,
    own6: IPv6Address | None,
) -> Mode:
    """flannel's ``auto`` endpoint choice (``selectMode``): IPv4 unless the peer's IPv4
    is private and both sides have non-ULA IPv6."""
    if peer6 is None:
        return Mode.IPV4
    if not _private4(peer4) and own4 is not None:
        return Mode.IPV4
    if peer6 not in _ULA and own6 is not None and own6 not in _ULA:
        return Mode.IPV6
    return Mode.IPV4


def lease_peers(lease: Lease, rules: PeerRules) -> dict[str, PeerConfig] | str:
    """The peer(s) one lease asks for, by device role, or a reason it gets none."""
    attrs = lease.attrs
    v4: PeerData | str | None = None
    v6: PeerData | str | None = None
    if rules.enable_ipv4 and attrs.backend_data is not None:
        v4 = parse_peer_data(attrs.backend_data)
    if (
        rules.enable_ipv6
        and lease.ipv6_subnet is not None
        and attrs.backend_v6_data is not None
        and attrs.public_ipv6 is not None
    ):
        v6 = parse_peer_data(attrs.backend_v6_data)
    where = f"wireguard: peer {lease.key} ({attrs.public_ip})"
    for data in (v4, v6):
        if isinstance(data, str):
            return f"{where}: {data}; skipped until its lease is fixed"
    if not isinstance(v4, PeerData) and not isinstance(v6, PeerData):
        return f"{where}: its lease has no wireguard data for an enabled address family"
    psk, keepalive = rules.psk, rules.keepalive

    def ep4(data: PeerData | None) -> str:
        return endpoint_text(attrs.public_ip, (data.port if data else 0) or rules.port4)

    def ep6(data: PeerData | None) -> str:
        return endpoint_text(attrs.public_ipv6, (data.port if data else 0) or rules.port6)

    if rules.mode is Mode.SEPARATE:
        out: dict[str, PeerConfig] = {}
        if isinstance(v4, PeerData):
            out["v4"] = PeerConfig.make(v4.public_key, ep4(v4), [lease.subnet], psk, keepalive)
        if isinstance(v6, PeerData) and lease.ipv6_subnet is not None:
            out["v6"] = PeerConfig.make(v6.public_key, ep6(v6), [lease.ipv6_subnet], psk, keepalive)
        return out
    subnets: list[IPv4Network | IPv6Network] = []
    if isinstance(v4, PeerData):
        subnets.append(lease.subnet)
    if isinstance(v6, PeerData) and lease.ipv6_subnet is not None:
        subnets.append(lease.ipv6_subnet)
    main = v6 if isinstance(v6, PeerData) else v4
    assert isinstance(main, PeerData)
    mode: Mode = rules.mode
    if mode is Mode.AUTO:
        mode = select_mode(attrs.public_ip, attrs.public_ipv6, rules.own_v4, rules.own_v6)
    if mode is Mode.IPV6:
        if attrs.public_ipv6 is None:
            return f"{where}: Mode ipv6 needs its PublicIPv6, which the lease does not have"
        endpoint = ep6(v6 if isinstance(v6, PeerData) else None)
    else:
        endpoint = ep4(v4 if isinstance(v4, PeerData) else None)
    return {"main": PeerConfig.make(main.public_key, endpoint, subnets, psk, keepalive)}


def desired_peers(
    leases: Iterable[Lease], rules: PeerRules, own_key: str
) -> tuple[dict[str, dict[str, PeerConfig]], list[str], list[str]]:
    """Per device role, the peers keyed by public key; plus skipped leases (one reason
    each) and warnings.

    Leases sharing a public key merge into one peer (AllowedIPs united; the endpoint of
    the most recently renewed lease wins). A lease carrying our own key (our own old
    lease after a subnet change) is skipped with a warning: WireGuard cannot peer
    with itself."""
    out: dict[str, dict[str, PeerConfig]] = {}
    skipped: list[str] = []
    warnings: list[str] = []
    ordered = sorted(leases, key=lambda lease: (lease.expiration or 0.0, lease.key))
    for lease in ordered:
        result = lease_peers(lease, rules)
        if isinstance(result, str):
            skipped.append(result)
            continue
        for role, peer in result.items():
            if peer.public_key == own_key:
                warnings.append(
                    f"wireguard: lease {lease.key} publishes this node's own public key"
                    " (an old lease of this node, or a copied key file): skipped"
                )
                continue
            table = out.setdefault(role, {})
            old = table.get(peer.public_key)
            if old is not None:
                if old.endpoint != peer.endpoint:
                    warnings.append(
                        f"wireguard: public key {peer.public_key} is published with endpoints"
                        f" {old.endpoint} and {peer.endpoint} (a copied key file?): using"
                        f" {peer.endpoint} from lease {lease.key}"
                    )
                peer = PeerConfig.make(
                    peer.public_key,
                    peer.endpoint,
                    old.allowed_ips + peer.allowed_ips,
                    peer.preshared_key,
                    peer.keepalive,
                )
            table[peer.public_key] = peer
    return out, skipped, warnings


def peer_changes(
    want: Mapping[str, PeerConfig], have: Mapping[str, PeerConfig]
) -> tuple[list[PeerConfig], list[str]]:
    """(peers to write, public keys to remove) that turn ``have`` into ``want``."""
    upserts = [peer for key, peer in want.items() if have.get(key) != peer]
    removes = [key for key in have if key not in want]
    return upserts, removes


class WireguardBackend:
    backend_type = "wireguard"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self.options = WireguardOptions.from_config(config)
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
        self.netns = ctx.extra.get("netns")
        self.device = ctx.extra.get("wg_device") or DEVICE
        self.device_v6 = ctx.extra.get("wg_device_v6") or DEVICE_V6
        for name in (self.device, self.device_v6):
            if not 0 < len(name) <= 15 or "/" in name:
                raise BackendError(f"wireguard device name {name!r} is not a valid link name")
        self.key_file = Path(
            ctx.extra.get("wg_key_file") or os.environ.get("WIREGUARD_KEY_FILE") or DEFAULT_KEY_FILE
        )
        self.private_key = ""
        self.public_key = ""

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

    async def lease_attrs(self) -> LeaseAttrs:
        self.load_keys()
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
    proc: WireguardGo | None = None
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

    def process(self, name: str) -> WireguardGo | None:
        """The wireguard-go serving device ``name`` (tests and diagnostics)."""
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
        proc = WireguardGo(dev.name, netns=be.netns)
        # A wireguard-go whose device was just deleted needs a moment to go away; one
        # that still answers serves a same-named device elsewhere (shared socket dir).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while await proc.uapi.alive():
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
        dev.proc = proc
        link = await nl.link(dev.name)
        if link is None:
            raise DataplaneError("create", f"wireguard device {dev.name}", "no such link")
        dev.index = link.index
        await proc.uapi.set(
            render_set(private_key=be.private_key, listen_port=dev.plan.port, replace_peers=True)
        )
        dev.programmed = {}
        dev.fresh = True
        await self._configure(dev, link)
        log.info(
            "wireguard: created %s (index %d, wireguard-go pid %s)", dev.name, link.index, proc.pid
        )

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
        if lease.subnet == self._lease.subnet:
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
                state = await dev.proc.uapi.get()
                have = state.peer_configs()
                if state.private_key != self._be.private_key:
                    private_key = self._be.private_key
                if state.listen_port != dev.plan.port:
                    port = dev.plan.port
            else:
                have = dev.programmed
            upserts, removes = peer_changes(want, have)
            if upserts or removes or private_key or port:
                await dev.proc.uapi.set(
                    render_set(
                        private_key=private_key, listen_port=port, peers=upserts, remove=removes
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
        return ReconcileReport(added=added, removed=removed, skipped=tuple(skipped))

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
                if lease.subnet == self._lease.subnet:
                    continue
                if event.kind is EventKind.ADDED and self.accepts(lease):
                    self._peers[lease.key] = lease
                    relevant = True
                elif self._peers.pop(lease.key, None) is not None:
                    relevant = True
            if not relevant:
                return ReconcileReport()
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
    """Registry entry point. ``ctx.extra``: ``netns`` (run in another namespace),
    ``wg_device``/``wg_device_v6`` (device names; tests), ``wg_key_file``."""
    return WireguardBackend(ctx)


__all__ = [
    "DEVICE",
    "DEVICE_V6",
    "OVERHEAD",
    "DevicePlan",
    "Mode",
    "PeerRules",
    "WireguardBackend",
    "WireguardNetwork",
    "WireguardOptions",
    "create",
    "desired_peers",
    "lease_peers",
    "parse_peer_data",
    "peer_changes",
    "select_mode",
]
