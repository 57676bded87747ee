"""``loden lab up --backend aws-vpc|gce``: the emulated cloud, the VPC router namespace,
three nodes whose pods reach each other only through the cloud's route table."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.integration.test_lab_cluster import assert_gone, check_ok, loden, up

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        loden("lab", "down", "--name", name, check=False, timeout=60)
        assert_gone(name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aws-vpc", "gce"])
def test_lab_cloud_backend_up_check_status_down(lab_name: str, backend: str) -> None:
    if backend == "aws-vpc":
        pytest.importorskip("moto")
    up(lab_name, "--backend", backend, "--nodes", "3")
    check_ok(lab_name)
    status = loden("lab", "status", "--name", lab_name).stdout
    assert status.count("flanneld is running") == 3, status
    # Each node's route as the emulated cloud holds it.
    assert status.count("route -> ") == 3, status
    if backend == "gce":
        for node in ("node1", "node2", "node3"):
            assert f"route -> {node}" in status, status
    else:
        assert status.count("(active)") == 3, status
    loden("lab", "down", "--name", lab_name)
    assert_gone(lab_name)
