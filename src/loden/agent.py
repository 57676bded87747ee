"""The agent's composition root: wire the seams, then run the loops in one TaskGroup.

Phases: (1) setup in sequence: store, config, interface, backend, lease, data plane,
rules, subnet.env, READY; (2) run: lease keeper, peer watch, periodic reconcile, rules
resync, store probe, config-change check, as named tasks of one TaskGroup; (3) stop:
cancellation (SIGTERM) unwinds everything; :class:`LeaseRevoked` escapes as exit 3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from pathlib import Path

from loden import sdnotify
from loden.agent_loops import AgentLoops
from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface, Network
from loden.errors import (
    ConfigError,
    ConfigNotFound,
    LodenError,
    NetworkConfigError,
    StoreUnavailable,
    SubnetsExhausted,
)
from loden.files import atomic_write, check_writable, ensure_private_dir, read_previous_subnets
from loden.health import HealthServer, HealthState, Metrics
from loden.kernel.interfaces import InterfaceOptions, select
from loden.kernel.netlink import Netlink
from loden.lease_watch import LeaseWatcher
from loden.model.backend_options import UdpOptions, WireguardMode, WireguardOptions
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.model.subnet_env import PreviousSubnets, SubnetEnv
from loden.settings import AgentSettings
from loden.status.agent_view import describer
from loden.subnet import open_subnet_manager
from loden.subnet.base import SubnetManager
from loden.traffic import ManagedTraffic, check_br_netfilter, open_traffic_manager
from loden.traffic.base import Networks

log = logging.getLogger(__name__)


async def wait_for_config(manager: SubnetManager, health: HealthState) -> NetworkConfig:
    """Poll the network config every second until it exists and validates."""
    attempts = 0
    while True:
        try:
            config = await manager.get_network_config()
            health.store_last_ok = health.clock()
            return config
        except (ConfigNotFound, NetworkConfigError, StoreUnavailable) as exc:
            if isinstance(exc, ConfigNotFound | NetworkConfigError):
                health.store_last_ok = health.clock()
            if attempts % 10 == 0:
                log.warning(
                    "couldn't fetch network config: %s (retrying every second; "
                    "subnet.env is not written until this is fixed)",
                    exc,
                )
            attempts += 1
        await asyncio.sleep(1.0)


async def pick_interface(settings: AgentSettings, config: NetworkConfig) -> ExternalInterface:
    """Choose the external interface per ``--iface*``/``--public-ip*`` (spec §8.4)."""
    opts = InterfaceOptions(
        ifaces=settings.iface.ifaces,
        regexes=settings.iface.iface_regexes,
        can_reach=settings.iface.can_reach,
        public_ip=settings.iface.public_ip,
        public_ipv6=settings.iface.public_ipv6,
        ipv4=config.enable_ipv4,
        ipv6=config.enable_ipv6,
    )
    nl = await Netlink.open()
    try:
        selection = await select(nl, opts)
    finally:
        await nl.aclose()
    log.info("using interface: %s", selection.reason)
    return selection.ext


async def acquire(manager: SubnetManager, attrs: LeaseAttrs, previous: PreviousSubnets) -> Lease:
    """Acquire a lease; exhaustion and store outages are retried with bounded backoff."""
    delay = 1.0
    while True:
        try:
            return await manager.acquire_lease(attrs, previous)
        except (SubnetsExhausted, StoreUnavailable) as exc:
            log.error("failed to acquire lease: %s; retrying in %.0fs", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 60.0)


async def leases_now(manager: SubnetManager) -> list[Lease]:
    """Every lease in the store, so the backend can check that what it publishes (VTEP
    MAC, WireGuard key) is not another node's; empty (and said) if the store cannot
    list them now: the peer path still reports a collision later."""
    try:
        return await manager.list_leases()
    except LodenError as exc:
        log.warning("cannot list the leases to check this node's identity against: %s", exc)
        return []


async def check_traffic(config: NetworkConfig) -> ManagedTraffic:
    """The rules mode's preconditions: br_netfilter (iptables mode) and the tools.

    :raises TrafficRulesError: says what to load or install.
    """
    if not config.enable_nftables:
        check_br_netfilter(ipv6=config.enable_ipv6)
    traffic = open_traffic_manager(nftables=config.enable_nftables)
    await traffic.check(ipv6=config.enable_ipv6)
    return traffic


async def backend_ports(context: BackendContext) -> list[tuple[str, int, str]]:
    """UDP ports the data plane will bind: (address, port, what). The udp backend binds
    ``IfaceAddr:Port`` (spec §6.3); wireguard its ListenPort(s) on every address, unless
    its device from the last run still exists (its socket holds the port legitimately
    until the backend recreates it). vxlan's kernel socket is shared by design."""
    options, knobs = context.options, context.settings
    if isinstance(options, UdpOptions) and context.ext.iface_addr is not None:
        return [(str(context.ext.iface_addr), options.port, "the udp backend's Port")]
    if not isinstance(options, WireguardOptions):
        return []
    config = context.config
    wanted = [(knobs.wireguard_device, options.listen_port, "ListenPort")]
    if options.mode is WireguardMode.SEPARATE:
        wanted = [w for w in wanted if config.enable_ipv4]
        if config.enable_ipv6:
            wanted.append((knobs.wireguard_device_v6, options.listen_port_v6, "ListenPortV6"))
    async with await Netlink.open(knobs.netns) as nl:
        free = [(d, port, key) for d, port, key in wanted if await nl.link(d) is None]
    return [("0.0.0.0", port, f"the wireguard backend's {key}") for _, port, key in free]


