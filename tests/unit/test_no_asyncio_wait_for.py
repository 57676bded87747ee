"""No ``asyncio.wait_for`` in src/: on Python 3.11 it can swallow a cancellation that
arrives just as the awaited thing completes, and an agent that loses its SIGTERM
cancellation never stops (found by the AgentLoops tests). ``asyncio.timeout`` has no
such window."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "loden"


def test_src_never_uses_asyncio_wait_for() -> None:
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found == [], f"use `async with asyncio.timeout(...)` instead: {found}"
