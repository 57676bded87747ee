"""Fuzzing the CNI plugin end to end (chaos issue, scenario 9).

``handle`` is the whole plugin minus the process: environment and stdin in, exit code
and stdout out. Whatever the runtime passes (any command, any stdin, any subnet.env
content), the plugin answers with exit 0 or with exit 1 and one CNI error object on
stdout, never a traceback. decode_request alone and the delegate builder have their own
property tests in test_cni_delegate.py; this one runs the full ADD/DEL/CHECK/STATUS path
with the files (subnet.env, the delegate cache) in a private temporary directory and an
empty CNI_PATH, so no real plugin ever runs.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from loden.cni.plugin import handle

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=15),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["cniVersion", "name", "type", "delegate", "ipam", "ipMasq", "mtu", "runtimeConfig", "args"]
)
VERSIONS = st.sampled_from(["0.1.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "", "9.9.9"])
SUBNET_ENV = st.one_of(
    st.just(
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
    ),
    st.text(max_size=120),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ", "X"]
            ),
            st.sampled_from(["10.1.0.0/16", "10.1.17.1/24", "1472", "true", "", "x", "-1"])
            | st.text(max_size=10),
        ),
        max_size=5,
    ).map(lambda kv: "".join(f"{k}={v}\n" for k, v in kv)),
)


@st.composite
def stdins(draw: st.DrawFn, subnet_file: str, data_dir: str) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    conf: dict[str, Any] = {"name": "cbr0", "type": "flannel", "cniVersion": draw(VERSIONS)}
    conf |= draw(st.dictionaries(FIELDS, JSON, max_size=3))
    conf["subnetFile"] = subnet_file  # never any other file on this machine
    conf["dataDir"] = data_dir
    return json.dumps(conf).encode()


def test_handle_always_answers_with_a_cni_result_or_error() -> None:
    with tempfile.TemporaryDirectory(prefix="loden-fuzz-cni-") as tmp:
        root = Path(tmp)
        subnet_file = root / "subnet.env"
        data_dir = root / "data"
        empty_path = root / "bin"
        empty_path.mkdir()

        @settings(max_examples=300, deadline=None)
        @given(
            st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC", "", "BOGUS"]),
            stdins(str(subnet_file), str(data_dir)),
            SUBNET_ENV,
            st.sampled_from(["eth0", "", "a" * 20, "bad/name"]),
        )
        def check(command: str, stdin: bytes, env_text: str, ifname: str) -> None:
            subnet_file.write_text(env_text)
            environ = {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": "fuzz0",
                "CNI_NETNS": "/var/run/netns/does-not-exist",
                "CNI_IFNAME": ifname,
                "CNI_PATH": str(empty_path),
            }
            stderr = io.StringIO()
            outcome = handle(environ, lambda: stdin, stderr)
            assert outcome.exit_code in (0, 1)
            assert "Traceback" not in stderr.getvalue()
            if outcome.exit_code == 1:
                reply = json.loads(outcome.stdout)
                assert isinstance(reply.get("code"), int) and isinstance(reply.get("msg"), str)
                assert "internal error" not in reply["msg"], reply
            elif outcome.stdout:
                json.loads(outcome.stdout)
            for path in root.rglob("*"):  # nothing escapes the private directory
                assert path.resolve().is_relative_to(root.resolve())

        check()
