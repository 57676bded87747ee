"""The agent's long-running loops, each a named task in one TaskGroup.

* ``lease``: renew before expiry; on our key vanishing, re-create it at once;
* ``watch``: store snapshots/events -> LeaseWatcher -> ``network.apply``/``reconcile``;
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
from loden.subnet.manager import EtcdSubnetManager, WatchResult
from loden.traffic.base import Networks, TrafficManager

log = logging.getLogger(__name__)

EXIT_LEASE_REVOKED = 3


@dataclass(slots=True)
class AgentLoops:
    settings: AgentSettings
    manager: EtcdSubnetManager
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

    async def run(self) -> int:
        self._publish_lease()
        revoked: LeaseRevoked | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._lease_loop(), name="lease")
                group.create_task(self._watch_loop(), name="watch")
                group.create_task(self._reconcile_loop(), name="reconcile")
                group.create_task(self._rules_loop(), name="rules")
                group.create_task(self._probe_loop(), name="probe")
                group.create_task(self._config_loop(), name="config")
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
        async for result in self.manager.watch_leases():
            self._own_lease_changed(result)
            if result.snapshot is not None:
                self.watcher.reset(result.snapshot)
                self._synced.set()
                await self._reconcile("snapshot")
                continue
            changes = self.watcher.update(result.events)
            if changes:
                await self._apply(changes)

    async def _apply(self, changes: list[LeaseEvent]) -> None:
        async with self._reconcile_lock:
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
                report = await self.network.reconcile(dict(self.watcher.peers))
            except LodenError as exc:
                report = ReconcileReport(errors=(str(exc),))
            self.metrics.reconcile_seconds.observe(time.perf_counter() - began)
            self._record(report, why)

    def _record(self, report: ReconcileReport, why: str) -> None:
        self.metrics.peers.set(len(self.watcher.peers))
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

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.manager.store.get_config()
                self.health.store_last_ok = self.health.clock()
                self.metrics.store_up.set(1)
            except StoreUnavailable:
                self.metrics.store_up.set(0)
            self.metrics.watch_restarts.set(self.manager.health.watch_restarts)
            ttl = self.lease.ttl_remaining()
            self.metrics.lease_ttl.set(-1 if ttl is None else ttl)
            await asyncio.sleep(2.0)

    async def _config_loop(self) -> None:
        warned_raw = self.config.raw
        while True:
            await asyncio.sleep(3 * self.settings.resync_seconds)
            try:
                config = await self.manager.get_network_config()
            except (StoreUnavailable, ConfigNotFound, NetworkConfigError) as exc:
                log.debug("config check skipped: %s", exc)
                continue
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
