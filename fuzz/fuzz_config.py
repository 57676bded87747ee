#!/usr/bin/env python3
"""atheris harness: the network config parser (``<prefix>/config``, net-conf.json).

Any bytes must parse into a NetworkConfig or raise NetworkConfigError; a config that
parsed must parse again from its own raw text to the same value.
Run: python fuzz/fuzz_config.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run

with instrumented():
    from loden.errors import NetworkConfigError
    from loden.model.config import NetworkConfig


SEEDS = [
    b'{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}',
    b'{"Network": "10.5.0.0/16", "SubnetLen": 26, "SubnetMin": "10.5.1.0", "SubnetMax": '
    b'"10.5.20.0", "Backend": {"Type": "vxlan", "VNI": 4, "DirectRouting": true}}',
    b'{"EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 64, "Backend": '
    b'{"Type": "host-gw"}}',
    b'{"network": "172.17.0.0/16", "backend": {"type": "udp", "port": 8285}}',
]


def test_one_input(data: bytes) -> None:
    for validate in (True, False):
        try:
            config = NetworkConfig.parse(data, validate=validate)
        except NetworkConfigError:
            continue
        assert NetworkConfig.parse(config.raw, validate=validate) == config


if __name__ == "__main__":
    run(test_one_input, SEEDS)
