"""The agent's long-running loops, each a named task in one TaskGroup.

* ``lease``: renew before expiry; on our key vanishing, re-create it at once;
* ``watch``: read store snapshots/events into a queue;
* ``peers``: queued results -> LeaseWatcher -> ``network.apply``/``reconcile`` (a backlog
  is handled as one batch);
* ``reconcile``: every ``--resync-period`` s a full level-triggered pass;
* ``rules``: every ``--iptables-resync`` s re-check masquerade/forward rules;
* ``probe``: ask the store every 2 s so /healthz knows whether it answers;
* ``config``: notice a changed network config and tell the operator what to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from loden.backend.base import Network, ReconcileReport
from loden.errors import (
    ConfigNotFound,
    LeaseRevoked,
    LodenError,
    NetworkConfigError,
    StoreUnavailable,
)
from loden.health import HealthState, Metrics
from loden.lease_watch import LeaseWatcher
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent
from loden.settings import AgentSettings
from loden.subnet.base import SubnetManager, WatchResult
from loden.traffic.base import Networks, TrafficManager
from loden.traffic.commands import run_command

log = logging.getLogger(__name__)

EXIT_LEASE_REVOKED = 3


@dataclass(slots=True)
class AgentLoops:
    settings: AgentSettings
    manager: SubnetManager
    network: Network
    traffic: TrafficManager
    watcher: LeaseWatcher
    lease: Lease
    config: NetworkConfig
    health: HealthState
    metrics: Metrics
    networks: Networks
    started: float
    _renew_now: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once the first store snapshot arrived: before that an empty peer set means
    #: "not known yet", and reconciling against it would tear down working routes.
    _synced: asyncio.Event = field(default_factory=asyncio.Event)
    _reconcile_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Watch results read from the store, waiting for ``_peers_loop`` (bounded: a stuck
    #: data plane makes the reader wait instead of buffering without limit).
    _results: asyncio.Queue[WatchResult] = field(default_factory=lambda: asyncio.Queue(1024))

    async def run(self) -> int:
        self._publish_lease()
        revoked: LeaseRevoked | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._lease_loop(), name="lease")
                group.create_task(self._watch_loop(), name="watch")
                group.create_task(self._peers_loop(), name="peers")
                group.create_task(self._reconcile_loop(), name="reconcile")
                group.create_task(self._rules_loop(), name="rules")
                group.create_task(self._probe_loop(), name="probe")
                group.create_task(self._config_loop(), name="config")
                if self.settings.rules.blackhole_route:
                    group.create_task(self._blackhole_loop(), name="blackhole")
        except* LeaseRevoked as group_error:
            first = group_error.exceptions[0]
            assert isinstance(first, LeaseRevoked)
            revoked = first
        if revoked is not None:
            log.error(
                "%s; shutting down (exit %d). The subnet may now belong to another "
                "node: restart the agent to get a new one",
                revoked,
                EXIT_LEASE_REVOKED,
            )
            return EXIT_LEASE_REVOKED
        return 0

    def _publish_lease(self) -> None:
        ttl = self.lease.ttl_remaining()
        self.metrics.lease_ttl.set(-1 if ttl is None else ttl)
        self.health.lease_expiration = self.lease.expiration

    # -- lease -----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        retry = 5.0
        while True:
            delay = self.manager.renew_delay(self.lease)
            try:
                async with asyncio.timeout(delay):
                    await self._renew_now.wait()
            except TimeoutError:
                pass
            self._renew_now.clear()
            try:
                self.lease = await self.manager.renew_lease(self.lease)
                self.watcher.set_own(self.lease)
                self._publish_lease()
                retry = 5.0
                log.debug("renewed lease %s", self.lease.key)
            except StoreUnavailable as exc:
                log.warning(
                    "error renewing lease %s: %s (trying again in %.0fs)",
                    self.lease.key,
                    exc,
                    retry,
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, 60.0)
                self._renew_now.set()

    def _own_lease_changed(self, result: WatchResult) -> None:
        key = self.lease.key
        if result.snapshot is not None:
            mine = [lease for lease in result.snapshot if lease.key == key]
            if not mine:
                log.warning("our lease %s is missing from etcd; re-creating it", key)
                self._renew_now.set()
            elif mine[0].attrs.public_ip != self.lease.attrs.public_ip:
                self._renew_now.set()  # renew_lease raises LeaseRevoked with details
            return
        for event in result.events:
            if event.lease.key != key:
                continue
            if event.kind is EventKind.REMOVED:
                log.warning("our lease %s was deleted or expired; re-creating it", key)
                self._renew_now.set()
            elif event.lease.attrs.public_ip != self.lease.attrs.public_ip:
                self._renew_now.set()

    # -- peers -----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        """Read the store's watch into ``_results`` as fast as it delivers."""
        async for result in self.manager.watch_leases():
            self.health.store_last_ok = self.health.clock()  # the store just answered
            await self._results.put(result)

    async def _peers_loop(self) -> None:
        """Handle watch results. Whatever piled up meanwhile (while a reconcile or an
        apply ran) is handled as one batch: one ``LeaseWatcher.update`` and one
        ``network.apply``, not one each per result, which cost time proportional to the
        peer count (~10-20 ms at 5,000 peers) and let a burst of new leases queue up."""
        while True:
            results = [await self._results.get()]
            while not self._results.empty():
                results.append(self._results.get_nowait())
            for result in results:
                self._own_lease_changed(result)
            last = max((i for i, r in enumerate(results) if r.snapshot is not None), default=-1)
            if last >= 0:  # the latest snapshot supersedes everything before it
                snapshot = results[last].snapshot
                assert snapshot is not None
                self.watcher.reset(snapshot)
                self._synced.set()
                await self._reconcile("snapshot")
            events = [event for result in results[last + 1 :] for event in result.events]
            changes = self.watcher.update(events) if events else []
            if changes:
                await self._apply(changes)

    async def _apply(self, changes: list[LeaseEvent]) -> None:
        # Not behind _reconcile_lock: a periodic resync must not delay a new peer's
        # routes. Backends make apply and reconcile safe to overlap (see PeerNetwork).
        for event in changes:
            self.metrics.lease_events.labels(event.kind.value).inc()
            log.info(
                "peer %s %s (public IP %s)",
                event.lease.key,
                event.kind.value,
                event.lease.attrs.public_ip,
            )
        try:
            report = await self.network.apply(changes)
        except LodenError as exc:
            report = ReconcileReport(errors=(str(exc),))
        self._record(report, "apply")

    async def _reconcile(self, why: str) -> None:
        async with self._reconcile_lock:
            began = time.perf_counter()
            try:
                # The live mapping, read by the backend when its pass starts: a copy made
                # here could predate events that apply() handles while we wait.
                report = await self.network.reconcile(self.watcher.peers)
            except LodenError as exc:
                report = ReconcileReport(errors=(str(exc),))
            self.metrics.reconcile_seconds.observe(time.perf_counter() - began)
            self.metrics.peers_skipped.set(len(report.skipped))
            self._record(report, why)

    def _record(self, report: ReconcileReport, why: str) -> None:
        self.metrics.peers.set(len(self.watcher.peers))
        if not report.errors or report.conflicts:  # a failed pass knows no conflicts
            self.health.identity_conflicts = report.conflicts
            self.metrics.identity_conflicts.set(len(report.conflicts))
        self.health.note_reconcile(why, report.errors)
        if report.added or report.removed:
            self.metrics.reconcile_changes.inc(report.added + report.removed)
            log.info(
                "%s: data plane repaired (%d added, %d removed)", why, report.added, report.removed
            )
        if report.errors:
            self.metrics.reconcile_errors.inc()
            self.health.reconcile_failures += 1
            self.health.reconcile_last_error = report.errors[0]
            for error in report.errors[:10]:
                log.error("%s: %s", why, error)
        else:
            self.health.reconcile_failures = 0

    async def _reconcile_loop(self) -> None:
        await self._synced.wait()
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            await self._reconcile("resync")

    # -- rules, probe, config --------------------------------------------------------------

    async def _rules_loop(self) -> None:
        rules = self.settings.rules
        random_fully = not rules.fully_random_disable
        while True:
            await asyncio.sleep(rules.resync_seconds)
            try:
                changed = False
                if rules.ip_masq:
                    changed |= await self.traffic.ensure_masq_rules(
                        self.networks, self.networks, random_fully=random_fully
                    )
                if rules.forward_rules:
                    changed |= await self.traffic.ensure_forward_rules(self.networks)
                if changed:
                    self.metrics.rules_repairs.inc()
            except LodenError as exc:
                log.error(
                    "traffic rules resync failed: %s (retrying in %ds)", exc, rules.resync_seconds
                )

    async def _blackhole_loop(self) -> None:
        """``--ip-blackhole-route``: keep ``blackhole <own subnet>`` (spec §7.4).

        Added, never replaced: with a bridge (cni0) the connected route for the same
        subnet wins and the add fails with "File exists", exactly as in flannel; the
        blackhole is for bridge-less setups (Canal), where it stops traffic for unused
        pod addresses from leaving the node.
        """
        subnets: list[IPv4Network | IPv6Network] = []
        if self.config.enable_ipv4:  # never 0.0.0.0/0, the empty IPv4 part of IPv6-only
            subnets.append(self.lease.subnet)
        if self.config.enable_ipv6 and self.lease.ipv6_subnet is not None:
            subnets.append(self.lease.ipv6_subnet)
        while True:
            await asyncio.sleep(self.settings.rules.resync_seconds)
            for net in subnets:
                family = f"-{net.version}"
                subnet = str(net)
                present = await run_command(
                    ["ip", family, "route", "show", "type", "blackhole", subnet], check=False
                )
                if present.stdout.strip():
                    continue
                added = await run_command(
                    ["ip", family, "route", "add", "blackhole", subnet, "proto", "76"],
                    check=False,
                )
                if added.returncode == 0:
                    log.info("added blackhole route for %s", subnet)
                else:
                    log.debug("blackhole route for %s not added: %s", subnet, added.error_text)

    async def _probe_loop(self) -> None:
        down_since: float | None = None
        while True:
            try:
                await self.manager.probe()
                self.health.store_last_ok = self.health.clock()
                self.metrics.store_up.set(1)
                if down_since is not None:
                    log.warning(
                        "etcd answers again after %.0fs; /healthz is back to 200",
                        self.health.clock() - down_since,
                    )
                    down_since = None
            except StoreUnavailable as exc:
                self.metrics.store_up.set(0)
                if down_since is None:
                    # Once per outage, not per probe: the data plane keeps working meanwhile.
                    down_since = self.health.clock()
                    log.warning(
                        "etcd is not answering (%s); /healthz reports 503 after %.0fs of "
                        "this. Routes and rules stay as they are; peer changes are picked "
                        "up once it is back",
                        exc,
                        self.health.store_grace_seconds,
                    )
            self.metrics.watch_restarts.set(self.manager.watch_restarts)
            ttl = self.lease.ttl_remaining()
            self.metrics.lease_ttl.set(-1 if ttl is None else ttl)
            await asyncio.sleep(2.0)

    async def _config_loop(self) -> None:
        warned_raw = self.config.raw
        warned_bad = ""
        while True:
            await asyncio.sleep(3 * self.settings.resync_seconds)
            try:
                config = await self.manager.get_network_config()
            except StoreUnavailable as exc:
                log.debug("config check skipped: %s", exc)
                continue
            except (ConfigNotFound, NetworkConfigError) as exc:
                if str(exc) != warned_bad:  # once per distinct problem, not per check
                    warned_bad = str(exc)
                    log.warning(
                        "the network config in etcd is now unusable (%s); this agent keeps "
                        "running with the config it started with, but new nodes cannot start "
                        "until it is fixed (check it with `loden config validate`)",
                        exc,
                    )
                continue
            warned_bad = ""
            if config == self.config or config.raw == warned_raw:
                continue
            warned_raw = config.raw
            log.warning(
                "the network config in etcd changed (now Network=%s SubnetLen=%s backend=%s); "
                "this agent keeps running with the config it started with. Restart agents to "
                "apply SubnetLen/SubnetMin/SubnetMax changes; changing Network or the backend "
                "type needs every node restarted (expect downtime)",
                config.network,
                config.subnet_len,
                config.backend_type,
            )
