"""docs/config.md is generated from the flag table and must not drift from it; the two
log formats carry the same fields."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from loden.cli import _JSONFormatter, _TextFormatter
from loden.settings import AGENT_FLAGS
from loden.tools.config_doc import FLAG_NOTES, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_the_generated_page() -> None:
    assert DOC.read_text() == render(), (
        "docs/config.md is stale: run `.venv/bin/python -m loden.tools.config_doc > docs/config.md`"
    )


def test_every_visible_flag_and_variable_is_documented_with_its_default() -> None:
    text = DOC.read_text()
    for flag in AGENT_FLAGS:
        if flag.hidden:
            assert f"`-{flag.name}`" not in text
            continue
        row = next(line for line in text.splitlines() if line.startswith(f"| `-{flag.name}` |"))
        if flag.env:
            assert f"`{flag.env_name}`" in row
        if flag.kind not in ("bool", "list") and flag.default != "":
            assert f"`{flag.default}`" in row
    assert set(FLAG_NOTES) <= {flag.name for flag in AGENT_FLAGS}


def test_text_and_json_logs_have_the_same_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("loden.agent", logging.WARNING, "f", 1, "a %s", ("b",),
                                   sys.exc_info())  # fmt: skip
    as_json = json.loads(_JSONFormatter().format(record))
    text = _TextFormatter().format(record)
    assert set(as_json) == {"ts", "level", "logger", "msg", "exc"}
    first = text.splitlines()[0]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(as_json["ts"]))
    assert first == f"{stamp}.{int(record.msecs):03d}Z WARNING loden.agent: a b"
    assert as_json["level"] == "warning" and as_json["exc"] in text
