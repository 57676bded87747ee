#!/usr/bin/env python3
"""atheris harness: mk-docker-opts' reader of sh assignments (subnet.env as sh source).

Any text yields the assigned variables or raises ParseError; nothing is ever executed.
Run: python fuzz/fuzz_mk_docker_opts.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run, text

with instrumented():
    from loden.errors import ParseError
    from loden.tools.mk_docker_opts import parse_sh_assignments


SEEDS = [
    b"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\n",
    b"A='x y'; B=\"$A-${A}\" # comment\nexport C=\\$D\n",
]


def test_one_input(data: bytes) -> None:
    try:
        values = parse_sh_assignments(text(data), {"HOME": "/root"})
    except ParseError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


if __name__ == "__main__":
    run(test_one_input, SEEDS)
