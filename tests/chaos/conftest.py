"""Fixtures of the chaos suite (tests/chaos): clusters of real agents to break."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.chaos.support import ChaosCluster
from tests.fixtures.topology import TopologyFactory

ChaosFactory = Callable[..., ChaosCluster]


@pytest.fixture
def chaos(make_topology: TopologyFactory) -> Iterator[ChaosFactory]:
    """Factory: ``chaos(backend, hosts=3, etcd_members=1, extra_args=(), ...)``.

    Every cluster made is closed (agents, etcd) at teardown, then the topology fixture
    deletes the namespaces, whatever state a failed test left behind.
    """
    made: list[ChaosCluster] = []

    def factory(backend: dict[str, object], *, hosts: int = 3, **kwargs: object) -> ChaosCluster:
        topo = make_topology(hosts=hosts)
        cluster = ChaosCluster(topo, backend, **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()
