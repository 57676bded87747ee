"""alloc backend (spec §6.7): take a subnet lease, program nothing.

Used when something else (a cloud route table, an external router) moves packets
between node subnets: the lease carries only the PublicIP (no BackendType, exactly as
flannel writes it) and the pod MTU is the external interface's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.errors import BackendError
from loden.model.lease import Lease, LeaseAttrs, LeaseEvent


class AllocBackend:
    def __init__(self, ctx: BackendContext) -> None:
        if ctx.ext.ext_addr is None:
            raise BackendError("alloc needs an IPv4 public IP: enable IPv4 or set --public-ip")
        self.ctx = ctx

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        assert self.ctx.ext.ext_addr is not None
        return LeaseAttrs(public_ip=self.ctx.ext.ext_addr)

    async def activate(self, lease: Lease) -> Network:
        return AllocNetwork(lease, self.ctx.ext.mtu)


class AllocNetwork:
    def __init__(self, lease: Lease, mtu: int) -> None:
        self._lease = lease
        self._mtu = mtu

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def mtu(self) -> int:
        return self._mtu

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        return ReconcileReport()

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        return ReconcileReport()

    async def aclose(self) -> None:
        return None


def create(ctx: BackendContext) -> AllocBackend:
    return AllocBackend(ctx)
