"""The backend seam: how a data plane plugs into the agent.

A backend is built for one network config and one external interface. The agent
drives it in two steps, because some backends must create kernel state *before*
the lease exists (vxlan publishes its device MAC, wireguard its public key):

1. :meth:`Backend.lease_attrs` prepares what the lease must carry and returns the
   attrs to publish;
2. :meth:`Backend.activate` turns the acquired lease into a running
   :class:`Network` (addresses, routes to the own subnet, devices up).

A :class:`Network` is a level-triggered reconciler: :meth:`Network.reconcile` gets the
*complete* desired peer set, diffs it against the kernel and repairs the difference,
removing only state Loden owns. :meth:`Network.apply` is the fast path for a batch of
events and must leave the kernel in the same state that ``reconcile`` would. Both are
idempotent. The agent owns the timing (event batches, periodic resync): nothing here
starts a task that outlives a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Protocol, runtime_checkable

from loden.model.backend_options import BackendOptions
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs, LeaseEvent
from loden.settings import BackendSettings


@dataclass(frozen=True, slots=True)
class ExternalInterface:
    """The interface peers reach this node on, and the addresses to advertise."""

    name: str
    index: int
    mtu: int
    #: An address configured on the interface (what udp binds, ipip uses as local).
    iface_addr: IPv4Address | None
    #: The public IP advertised in the lease (``--public-ip`` or ``iface_addr``).
    ext_addr: IPv4Address | None
    iface_v6_addr: IPv6Address | None = None
    ext_v6_addr: IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class BackendContext:
    """Everything a backend may use; built by the agent."""

    config: NetworkConfig
    ext: ExternalInterface
    #: Directory for state that must survive restarts (e.g. the VTEP MAC); created 0700.
    state_dir: Path
    #: The data plane's knobs that are the agent's, not the config's (netns, key file).
    settings: BackendSettings = BackendSettings()
    #: ``config``'s Backend options, typed (parsed once, here).
    options: BackendOptions = field(init=False)

    def __post_init__(self) -> None:
        """:raises NetworkConfigError: the Backend options do not validate."""
        object.__setattr__(self, "options", self.config.backend.typed())


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconcile pass changed; logged and exported as metrics."""

    added: int = 0
    removed: int = 0
    #: Data-plane failures (a netlink write refused, a device that cannot be repaired).
    errors: tuple[str, ...] = ()
    #: Peers the backend cannot program (bad BackendData, no layer-2 path), one reason
    #: each. The backend warns once per reason; unlike ``errors`` they do not make the
    #: node unhealthy: a hostile or broken lease must not take the other peers down.
    skipped: tuple[str, ...] = ()
    #: Peers that advertise this node's own identity (its VTEP MAC, its WireGuard key):
    #: never programmed, reported loudly (log, metric, ``/healthz``). Unlike the other
    #: fields this is the *complete current set*, not what this one pass saw.
    conflicts: tuple[str, ...] = ()

    def __add__(self, other: ReconcileReport) -> ReconcileReport:
        return ReconcileReport(
            self.added + other.added,
            self.removed + other.removed,
            self.errors + other.errors,
            self.skipped + other.skipped,
            tuple(dict.fromkeys(self.conflicts + other.conflicts)),
        )


class Network(Protocol):
    """A running data plane for one lease."""

    @property
    def lease(self) -> Lease: ...

    @property
    def mtu(self) -> int:
        """The MTU pods must use (written to subnet.env as FLANNEL_MTU)."""
        ...

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        """Apply added/removed peer leases (fast path; idempotent)."""
        ...

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        """Make the kernel match exactly these peers (keyed by ``Lease.key``)."""
        ...

    async def aclose(self) -> None:
        """Stop: release fds/processes. Kernel state stays unless the backend's contract
        says otherwise (wireguard deletes its device, udp's TUN disappears)."""
        ...


@dataclass(frozen=True, slots=True)
class KernelDrift:
    """What a :class:`KernelWatcher` saw: entries it already repaired (``report``), or a
    change it cannot repair entry by entry (``resync``: why a full reconcile is due)."""

    report: ReconcileReport | None = None
    resync: str | None = None


@runtime_checkable
class KernelWatcher(Protocol):
    """A :class:`Network` that listens to the kernel's change notifications."""

    def watch_kernel(self) -> AsyncIterator[KernelDrift]:
        """Repair owned entries as the kernel reports them changed or deleted, for as
        long as the iterator runs; yield what was repaired and when a full reconcile
        is needed (notifications lost, a device the entries hang off changed)."""
        ...


class Backend(Protocol):
    """A data-plane type, registered by name in :mod:`loden.backend`."""

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        """Prepare whatever the lease must carry and return the attrs to publish.

        ``others``: the leases the store holds now (empty if it cannot list them). A
        backend that advertises a per-node value (VTEP MAC, WireGuard key) makes sure
        no other node's lease advertises the same one before it is published.
        """
        ...

    async def activate(self, lease: Lease) -> Network:
        """Configure the data plane for the acquired ``lease``."""
        ...
