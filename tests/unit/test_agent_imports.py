"""The node agent loads only what it runs: memory is part of its contract (issue 14).

Every imported module stays resident: pyroute2 alone cost ~9 MB of the agent's RSS,
rich and cryptography more. A fresh interpreter imports what ``flanneld`` imports
before and while it runs (CLI, agent, the etcd store, the vxlan and host-gw backends)
and must not have pulled in any of these.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import requires

FORBIDDEN = (
    "pyroute2",
    "rich",
    "pygments",  # with click and rich: httpx's CLI (~5 MB; see loden/__init__.py)
    "cryptography",
    "unittest",
    "multiprocessing",
    "loden.lab",
    "loden.cni",
    "loden.tools",
    "loden.udp",
    "loden.kernel.wireguard",
)

#: httpx imports its optional command line (``httpx._main``: click, rich, pygments) when
#: click is importable. Loden does not depend on click; only the test tools do (moto's
#: server brings Flask, Flask brings click). The probe hides click so it sees what an
#: installed agent loads; ``test_click_is_not_a_runtime_dependency`` keeps that honest.
PROBE = """
import json, sys
sys.modules["click"] = None
import loden.cli, loden.agent, loden.subnet.etcd_v3, loden.subnet.etcd_v2
from loden.backend import create_backend  # noqa: F401
import loden.backend.vxlan, loden.backend.hostgw  # noqa: F401
print(json.dumps(sorted(sys.modules)))
"""


def test_flanneld_never_imports_heavy_or_unrelated_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []


def test_plain_http_etcd_loads_no_ca_bundle() -> None:
    """http:// endpoints need no TLS: httpx must not load certifi's CA bundle (~1.4 MB)."""
    probe = (
        "import ssl\n"
        "loaded = []\n"
        "real = ssl.SSLContext.load_verify_locations\n"
        "def spy(self, *a, **k):\n"
        "    loaded.append(a or k)\n"
        "    return real(self, *a, **k)\n"
        "ssl.SSLContext.load_verify_locations = spy\n"
        "from loden.subnet.etcd_http import EtcdHTTP\n"
        "EtcdHTTP(['http://127.0.0.1:2379', 'http://127.0.0.2:2379'])\n"
        "plain = len(loaded)\n"
        "EtcdHTTP(['https://127.0.0.1:2379'])\n"
        "print(plain, len(loaded) > plain)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["0", "True"]  # https without flags: the default CAs


def test_click_is_not_a_runtime_dependency() -> None:
    runtime = [r for r in requires("loden") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in runtime}
    assert names and "click" not in names