def check_ports(ports: list[tuple[str, int, str]]) -> None:
    """:raises ConfigError: a port is taken (names the port and what to do)."""
    for address, port, what in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, port))
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind UDP {address}:{port} ({what}): {exc.strerror or exc}; stop "
                    "what holds it or set another port in the Backend config"
                ) from exc


def subnet_env_for(
    config: NetworkConfig, lease: Lease, network: Network, ip_masq: bool
) -> SubnetEnv:
    return SubnetEnv(
        network=config.network if config.enable_ipv4 else None,
        subnet=lease.subnet if config.enable_ipv4 else None,
        ipv6_network=config.ipv6_network if config.enable_ipv6 else None,
        ipv6_subnet=lease.ipv6_subnet if config.enable_ipv6 else None,
        mtu=network.mtu,
        ipmasq=ip_masq,
    )


def networks_of(
    config: NetworkConfig, lease: Lease | None, previous: PreviousSubnets | None = None
) -> Networks:
    if previous is not None:
        return Networks(
            previous.network, previous.subnet, previous.ipv6_network, previous.ipv6_subnet
        )
    assert lease is not None
    return Networks(
        config.network if config.enable_ipv4 else None,
        lease.subnet if config.enable_ipv4 else None,
        config.ipv6_network if config.enable_ipv6 else None,
        lease.ipv6_subnet if config.enable_ipv6 else None,
    )


async def run(settings: AgentSettings) -> int:
    """Run the agent until cancelled; returns the process exit status."""
    # Local inputs first: a bad path must fail before any kernel or etcd state exists.
    check_writable(settings.subnet_file)
    ensure_private_dir(Path(settings.state_dir))
    metrics = Metrics()
    health = HealthState()
    server: asyncio.Server | None = None
    if settings.healthz_port:
        server = await HealthServer(health, metrics).serve(
            settings.healthz_ip, settings.healthz_port
        )
    manager = await open_subnet_manager(settings)
    health.store = manager.name
    health.store_last_ok = health.clock()
    network: Network | None = None
    traffic: ManagedTraffic | None = None
    try:
        config = await wait_for_config(manager, health)
        log.info(
            "network config: Network=%s SubnetLen=%d backend=%s (from %s)",
            config.network,
            config.subnet_len,
            config.backend_type,
            manager.name,
        )
        override = await manager.public_ip_override()
        if override.ipv4 is not None or override.ipv6 is not None:
            settings = dataclasses.replace(
                settings,
                iface=dataclasses.replace(
                    settings.iface,
                    public_ip=override.ipv4 or settings.iface.public_ip,
                    public_ipv6=override.ipv6 or settings.iface.public_ipv6,
                ),
            )
        ext = await pick_interface(settings, config)
        # Every precondition before the first kernel object or lease: a start that fails
        # one of them leaves nothing behind (flanneld checked br_netfilter and the rules
        # mode only after its device and lease existed).
        traffic = await check_traffic(config)
        context = BackendContext(config, ext, Path(settings.state_dir), settings.backend)
        backend = create_backend(config.backend_type, context)
        check_ports(await backend_ports(context))
        await traffic.cleanup_other_mode()
        attrs = await backend.lease_attrs(await leases_now(manager))
        previous = read_previous_subnets(settings.subnet_file)
        lease = await acquire(manager, attrs, previous)
        network = await backend.activate(lease)
        current = networks_of(config, lease)
        old = networks_of(config, None, previous)
        random_fully = not settings.rules.fully_random_disable
        if settings.rules.ip_masq:
            await traffic.ensure_masq_rules(current, old, random_fully=random_fully)
        if settings.rules.forward_rules:
            await traffic.ensure_forward_rules(current)
        env = subnet_env_for(config, lease, network, settings.rules.ip_masq)
        atomic_write(settings.subnet_file, env.render())
        health.ready = True
        metrics.ready.set(1)
        log.info(
            "wrote %s (subnet %s, MTU %d); flanneld is ready",
            settings.subnet_file,
            lease.key,
            network.mtu,
        )
        sdnotify.notify("READY=1")
        loops = AgentLoops(
            settings=settings,
            manager=manager,
            network=network,
            traffic=traffic,
            watcher=LeaseWatcher(
                lease, config.network, config.ipv6_network if config.enable_ipv6 else None
            ),
            lease=lease,
            config=config,
            health=health,
            metrics=metrics,
            networks=current,
            started=time.monotonic(),
        )
        health.describe = describer(loops, time.time())
        return await loops.run()
    finally:
        sdnotify.notify("STOPPING=1")
        if traffic is not None and settings.rules.cleanup_on_exit:
            await asyncio.shield(traffic.remove_all())
        if network is not None:
            await network.aclose()
        await manager.aclose()
        if server is not None:
            server.close()
