#!/usr/bin/env python3
"""atheris harness: the two subnet.env readers.

The agent's reader of its previous subnet file never raises (garbage means "no previous
subnet"); the CNI plugin's reader raises only ParseError.
Run: python fuzz/fuzz_subnet_env.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run, text

with instrumented():
    from loden.cni.subnet_env import parse_subnet_env
    from loden.errors import ParseError
    from loden.model.subnet_env import read_previous


SEEDS = [
    b"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\n"
    b"FLANNEL_IPMASQ=true\n",
    b"FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\n",
    b"export FLANNEL_SUBNET='10.1.17.1/24'\nDOCKER_OPT_BIP=\"--bip=10.1.17.1/24\"\n",
]


def test_one_input(data: bytes) -> None:
    content = text(data)
    previous = read_previous(content)
    if previous.subnet is not None:
        assert previous.subnet.version == 4
    try:
        parse_subnet_env(content, "/run/flannel/subnet.env")
    except ParseError:
        pass


if __name__ == "__main__":
    run(test_one_input, SEEDS)
