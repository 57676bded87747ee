#!/usr/bin/env python3
"""atheris harness: the lease value parser (flannel's lease JSON, v2 and v3 forms).

Any bytes parse into LeaseAttrs or raise LeaseFormatError; what parsed survives a
round trip through both JSON renderings.
Run: python fuzz/fuzz_lease.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run

with instrumented():
    from loden.errors import LeaseFormatError
    from loden.model.lease import LeaseAttrs


SEEDS = [
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
    b'{"PublicIP":"10.211.55.13","BackendType":"host-gw"}',
    b'{"PublicIP":"10.0.0.1","PublicIPv6":"fc00::1","BackendType":"wireguard",'
    b'"BackendData":{"PublicKey":"abc+/=","Port":51820},"BackendV6Data":{"Port":51821}}',
]


def test_one_input(data: bytes) -> None:
    try:
        attrs = LeaseAttrs.parse(data, key="10.5.3.0-24")
    except LeaseFormatError:
        return
    assert LeaseAttrs.parse(attrs.to_json()) == attrs
    legacy = LeaseAttrs.parse(attrs.to_json(legacy=True))
    assert legacy.public_ip == attrs.public_ip and legacy.backend_type == attrs.backend_type


if __name__ == "__main__":
    run(test_one_input, SEEDS)
