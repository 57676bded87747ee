#!/usr/bin/env python3
"""atheris harness: the flannel CNI plugin, environment and stdin to exit code and stdout.

The first input byte picks CNI_COMMAND, the rest is stdin. The subnet file and the
delegate cache live in a private temporary directory and CNI_PATH is empty, so no
real plugin runs. Properties: exit 0, or exit 1 with one CNI error object; never an
"internal error" (that is the catch-all for an unexpected exception).
Run: python fuzz/fuzz_cni.py -runs=50000
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from _harness import instrumented, run

with instrumented():
    from loden.cni.plugin import handle

_TMP = Path(tempfile.mkdtemp(prefix="loden-fuzz-cni-"))
_SUBNET = _TMP / "subnet.env"
_SUBNET.write_text(
    "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\n"
    "FLANNEL_IPMASQ=true\n"
)
(_TMP / "bin").mkdir()
COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC", "", "BOGUS"]


SEEDS = [
    b"\x00" + b'{"cniVersion":"1.0.0","name":"cbr0","type":"flannel",'
    b'"delegate":{"hairpinMode":true,"isDefaultGateway":true}}',
    b"\x01" + b'{"cniVersion":"0.3.1","name":"cbr0","type":"flannel"}',
    b"\x04" + b'{"cniVersion":"0.4.0"}',
]


def test_one_input(data: bytes) -> None:
    command = COMMANDS[data[0] % len(COMMANDS)] if data else "ADD"
    stdin = data[1:]
    try:  # keep every file under _TMP: pin subnetFile and dataDir when it is a JSON object
        conf = json.loads(stdin)
        if isinstance(conf, dict):
            conf["subnetFile"], conf["dataDir"] = str(_SUBNET), str(_TMP / "data")
            stdin = json.dumps(conf).encode()
    except ValueError:
        pass
    environ = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "fuzz",
        "CNI_NETNS": "/var/run/netns/nonexistent",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(_TMP / "bin"),
    }
    outcome = handle(environ, lambda: stdin, io.StringIO())
    assert outcome.exit_code in (0, 1)
    if outcome.exit_code == 1:
        reply = json.loads(outcome.stdout)
        assert isinstance(reply["code"], int) and isinstance(reply["msg"], str)
        assert "internal error" not in reply["msg"], reply["msg"]


if __name__ == "__main__":
    run(test_one_input, SEEDS)
