"""The cloud SDK is loaded only by the aws-vpc backend, when it talks to EC2: the agent
of every other backend (and the aws-vpc module itself) must not pay its memory."""

from __future__ import annotations

import subprocess
import sys


def test_agent_and_cloud_modules_do_not_import_boto() -> None:
    code = (
        "import sys, loden.cli, loden.agent, loden.backend.hostgw, loden.backend.vxlan,"
        " loden.backend.aws_vpc, loden.backend.gce\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore',"
        " 'moto', 'googleapiclient')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout
