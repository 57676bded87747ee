"""The agent's long-running loops, each a named task in one TaskGroup.

* ``lease``: renew before expiry; on our key vanishing, re-create it at once;
* ``watch``: read store snapshots/events into a queue;
* ``peers``: queued results -> LeaseWatcher -> ``network.apply``/``reconcile`` (a backlog
  is handled as one batch);
* ``reconcile``: a full level-triggered pass every ``--resync-period`` s (a safety net
  while ``kernel`` repairs drift as the kernel reports it), and soon after any failed
  write (backoff 1 s doubling to 60 s) until a pass is clean;
* ``kernel``: the backend's netlink notifications (owned entries restored at once; a
  full pass when notifications were lost);
* ``rules``: every ``--iptables-resync`` s re-check masquerade/forward rules;
* ``probe``: ask the store once it was silent for half the /healthz grace (3 s), so
  /healthz knows whether it answers; any other answer (a watch event or progress
  notification, a renewal, a config read) counts as well and postpones the probe;
* ``config``: notice a changed network config and tell the operator what to do;
* ``blackhole``: ``--ip-blackhole-route``;
* ``complete``: tell the subnet manager once that the node is up (kube: node condition).

Every loop runs under :meth:`AgentLoops._supervise`, which decides what a failure
means. Transient (the store not answering, a lost compare-and-swap, an etcd 4xx, a
netlink or iptables failure, even an unexpected exception): retry with backoff (1 s
doubling to 60 s), one log line when it starts and one when it ends, and /healthz
names the loop once it failed three times in a row. Fatal (retrying cannot help):
:class:`LeaseRevoked` (exit 3) and :class:`StoreAuthError` (exit 4) stop the agent
with one line saying what to do. The exit statuses are listed in ``cli.py`` and the
README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loden import memory
from loden.backend.base import KernelWatcher, Network, ReconcileReport
from loden.errors import (
    ConfigNotFound,
    LeaseRevoked,
    LodenError,
    NetworkConfigError,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from loden.health import HealthState, Metrics
from loden.kernel.netlink import Netlink
from loden.kernel.types import RTN_BLACKHOLE, Route
from loden.lease_watch import LeaseWatcher
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent
from loden.settings import AgentSettings
from loden.subnet.base import SHARED_READ_SECONDS, SubnetManager, WatchResult
from loden.traffic.base import Networks, TrafficManager

log = logging.getLogger(__name__)

#: Exit statuses of a running agent (the startup ones are in ``cli.py``).
EXIT_LEASE_REVOKED = 3
EXIT_STORE_REFUSED = 4
#: The longest full-pass period of a backend without kernel notifications.
PASS_WITHOUT_EVENTS_SECONDS = 10.0
#: How often a store that stopped answering is probed until it answers again.
PROBE_RETRY_SECONDS = 2.0
#: Peer changes in one batch after which freed memory is handed back, as after a pass.
BIG_BATCH = 500


class AgentStop(Exception):
    """A loop met something that retrying cannot fix: stop with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def fatal(exc: BaseException) -> AgentStop | None:
    """The :class:`AgentStop` for a fatal error; None when it is worth retrying."""
    if isinstance(exc, AgentStop):
        return exc
    if isinstance(exc, LeaseRevoked):
        return AgentStop(
            EXIT_LEASE_REVOKED,
            f"{exc}; shutting down. The subnet may now belong to another node: restart "
            "the agent to get a new one",
        )
    if isinstance(exc, StoreAuthError):
        return AgentStop(
            EXIT_STORE_REFUSED,
            f"{exc}; shutting down (retrying cannot fix credentials). Fix them (etcd: the "
            "-etcd-* TLS/auth settings or the files they name; kube: the kubeconfig or the "
            "service account's RBAC) and restart the agent",
        )
    return None


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
    #: Backoff of a failing loop: ``retry_initial`` doubling up to ``retry_max`` seconds.
    retry_initial: float = 1.0
    retry_max: float = 60.0
    #: Probe the store after this many silent seconds (None: half the /healthz grace).
    probe_after: float | None = None
    #: How the blackhole loop gets its netlink handle (tests inject failures).
    open_netlink: Callable[[], Awaitable[Netlink]] = Netlink.open
    #: Consecutive failures per loop; a loop is absent while it works.
    _failures: dict[str, int] = field(default_factory=dict)
    #: When the last full pass (any reason) started: the periodic one waits a whole
    #: period after it, so a relist's pass is not followed by another one at once.
    _last_full_pass: float = 0.0
    #: Some write of a pass, an apply or a repair failed since the last clean full pass:
    #: the periodic pass then comes after a backoff, not a whole period (up to 5 min).
    _writes_failed: bool = False
    #: Reports with errors so far (a pass clears ``_writes_failed`` only if none came
    #: while it ran: it skips the entries a concurrent apply wrote, failed ones included).
    _error_reports: int = 0
    _failed_at: float = 0.0
    #: Set when writes fail, so a waiting reconcile loop reconsiders its deadline.
    _retry_wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> int:
        """Run every loop until cancelled (returns nothing then) or one meets a fatal
        error: then the others are cancelled and the exit status is returned."""
        self._publish_lease()
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "lease": self._lease_loop,
            "watch": self._watch_loop,
            "peers": self._peers_loop,
            "reconcile": self._reconcile_loop,
            "rules": self._rules_loop,
            "probe": self._probe_loop,
            "config": self._config_loop,
            "complete": self._complete_once,
        }
        if self.settings.rules.blackhole_route:
            loops["blackhole"] = self._blackhole_loop
        if self._kernel_events():
            loops["kernel"] = self._kernel_loop
        stop: AgentStop | None = None
        try:
            async with asyncio.TaskGroup() as group:
                for name, body in loops.items():
                    group.create_task(self._supervise(name, body), name=name)
        except* AgentStop as group_error:
            first = group_error.exceptions[0]
            assert isinstance(first, AgentStop)
            stop = first
        if stop is None:
            return 0
        log.error("%s (exit %d)", stop.message, stop.status)
        return stop.status

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` until it returns; retry transient failures, stop on fatal ones."""
        while True:
            try:
                await body()
                return
            except Exception as exc:
                stop = fatal(exc)
                if stop is not None:
                    raise stop from exc
                delay = self._failed(name, exc)
            await asyncio.sleep(delay)

    def _failed(self, name: str, exc: Exception) -> float:
        """Record one failure of loop ``name``; returns the delay before the retry."""
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        delay: float = min(self.retry_initial * 2.0 ** min(count - 1, 30), self.retry_max)
        text = _one_line(exc)
        self.health.loop_failures[name] = (count, text)
        self.metrics.loop_errors.labels(name).inc()
        if not isinstance(exc, LodenError | OSError):
            # Not one of ours: a bug, but a node's data plane must not go down for it.
            log.debug("%s loop: unexpected %s", name, type(exc).__name__, exc_info=exc)
            text += " (unexpected: please report it; -v=2 logs the traceback)"
        if count == 1:
            log.error(
                "%s loop failed: %s; retrying with backoff up to %gs (/healthz reports it "
                "if it persists)",
                name,
                text,
                self.retry_max,
            )
        else:
            log.debug("%s loop failed again (%d in a row): %s", name, count, text)
        return delay

    def _ok(self, name: str) -> None:
        """Loop ``name`` did its job once: clear its failure state."""
        count = self._failures.pop(name, 0)
        if count:
            self.health.loop_failures.pop(name, None)
            log.warning("%s loop works again after %d failed attempts", name, count)

    def _publish_lease(self) -> None:
        ttl = self.lease.ttl_remaining()
        self.metrics.lease_ttl.set(-1 if ttl is None else ttl)
        self.health.lease_expiration = self.lease.expiration

    # -- lease -----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew ``margin`` before expiry, or at once when our key changed. After a
        failure the supervisor's backoff is the wait: the renewal is retried at once."""
        while True:
            if "lease" not in self._failures:
                try:
                    async with asyncio.timeout(self.manager.renew_delay(self.lease)):
                        await self._renew_now.wait()
                except TimeoutError:
                    pass
            self._renew_now.clear()
            self.lease = await self.manager.renew_lease(self.lease)
            self.health.store_last_ok = self.health.clock()
            self.watcher.set_own(self.lease)
            self._publish_lease()
            self._ok("lease")
            log.debug("renewed lease %s", self.lease.key)

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
        """Read the store's watch into ``_results`` as fast as it delivers. The manager
        retries outages itself; what escapes restarts the watch (a fresh snapshot)."""
        # A snapshot only proves that listing works, not the watch after it: the loop
        # counts as working again at its first event or once it stayed up for
        # ``retry_max`` seconds (else a watch that fails right after each relist would
        # flap between "failed" and "works" without backing off).
        stable = asyncio.get_running_loop().call_later(self.retry_max, self._ok, "watch")
        try:
            async for result in self.manager.watch_leases(self.watcher.peers):
                self.health.store_last_ok = self.health.clock()  # the store just answered
                if result.snapshot is None and not result.events:
                    continue  # a progress notification: only a sign of life
                if result.events:
                    self._ok("watch")
                await self._results.put(result)
                # Not held while the next one is awaited (minutes, when idle): a relist's
                # snapshot is 5,000 leases the watcher replaces by those it already holds.
                del result
        finally:
            stable.cancel()
        raise StoreError(f"the {self.manager.name} lease watch ended; restarting it")

    async def _peers_loop(self) -> None:
        """Handle watch results. Whatever piled up meanwhile (while a reconcile or an
        apply ran) is handled as one batch: one ``LeaseWatcher.update`` and one
        ``network.apply``, not one each per result, which cost time proportional to the
        peer count (~10-20 ms at 5,000 peers) and let a burst of new leases queue up."""
        while True:
            # A call per batch: its locals (a relist's snapshot) go when it returns, not
            # when the next result arrives (minutes later, when idle).
            await self._handle(await self._next_results())
            self._ok("peers")

    async def _next_results(self) -> list[WatchResult]:
        results = [await self._results.get()]
        while not self._results.empty():
            results.append(self._results.get_nowait())
        return results

    async def _handle(self, results: list[WatchResult]) -> None:
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
        except Exception as exc:  # the next reconcile repairs it: level-triggered
            report = _failed_pass("apply", exc)
        if len(changes) >= BIG_BATCH:
            memory.release()  # as after a full pass: the batch's watch replies and writes
        self._record(report, "apply")

    async def _reconcile(self, why: str) -> None:
        async with self._reconcile_lock:
            self._last_full_pass = time.monotonic()
            errors_before = self._error_reports
            began = time.perf_counter()
            try:
                # The live mapping, read by the backend when its pass starts: a copy made
                # here could predate events that apply() handles while we wait.
                report = await self.network.reconcile(self.watcher.peers)
            except Exception as exc:  # retried by the next pass
                report = _failed_pass("reconcile", exc)
            self.metrics.reconcile_seconds.observe(time.perf_counter() - began)
            memory.release()  # a full pass allocates ~10 MB for a moment at 5,000 peers
            self.metrics.peers_skipped.set(len(report.skipped))
            self._record(report, why)
            if not report.errors and self._error_reports == errors_before:
                self._writes_failed = False  # a clean pass wrote all that failed before

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
            # Level-triggered: the failed writes are retried by a full pass soon (with
            # backoff), not at the next periodic one, up to 5 min away at the default.
            self._writes_failed = True
            self._error_reports += 1
            self._failed_at = time.monotonic()
            self._retry_wake.set()
            self.metrics.reconcile_errors.inc()
            self.health.reconcile_failures += 1
            self.health.reconcile_last_error = report.errors[0]
            for error in report.errors[:10]:
                log.error("%s: %s", why, error)
        else:
            self.health.reconcile_failures = 0

    def _kernel_events(self) -> bool:
        return self.settings.kernel_events and isinstance(self.network, KernelWatcher)

    async def _reconcile_loop(self) -> None:
        await self._synced.wait()
        period: float = self.settings.resync_seconds
        if not self._kernel_events():
            # Nothing repairs drift between passes for these backends (udp, wireguard,
            # the cloud routes, or -kernel-events=false): keep the old 10-s pass. A
            # cloud route another node's stale snapshot deleted came back only after
            # 5 minutes with the 300-s safety-net period.
            period = min(period, PASS_WITHOUT_EVENTS_SECONDS)
        backoff = self.retry_initial
        while True:
            retrying = self._writes_failed
            if retrying:  # not at once: what made the writes fail may last a moment
                due = max(self._last_full_pass, self._failed_at) + min(backoff, period)
            else:
                backoff = self.retry_initial
                due = self._last_full_pass + period
            wait = due - time.monotonic()
            if wait > 0:
                self._retry_wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._retry_wake.wait()
                continue
            await self._reconcile("retry of failed writes" if retrying else "resync")
            if retrying:
                backoff = min(backoff * 2.0, self.retry_max)
            self._ok("reconcile")

    async def _kernel_loop(self) -> None:
        """Started before the first snapshot, so nothing between it and the snapshot's
        reconcile goes unseen; until then a resync request waits for that reconcile."""
        assert isinstance(self.network, KernelWatcher)
        while True:
            try:
                async for drift in self.network.watch_kernel():
                    if drift.report is not None:
                        self.metrics.kernel_repairs.inc(drift.report.added)
                        self._record(drift.report, "kernel notification")
                    elif drift.resync is not None and self._synced.is_set():
                        log.warning("%s", drift.resync)
                        self.metrics.kernel_resyncs.inc()
                        await self._reconcile("kernel resync")
            except LodenError as exc:
                log.error(
                    "kernel notifications failed: %s (listening again in 10s; drift is "
                    "repaired by the full reconcile meanwhile)",
                    exc,
                )
                await asyncio.sleep(10.0)
                if self._synced.is_set():
                    await self._reconcile("kernel resync")

    # -- rules, probe, config --------------------------------------------------------------

    async def _rules_loop(self) -> None:
        rules = self.settings.rules
        random_fully = not rules.fully_random_disable
        while True:
            await sleep_to_tick(rules.resync_seconds)
            changed = False
            if rules.ip_masq:
                changed |= await self.traffic.ensure_masq_rules(
                    self.networks, self.networks, random_fully=random_fully
                )
            if rules.forward_rules:
                changed |= await self.traffic.ensure_forward_rules(self.networks)
            if changed:
                self.metrics.rules_repairs.inc()
            self._ok("rules")

    async def _blackhole_loop(self) -> None:
        """``--ip-blackhole-route``: keep ``blackhole <own subnet>`` (spec §7.4).

        Added, never replaced: with a bridge (cni0) the connected route for the same
        subnet wins and the add is refused ("File exists"), exactly as in flannel; the
        blackhole is for bridge-less setups (Canal), where it stops traffic for unused
        pod addresses from leaving the node.
        """
        routes: list[Route] = []
        if self.config.enable_ipv4:  # never 0.0.0.0/0, the empty IPv4 part of IPv6-only
            routes.append(Route(dst=self.lease.subnet, type=RTN_BLACKHOLE))
        if self.config.enable_ipv6 and self.lease.ipv6_subnet is not None:
            # The kernel gives an IPv6 route without a metric 1024: say so, so that the
            # "exists" test matches the route it made.
            routes.append(Route(dst=self.lease.ipv6_subnet, type=RTN_BLACKHOLE, priority=1024))
        nl = await self.open_netlink()
        try:
            while True:
                for route in routes:
                    if await nl.add_route(route):
                        log.info("added blackhole route for %s", route.dst)
                self._ok("blackhole")
                await asyncio.sleep(self.settings.rules.resync_seconds)
        finally:
            await nl.aclose()

    def _probe_period(self) -> float:
        """How often the store is asked: the rules period (5 s) when it fits in the
        /healthz grace with a second to spare, so that both loops wake together (see
        :func:`sleep_to_tick`), else a second less than the grace."""
        if self.probe_after:
            return self.probe_after
        grace = self.health.store_grace_seconds
        return max(min(self.settings.rules.resync_seconds, grace - 1.0), grace / 2)

    async def _probe_loop(self) -> None:
        """Ask the store on each tick, unless something else proved it alive so recently
        that the next tick still leaves a second of the /healthz grace (never, with the
        defaults: a 5 s period in a 6 s grace). /healthz is unchanged: it turns 503 once
        the store has been silent for the grace, and a probe starts well inside it."""
        down_since: float | None = None
        period = self._probe_period()
        while True:
            self.metrics.watch_restarts.set(self.manager.watch_restarts)
            ttl = self.lease.ttl_remaining()
            self.metrics.lease_ttl.set(-1 if ttl is None else ttl)
            if down_since is None:
                await sleep_to_tick(period)
                spare = self.health.store_grace_seconds - period - 1.0
                if self.health.clock() - self.health.store_last_ok < spare:
                    continue  # something else heard from the store just now
            try:
                await self.manager.probe()
                self.health.store_last_ok = self.health.clock()
                self.metrics.store_up.set(1)
                if down_since is not None:
                    log.warning(
                        "%s answers again after %.0fs; /healthz is back to 200",
                        self.manager.name,
                        self.health.clock() - down_since,
                    )
                    down_since = None
            except StoreUnavailable as exc:
                self.metrics.store_up.set(0)
                if down_since is None:
                    # Once per outage, not per probe: the data plane keeps working meanwhile.
                    down_since = self.health.clock()
                    log.warning(
                        "%s is not answering (%s); /healthz reports 503 after %.0fs of "
                        "this. Routes and rules stay as they are; peer changes are picked "
                        "up once it is back",
                        self.manager.name,
                        exc,
                        self.health.store_grace_seconds,
                    )
            self._ok("probe")
            if down_since is not None:
                await asyncio.sleep(PROBE_RETRY_SECONDS)

    async def _complete_once(self) -> None:
        await self.manager.complete_lease(self.lease)
        self._ok("complete")

    async def _config_loop(self) -> None:
        warned_raw = self.config.raw
        warned_bad = ""
        while True:
            # Not tied to the data-plane resync, which may be minutes apart; on the
            # probe's and the rules check's ticks (30 s is a multiple of their 5 s).
            await sleep_to_tick(3 * min(self.settings.resync_seconds, 10))
            try:
                # The probe reads the same key on this tick: one read serves both.
                config = await self.manager.get_network_config(max_age=SHARED_READ_SECONDS)
            except StoreUnavailable as exc:
                log.debug("config check skipped: %s", exc)
                continue
            except (ConfigNotFound, NetworkConfigError) as exc:
                self._ok("config")  # the store answered; the config is the problem
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
            # Not a sign of life for /healthz: the kube manager answers from the
            # net-conf.json it read at start, without asking the API server.
            self._ok("config")
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


async def sleep_to_tick(period: float) -> None:
    """Sleep until the next multiple of ``period`` on the event loop's clock. Loops with
    the same period (the rules check and the store probe, 5 s) then wake together: on
    these machines each wake-up of an idle agent cost ~2 ms of CPU whatever it did
    (cold caches), which made the wake-ups, not the work, most of its idle CPU."""
    loop = asyncio.get_running_loop()
    # Shifted by a phase of this process's own: agents sharing a machine (the lab, the
    # test suite) would otherwise all wake at the same instants.
    await asyncio.sleep(period - (loop.time() - _TICK_PHASE) % period)


#: This process's offset of :func:`sleep_to_tick` (one for all its loops).
_TICK_PHASE = random.uniform(0.0, 3600.0)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, LodenError):
        text = f"{type(exc).__name__}: {text}"
    return text.splitlines()[0][:300]


def _failed_pass(what: str, exc: Exception) -> ReconcileReport:
    """A data-plane pass that raised instead of reporting: an error like any other."""
    if not isinstance(exc, LodenError | OSError):
        log.debug("%s raised %s", what, type(exc).__name__, exc_info=exc)
    return ReconcileReport(errors=(_one_line(exc),))
