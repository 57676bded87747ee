"""run_command: argv without a shell, stdin, exit status and timeout handling."""

from __future__ import annotations

import sys
import time

import pytest

from loden.errors import CommandError, TrafficRulesError
from loden.traffic.commands import Commands, run_command


async def test_stdin_reaches_the_command() -> None:
    res = await run_command(["cat"], stdin=b"*nat\nCOMMIT\n")
    assert res.stdout == b"*nat\nCOMMIT\n" and res.returncode == 0


async def test_no_shell_interpretation() -> None:
    res = await run_command(["echo", "$HOME;", "rm", "-rf", "/"])
    assert res.text == "$HOME; rm -rf /\n"


async def test_nonzero_exit_raises_with_stderr_excerpt() -> None:
    code = (
        "import sys; sys.stderr.write('a\\nb\\niptables: No chain by that name.\\n'); sys.exit(2)"
    )
    with pytest.raises(CommandError) as info:
        await run_command([sys.executable, "-c", code])
    assert info.value.returncode == 2
    assert str(info.value).endswith("exited 2: a / b / iptables: No chain by that name.")


async def test_nonzero_exit_without_check() -> None:
    res = await run_command(["false"], check=False)
    assert res.returncode == 1


async def test_timeout_kills_the_process() -> None:
    started = time.monotonic()
    with pytest.raises(TrafficRulesError, match=r"did not finish within 0\.2 s and was killed"):
        await run_command(["sleep", "30"], timeout=0.2)
    assert time.monotonic() - started < 5


async def test_missing_binary() -> None:
    with pytest.raises(TrafficRulesError, match="^no-such-iptables-xyz not found: install"):
        await run_command(["no-such-iptables-xyz", "--version"])


async def test_prefix_is_prepended() -> None:
    res = await Commands(prefix=("env", "LODEN_T=1")).run(["printenv", "LODEN_T"])
    assert res.argv == ("env", "LODEN_T=1", "printenv", "LODEN_T") and res.text == "1\n"
    assert Commands().has("sh") and not Commands().has("no-such-iptables-xyz")
