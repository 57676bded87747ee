#!/usr/bin/env python3
"""atheris harness: the lease key parser (``<prefix>/subnets/10.5.3.0-24[&v6-len]``).

Any text parses or raises SubnetKeyError; a parsed key renders to a key that parses to
the same subnets (IPv4 part byte-identical). The agent's stricter reading of names under
``<prefix>/subnets/`` (``parse_lease_name``) accepts only keys that render back exactly.
Run: python fuzz/fuzz_subnet_key.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run, text

with instrumented():
    from loden.errors import SubnetKeyError
    from loden.model.net import parse_subnet_key, subnet_key
    from loden.subnet.manager import parse_lease_name

SEEDS = [b"10.5.3.0-24", b"10.5.3.0-24&fc00:0:0:3::-64", b"172.17.255.0-28"]


def test_one_input(data: bytes) -> None:
    key = text(data)
    try:
        v4, v6 = parse_subnet_key(key)
    except SubnetKeyError:
        v4 = None
    if v4 is not None:
        # It accepts a full path (the last component counts), leading zeros in prefix
        # lengths and any spelling of the IPv6 part, as Go does: the rendering parses to
        # the same subnets, and the IPv4 address is already canonical (no leading zeros).
        rendered = subnet_key(v4, v6)
        assert parse_subnet_key(rendered) == (v4, v6), (key, rendered)
        address = key.rsplit("/", 1)[-1].split("-")[0]
        assert rendered.split("-")[0] == address, (key, rendered)
    # What the agent applies to names under <prefix>/subnets/: exactly canonical, so no
    # key can alias another node's lease.
    try:
        subnets = parse_lease_name(key)
    except SubnetKeyError:
        return
    assert subnet_key(*subnets) == key, key


if __name__ == "__main__":
    run(test_one_input, SEEDS)
