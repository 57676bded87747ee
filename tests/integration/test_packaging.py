"""``make dist``'s wheel installs into a fresh venv and runs: ``flanneld --version`` and
one agent against a real etcd, from that install only (not from the source tree)."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.fixtures.etcd import EtcdServer
from tests.fixtures.topology import TopologyFactory, subnet_from_env, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=540, cwd=cwd, check=False
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_wheel_installs_and_runs_an_agent(tmp_path: Path, make_topology: TopologyFactory) -> None:
    dist = tmp_path / "dist"
    # The command `make dist` runs, into a temporary directory.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    wheels = sorted(dist.glob("loden-*.whl"))
    assert len(wheels) == 1 and len(sorted(dist.glob("loden-*.tar.gz"))) == 1
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", wheels[0])
    # Imported from the install, not from src/ (cwd elsewhere, no PYTHONPATH).
    where = run(venv / "bin" / "python", "-c", "import loden; print(loden.__file__)", cwd=tmp_path)
    assert str(venv) in where and str(ROOT / "src") not in where
    version = run(venv / "bin" / "flanneld", "--version")
    assert version.strip().startswith("v0.")

    topo = make_topology(1)
    assert topo.underlay_address is not None
    etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
    etcd.start()
    try:
        host = topo.hosts[0]
        config = json.dumps({"Network": "10.77.0.0/16", "Backend": {"Type": "vxlan"}})
        host.ns.run(str(venv / "bin" / "loden"), "config", "set", config,
                    f"-etcd-endpoints={etcd.client_url}")  # fmt: skip
        subnet_file = tmp_path / "subnet.env"
        agent = host.ns.spawn(
            str(venv / "bin" / "flanneld"),
            f"-etcd-endpoints={etcd.client_url}",
            f"-subnet-file={subnet_file}",
            f"-state-dir={tmp_path / 'state'}",
        )
        assert wait_until(subnet_file.exists, timeout=30), agent.output()
        assert subnet_from_env(subnet_file).subnet_of(IPv4Network("10.77.0.0/16"))
        assert host.ns.ip("link", "show", "flannel.1", check=False).returncode == 0
        assert agent.stop() == 0
    finally:
        etcd.close()
