"""Shared pytest wiring: fixture modules live in tests/fixtures/."""

from __future__ import annotations

pytest_plugins: list[str] = [
    "tests.fixtures.topology",
    "tests.fixtures.etcd",
    "tests.fixtures.kubeapi",
    "tests.fixtures.cloud_aws",
    "tests.fixtures.cloud_gce",
]
