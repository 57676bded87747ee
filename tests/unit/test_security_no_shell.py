"""Security, static half: no code in src/ ever hands a command line to a shell.

Every subprocess gets an argv list, so nothing that comes from etcd, a CNI config, a
flag or a file can be interpreted by ``/bin/sh``. Checked on the syntax tree of every
module (so a comment or docstring cannot hide or fake a finding), plus a text check for
a shell being exec'd explicitly.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "loden"

#: Calls that run a command through a shell (or take a single command string).
SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}
SHELLS = {"sh", "bash", "dash", "/bin/sh", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash"}


def _dotted(node: ast.expr) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def findings(tree: ast.AST, where: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name[-2:] in SHELL_CALLS or name[-1:] == ("create_subprocess_shell",):
                found.append(f"{where}:{node.lineno}: {'.'.join(name)}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{where}:{node.lineno}: shell={ast.unparse(kw.value)}")
        if isinstance(node, ast.List | ast.Tuple):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            for first, second in zip(items, items[1:], strict=False):
                if first in SHELLS and second == "-c":
                    found.append(f"{where}:{node.lineno}: [{first!r}, '-c', ...]")
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            for alias in node.names:
                if alias.name in ("system", "popen"):
                    found.append(f"{where}:{node.lineno}: from os import {alias.name}")
    return found


def test_the_checker_catches_each_form() -> None:
    bad = (
        "import os, subprocess, asyncio\n"
        "os.system('x')\n"
        "subprocess.run('x', shell=True)\n"
        "subprocess.Popen(['sh', '-c', 'x'])\n"
        "asyncio.create_subprocess_shell('x')\n"
        "subprocess.getoutput('x')\n"
        "from os import popen\n"
        "subprocess.run(['x'], shell=flag)\n"
    )
    assert len(findings(ast.parse(bad), "bad.py")) == 7
    good = "import subprocess\nsubprocess.run(['ip', 'link'], shell=False)\n"
    assert findings(ast.parse(good), "good.py") == []


def test_no_shell_anywhere_in_src() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50
    found: list[str] = []
    for path in files:
        text = path.read_text()
        where = str(path.relative_to(SRC.parent))
        found += findings(ast.parse(text, filename=where), where)
        if "sh -c" in text or "bash -c" in text:
            found.append(f"{where}: the text 'sh -c'")
    assert found == []
