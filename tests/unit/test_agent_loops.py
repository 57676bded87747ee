"""AgentLoops under failure: each loop's transient errors are retried and reported by
/healthz, fatal ones stop the agent with one line and its documented exit status.

The loops run for real against the subnet manager over the in-memory etcd double
(:class:`loden.subnet.memory.MemoryStore`, extended here to inject failures); only the
data plane and the traffic rules are fakes, since what is under test is the agent's
reaction to their failures, not the kernel.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from loden import agent_loops, memory
from loden.agent_loops import EXIT_LEASE_REVOKED, EXIT_STORE_REFUSED, AgentLoops
from loden.backend.base import KernelDrift, KernelWatcher, ReconcileReport
from loden.errors import (
    CommandError,
    DataplaneError,
    LeaseConflict,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from loden.health import HealthServer, HealthState, Metrics
from loden.kernel.netlink import Netlink
from loden.kernel.types import RTN_BLACKHOLE, Route
from loden.lease_watch import LeaseWatcher
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.model.subnet_env import PreviousSubnets
from loden.settings import parse_agent_args
from loden.subnet.base import WatchResult
from loden.subnet.manager import EtcdSubnetManager
from loden.subnet.memory import MemoryStore
from loden.subnet.store import Listing, StoredKV, WatchBatch
from loden.traffic.base import Networks

CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'
#: Every wait in these tests is bounded by this (seconds).
DEADLINE = 15.0


class FaultyStore(MemoryStore):
    """The etcd double, with sticky failures: ``fail(method, exc)`` makes every call of
    ``method`` raise ``exc`` until ``heal(method)``."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, Exception] = {}
        self.calls: dict[str, int] = {}

    def fail(self, method: str, exc: Exception) -> None:
        self.faults[method] = exc

    def heal(self, method: str) -> None:
        self.faults.pop(method, None)

    def _check(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method in self.faults:
            raise self.faults[method]

    async def get_config(self) -> bytes | None:
        self._check("get_config")
        return await super().get_config()

    async def get(self, name: str) -> StoredKV | None:
        self._check("get")
        return await super().get(name)

    async def list(self, *, with_ttl: bool = False) -> Listing:
        self._check("list")
        return await super().list(with_ttl=with_ttl)

    async def update(
        self, name: str, value: bytes, ttl: int | None, *, expect_value: bytes
    ) -> StoredKV:
        self._check("update")
        return await super().update(name, value, ttl, expect_value=expect_value)

    async def watch(self, cursor: int) -> AsyncIterator[WatchBatch]:
        self._check("watch")
        async for batch in super().watch(cursor):
            yield batch


@dataclass
class FakeNetwork:
    """A data plane that records what it was asked and can be told to raise."""

    lease: Lease
    mtu: int = 1450
    applied: list[LeaseEvent] = field(default_factory=list)
    reconciled: list[set[str]] = field(default_factory=list)
    apply_error: Exception | None = None
    reconcile_error: Exception | None = None
    apply_failures: int = 0

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        if self.apply_error is not None:
            self.apply_failures += 1
            raise self.apply_error
        self.applied.extend(events)
        return ReconcileReport(added=len(events))

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        if self.reconcile_error is not None:
            raise self.reconcile_error
        self.reconciled.append(set(peers))
        return ReconcileReport()

    async def aclose(self) -> None:
        return None


@dataclass
class FakeTraffic:
    error: Exception | None = None
    ensured: int = 0

    async def cleanup_other_mode(self) -> None:
        return None

    async def ensure_masq_rules(
        self, current: Networks, previous: Networks, *, random_fully: bool
    ) -> bool:
        if self.error is not None:
            raise self.error
        self.ensured += 1
        return False

    async def ensure_forward_rules(self, current: Networks) -> bool:
        return False


@dataclass
class FakeNetlink:
    """What the blackhole loop uses of :class:`Netlink`."""

    error: Exception | None = None
    added: list[Route] = field(default_factory=list)
    closed: bool = False

    async def add_route(self, route: Route) -> bool:
        if self.error is not None:
            raise self.error
        if route in self.added:
            return False
        self.added.append(route)
        return True

    async def aclose(self) -> None:
        self.closed = True


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.1.{n}"), "host-gw")


@dataclass
class Agent:
    store: FaultyStore
    manager: EtcdSubnetManager
    loops: AgentLoops
    network: FakeNetwork
    traffic: FakeTraffic
    health: HealthState
    task: asyncio.Task[int]

    def problems(self) -> str:
        status, _, body = HealthServer(self.health, Metrics()).respond("/healthz")
        return f"{status} {body.decode()}"


async def eventually(what: str, check: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


async def failures(agent: Agent, loop: str, at_least: int) -> None:
    await eventually(
        f"{loop} fails {at_least} times",
        lambda: agent.health.loop_failures.get(loop, (0, ""))[0] >= at_least,
    )


async def start(
    *,
    flags: Sequence[str] = (),
    ttl: int = 86400,
    margin_minutes: int = 60,
    network_type: type[FakeNetwork] | None = None,
    **kwargs: Any,
) -> Agent:
    store = FaultyStore()
    await store.put_config(CONFIG)
    manager = EtcdSubnetManager(store, ttl=ttl, renew_margin=margin_minutes * 60)
    lease = await manager.acquire_lease(attrs(1), PreviousSubnets())
    config = NetworkConfig.parse(CONFIG)
    settings = parse_agent_args(["-iptables-resync=1", "-resync-period=1", *flags], {})
    network = (network_type or FakeNetwork)(lease)
    traffic = FakeTraffic()
    health = HealthState(loop_failures_unhealthy=2)
    loops = AgentLoops(
        settings=settings,
        manager=manager,
        network=network,
        traffic=traffic,
        watcher=LeaseWatcher(lease, config.network),
        lease=lease,
        config=config,
        health=health,
        metrics=Metrics(),
        networks=Networks(config.network, lease.subnet, None, None),
        started=0.0,
        retry_initial=0.02,
        retry_max=0.1,
        **kwargs,
    )
    task = asyncio.create_task(loops.run())
    agent = Agent(store, manager, loops, network, traffic, health, task)
    await eventually("first snapshot reconciled", lambda: bool(network.reconciled))
    return agent


async def stop(agent: Agent) -> None:
    """Cancel as SIGTERM does; the agent must stop (a swallowed cancellation hangs it)."""
    agent.task.cancel()
    done, _ = await asyncio.wait([agent.task], timeout=DEADLINE)
    assert done, "the agent did not stop when cancelled"
    assert agent.task.cancelled()


async def add_peer(agent: Agent, n: int) -> str:
    key = f"10.5.{100 + n}.0-24"
    await agent.store.create(key, attrs(n).to_json().encode(), 86400)
    return key


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("get", StoreUnavailable("etcd unreachable: connection refused")),
        ("update", LeaseConflict("10.5.1.0-24 changed under us")),
        ("update", StoreError("etcd kv/txn failed: HTTP 400 etcdserver: too many requests")),
    ],
    ids=["unavailable", "lost-cas", "etcd-4xx"],
)
async def test_lease_renewal_failures_are_retried_and_reported(
    method: str, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """A margin of 1439 minutes renews a 24 h lease after 60 s; ttl=3 with the default
    margin renews at the 1 s floor: the first renewal fails, is retried with backoff,
    shows in /healthz, and the agent keeps running until the store recovers."""
    agent = await start(ttl=3)
    before = agent.loops.lease.expiration
    agent.store.fail(method, error)
    try:
        await failures(agent, "lease", 3)
        assert not agent.task.done()
        assert agent.problems().startswith("503")
        assert "lease loop failing" in agent.problems()
        assert str(error).split(":")[0] in agent.problems()
        agent.store.heal(method)
        await eventually("lease renewed", lambda: "lease" not in agent.health.loop_failures)
        assert agent.loops.lease.expiration is not None and before is not None
        assert agent.loops.lease.expiration > before
        assert agent.problems().startswith("200")
        assert any("lease loop failed" in r.getMessage() for r in caplog.records)
        assert any("lease loop works again" in r.getMessage() for r in caplog.records)
    finally:
        await stop(agent)


async def test_lease_taken_by_another_node_exits_3_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await start()
    key = agent.loops.lease.key
    current = await agent.store.get(key)
    assert current is not None
    await agent.store.update(key, attrs(9).to_json().encode(), 86400, expect_value=current.value)
    async with asyncio.timeout(DEADLINE):
        status = await agent.task
    assert status == EXIT_LEASE_REVOKED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "192.168.1.9" in errors[0] and "restart the agent" in errors[0]
    assert "exit 3" in errors[0]


async def test_store_refusing_credentials_exits_4_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await start()
    agent.store.fail("get_config", StoreAuthError("etcd refused kv/range: permission denied"))
    async with asyncio.timeout(DEADLINE):
        status = await agent.task
    assert status == EXIT_STORE_REFUSED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "permission denied" in errors[0] and "-etcd-" in errors[0]


async def test_watch_error_restarts_the_watch_and_peers_still_arrive() -> None:
    agent = await start()
    agent.store.fail("watch", StoreError("etcd watch failed: HTTP 400 bad request"))
    agent.store.break_watches()  # the open watch drops; reopening it now fails
    try:
        await failures(agent, "watch", 2)
        assert "watch loop failing" in agent.problems()
        agent.store.heal("watch")
        key = await add_peer(agent, 1)
        await eventually(
            "peer programmed after the watch came back",
            lambda: (
                any(e.lease.key == key for e in agent.network.applied)
                or any(key in r for r in agent.network.reconciled)
            ),
        )
        await eventually("watch healthy", lambda: "watch" not in agent.health.loop_failures)
    finally:
        await stop(agent)


async def test_data_plane_exceptions_are_reported_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception from the backend (a bug, an unmapped pyroute2 error) is a
    failed pass: reported, retried by the next one; other peers keep being applied."""
    agent = await start()
    agent.network.reconcile_error = KeyError("ifindex 7")
    try:
        await eventually("reconcile failure recorded", lambda: agent.health.reconcile_failures > 0)
        assert "KeyError" in agent.health.reconcile_last_error
        key = await add_peer(agent, 2)
        await eventually(
            "peer applied despite the failing reconcile",
            lambda: any(e.lease.key == key for e in agent.network.applied),
        )
        agent.network.apply_error = RuntimeError("netlink socket closed")
        await add_peer(agent, 3)
        await eventually("apply failure logged", lambda: "apply: RuntimeError" in caplog.text)
        assert not agent.task.done()
        agent.network.apply_error = agent.network.reconcile_error = None
        await eventually("reconcile healthy again", lambda: agent.health.reconcile_failures == 0)
    finally:
        await stop(agent)


async def test_failed_writes_bring_the_full_pass_forward() -> None:
    """A failed apply is retried by a full pass after a short backoff, not at the next
    periodic pass (300 s by default); once a pass is clean the period applies again."""
    agent = await start(flags=["-resync-period=300"])
    try:
        await asyncio.sleep(0.2)
        passes = len(agent.network.reconciled)
        agent.network.apply_error = RuntimeError("netlink: No buffer space available")
        key = await add_peer(agent, 2)
        await eventually("apply failed", lambda: agent.network.apply_failures > 0)
        await eventually(
            "retried by a full pass holding the peer",
            lambda: any(key in peers for peers in agent.network.reconciled[passes:]),
        )
        assert agent.health.reconcile_failures == 0
        agent.network.apply_error = None
        settled = len(agent.network.reconciled)
        await asyncio.sleep(0.5)  # > retry_max: only the period would bring another pass
        assert len(agent.network.reconciled) == settled
    finally:
        await stop(agent)


@dataclass
class FakeKernelNetwork(FakeNetwork):
    """A data plane that listens to the kernel (which never reports anything here)."""

    async def watch_kernel(self) -> AsyncIterator[KernelDrift]:
        await asyncio.Event().wait()
        yield KernelDrift()  # pragma: no cover - never reached


@pytest.mark.parametrize("listens", [False, True], ids=["no-notifications", "notifications"])
async def test_full_pass_period_without_kernel_notifications_is_capped(
    monkeypatch: pytest.MonkeyPatch, listens: bool
) -> None:
    """-resync-period=300 is a safety net only where the kernel's notifications repair
    drift in between; without them (udp, wireguard, the cloud routes,
    -kernel-events=false) the full pass still comes every 10 s (0.1 s here)."""
    monkeypatch.setattr(agent_loops, "PASS_WITHOUT_EVENTS_SECONDS", 0.1)
    network_type = FakeKernelNetwork if listens else FakeNetwork
    agent = await start(flags=["-resync-period=300"], network_type=network_type)
    try:
        assert isinstance(agent.network, KernelWatcher) is listens
        passes = len(agent.network.reconciled)
        await asyncio.sleep(0.6)
        more = len(agent.network.reconciled) - passes
        if listens:
            assert more == 0
        else:
            assert 3 <= more <= 7, more
    finally:
        await stop(agent)


async def test_loops_wake_on_the_same_ticks_shifted_by_the_process_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe and the rules check (same period) wake together, so an idle agent pays
    for one wake-up per tick; the phase is this process's own, so agents sharing a
    machine do not all wake at once."""
    monkeypatch.setattr(agent_loops, "_TICK_PHASE", 0.0123)
    loop = asyncio.get_running_loop()
    woke: list[float] = []

    async def sleeper() -> None:
        await agent_loops.sleep_to_tick(0.2)
        woke.append(loop.time())

    await asyncio.gather(sleeper(), sleeper())
    assert abs(woke[0] - woke[1]) < 0.005
    assert (woke[0] - 0.0123) % 0.2 < 0.02  # on the process's tick, not the loop's zero


async def test_a_big_batch_of_peer_changes_hands_memory_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As after a full pass: a batch of hundreds of peers (a mass churn) allocated its
    watch replies and writes for a moment; glibc keeps freed heap unless told."""
    released: list[int] = []
    monkeypatch.setattr(memory, "release", lambda: released.append(1))
    agent = await start(flags=["-resync-period=300"])  # no periodic pass meanwhile
    try:
        released.clear()  # the first snapshot's pass
        small = [LeaseEvent(EventKind.ADDED, Lease(IPv4Network("10.5.200.0/24"), attrs(2)))]
        await agent.loops._apply(small)
        assert released == []
        big = [
            LeaseEvent(EventKind.ADDED, Lease(IPv4Network(f"10.6.{n >> 8}.{n & 255}/32"), attrs(3)))
            for n in range(agent_loops.BIG_BATCH)
        ]
        await agent.loops._apply(big)
        assert released == [1]
    finally:
        await stop(agent)


async def test_a_handled_relist_leaves_one_object_per_peer() -> None:
    """Once a relist's snapshot is handled nothing holds it (the loops' locals held it
    until the next watch result: minutes, when idle), and the peers are the objects held
    before it: each peer is one Lease in the agent, not two (issue 14)."""
    agent = await start(flags=["-resync-period=300"])  # no periodic pass meanwhile
    try:
        keys = [await add_peer(agent, n) for n in range(2, 8)]
        await eventually("peers arrive", lambda: set(keys) <= set(agent.loops.watcher.peers))
        before = {key: agent.loops.watcher.peers[key] for key in keys}
        passes = len(agent.network.reconciled)
        # A change the watch has not delivered yet, compacted away, then the watch
        # drops: it cannot resume from its revision, so the manager relists.
        late = await add_peer(agent, 9)
        agent.store.compact()
        agent.store.break_watches()
        await eventually("relisted", lambda: len(agent.network.reconciled) > passes)
        assert late in agent.network.reconciled[-1]
        assert all(agent.loops.watcher.peers[key] is before[key] for key in keys)
        await asyncio.sleep(0.05)  # the loops are back waiting for the next result
        gc.collect()
        objects = gc.get_objects()
        assert [o for o in objects if isinstance(o, WatchResult) and o.snapshot] == []
        copies = sorted(o.key for o in objects if type(o) is Lease and o.key in before)
        assert copies == sorted(keys)
    finally:
        await stop(agent)


async def test_rules_failures_are_retried_and_reported() -> None:
    agent = await start(flags=["-ip-masq"])
    agent.traffic.error = CommandError(["iptables-restore"], 4, "Another app holds the lock")
    try:
        await failures(agent, "rules", 2)
        assert "rules loop failing" in agent.problems()
        assert "holds the lock" in agent.problems()
        agent.traffic.error = None
        await eventually("rules ensured", lambda: agent.traffic.ensured > 0)
        await eventually("rules healthy", lambda: "rules" not in agent.health.loop_failures)
    finally:
        await stop(agent)


async def test_store_error_replies_on_probe_are_transient() -> None:
    agent = await start()
    agent.store.fail("get_config", StoreError("etcd kv/range failed: HTTP 404 not found"))
    try:
        await failures(agent, "probe", 2)
        assert "probe loop failing" in agent.problems()
        agent.store.heal("get_config")
        await eventually("probe healthy", lambda: "probe" not in agent.health.loop_failures)
    finally:
        await stop(agent)


async def test_probe_only_when_the_store_was_silent() -> None:
    """While the watch keeps delivering, the store proved itself: no probe GET (the
    next tick would still leave a second of the grace). Once it is quiet, the probe
    asks, and a store that stops answering still turns /healthz 503 after the grace."""
    agent = await start(probe_after=1.0)
    agent.health.store_grace_seconds = 5.0
    try:
        await eventually("first probe", lambda: agent.store.calls.get("get_config", 0) > 0)
        before = agent.store.calls["get_config"]
        for n in range(10):  # a lease change every 0.1 s: the watch answers
            await add_peer(agent, n)
            await asyncio.sleep(0.1)
        assert agent.store.calls["get_config"] == before
        await eventually("probe after silence", lambda: agent.store.calls["get_config"] > before)
        agent.store.fail("get_config", StoreUnavailable("etcd unreachable: test"))
        await eventually("store 503", lambda: "subnet store" in agent.problems())
        agent.store.heal("get_config")
        await eventually("store back", lambda: "subnet store" not in agent.problems())
    finally:
        await stop(agent)


async def test_blackhole_route_through_netlink_with_retries() -> None:
    nl = FakeNetlink(error=DataplaneError("add", "route 10.5.1.0/24", "Operation not permitted"))

    async def open_netlink() -> Netlink:
        return nl  # type: ignore[return-value]

    opener: Callable[[], Awaitable[Netlink]] = open_netlink
    agent = await start(flags=["-ip-blackhole-route"], open_netlink=opener)
    try:
        await failures(agent, "blackhole", 2)
        assert "Operation not permitted" in agent.problems()
        nl.error = None
        await eventually("blackhole added", lambda: bool(nl.added))
        assert nl.added[0] == Route(dst=IPv4Network(agent.loops.lease.subnet), type=RTN_BLACKHOLE)
        await eventually("blackhole healthy", lambda: "blackhole" not in agent.health.loop_failures)
    finally:
        await stop(agent)
    assert nl.closed


class FlakyCompletion(EtcdSubnetManager):
    """A manager whose ``complete_lease`` (kube: the node condition) fails at first."""

    failures_left = 3
    completed = 0

    async def complete_lease(self, lease: Lease) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise StoreUnavailable("kube-api: connection refused")
        self.completed += 1


async def test_complete_lease_is_retried_until_it_succeeds_once() -> None:
    agent = await start()
    manager = FlakyCompletion(agent.store, ttl=86400, renew_margin=3600)
    loops = AgentLoops(
        settings=agent.loops.settings,
        manager=manager,
        network=agent.network,
        traffic=agent.traffic,
        watcher=agent.loops.watcher,
        lease=agent.loops.lease,
        config=agent.loops.config,
        health=agent.health,
        metrics=Metrics(),
        networks=agent.loops.networks,
        started=0.0,
        retry_initial=0.02,
        retry_max=0.1,
    )
    await stop(agent)
    task = asyncio.create_task(loops.run())
    try:
        await eventually("completed once", lambda: manager.completed == 1)
        assert "complete" not in agent.health.loop_failures
        await asyncio.sleep(0.3)
        assert manager.completed == 1 and not task.done()
    finally:
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=DEADLINE)
        assert done


async def test_config_check_survives_store_errors(caplog: pytest.LogCaptureFixture) -> None:
    """The config loop (every 3 resync periods) meets an etcd error reply: retried, the
    agent keeps running, and a later good read clears it."""
    agent = await start()
    agent.store.fail("get_config", StoreError("etcd kv/range failed: HTTP 500 internal"))
    try:
        await failures(agent, "config", 1)
        assert not agent.task.done()
        agent.store.heal("get_config")
        await eventually("config healthy", lambda: "config" not in agent.health.loop_failures)
    finally:
        await stop(agent)


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (StoreError("etcd kv/range failed: HTTP 400"), "etcd kv/range failed: HTTP 400"),
        (RuntimeError("boom"), "startup failed: unexpected RuntimeError: boom"),
        (ExceptionGroup("loops", [KeyError("x")]), "startup failed: unexpected ExceptionGroup"),
    ],
)
async def test_cli_turns_any_startup_error_into_one_line_and_exit_1(
    error: Exception,
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from loden import agent, cli

    async def failing_run(settings: object) -> int:
        raise error

    monkeypatch.setattr(agent, "run", failing_run)
    status = await cli._run_agent(parse_agent_args([], {}))
    assert status == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and fragment in errors[0]
